"""The process mesh refuses a layout that does not match the launched world, before any group starts."""
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
