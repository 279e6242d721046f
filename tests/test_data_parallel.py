"""Data parallelism with noise on: 2 processes give the same parameters as 1 process on the same logical
batches, and the replicas stay bit-identical (the noise is keyed, generated identically on every replica,
and added once after the sum)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from dp_steps import tiny_model, train_tiny  # noqa: E402
from launch import torchrun  # noqa: E402

from dpdist.runtime.mesh import Mesh  # noqa: E402


@pytest.mark.slow
def test_two_data_parallel_processes_equal_one(tmp_path):
    out = tmp_path / "dp2.pt"
    torchrun("dp_steps.py", 2, out, 2, 1)
    assert json.loads(Path(str(out) + ".json").read_text())["replicas_identical"]
    distributed = torch.load(out)
    single = train_tiny(Mesh()).state_dict()
    initial = tiny_model(Mesh()).state_dict()
    for name, value in single.items():
        assert not torch.equal(value, initial[name]), f"{name} did not move"
        scale = float(value.abs().max().clamp(min=1e-12))
        assert torch.allclose(distributed[name], value, rtol=0, atol=1e-10 * scale), name
