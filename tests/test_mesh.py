"""The process mesh refuses a layout that does not match the launched world, before any group starts."""
import subprocess
import sys

import pytest
import torch.distributed as dist

from dpdist.config import ConfigError, ParallelConfig
from dpdist.runtime.mesh import init_mesh


def test_world_size_must_equal_data_times_tensor(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"4 processes but parallel.data x parallel.tensor = 1 x 2 = 2"):
        init_mesh(ParallelConfig(data=1, tensor=2))
    assert not dist.is_initialized()


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mesh = init_mesh(ParallelConfig())
    assert mesh.world_size == 1 and mesh.tp_group is None and mesh.dp_group is None and not dist.is_initialized()


def test_no_torch_function_keeps_the_process_group_alive_past_destroy(tmp_path):
    """torch.distributed.nn.functional binds ``group.WORLD`` as a default argument when first imported,
    which torch does lazily when an optimizer is built.  After init_process_group that pins the group
    past destroy_process_group, where it can abort the interpreter at exit; the mesh imports it first."""
    script = f"""
import inspect, torch, torch.distributed as dist
from dpdist.runtime.mesh import Mesh
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
import torch.distributed.nn.functional as F
assert inspect.signature(F.broadcast).parameters["group"].default is None, "the default group is pinned"
dist.barrier(); dist.destroy_process_group()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
