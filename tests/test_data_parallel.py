"""Layout invariance with noise ON: data- and tensor-parallel runs give the parameters of a single process.

Every layout runs the same noisy steps (the Poisson draw, the keyed noise and the initial weights are
functions of the seed only) and must end, gathered to full shape, equal to one process in float64
(relative 1e-10), with data-parallel replicas and tensor-parallel copies of replicated parameters
bit-identical.  Per-layer clipping, streamed one example per chunk (so one tensor-group all-reduce
per chunk of every layer), is checked the same way.  The same launches check per-example norms of the sharded model (tensor degrees 2 and
4, vocabulary 41 padded to 42 and 44, tied embedding with repeated tokens and ignored labels) against
brute force, and count what the DP machinery adds to a micro-batch's communication: one all-reduce of
B floats over the tensor group.
"""
import json
from pathlib import Path

import pytest
import torch

from dpdist.audit import brute_force_grads
from dpdist.runtime.mesh import Mesh

from helpers.compare import assert_close_at_scale
from helpers.launch import torchrun
from helpers.layout_steps import fixed_batch, tiny_model, train_tiny

LAYOUTS = [(2, 1), (1, 2), (2, 2), (1, 4)]


def parameters(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def single():
    return parameters(train_tiny(Mesh()))


@pytest.fixture(scope="module")
def single_per_layer():
    return parameters(train_tiny(Mesh(), "per_layer"))


@pytest.fixture(scope="module")
def reference_norms():
    ids, labels = fixed_batch()
    grads = brute_force_grads(tiny_model(Mesh()), ids, labels)
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


@pytest.mark.slow
@pytest.mark.parametrize("data, tensor", LAYOUTS, ids=lambda v: str(v))
def test_layout_gives_the_single_process_result(tmp_path, single, single_per_layer, reference_norms, data, tensor):
    out = tmp_path / "params.pt"
    torchrun("layout_steps.py", data * tensor, out, data, tensor)
    verdict = json.loads(Path(str(out) + ".json").read_text())
    assert verdict["dp_replicas_identical"] and verdict["tp_replicated_identical"]
    distributed = torch.load(out)
    initial = parameters(tiny_model(Mesh()))
    assert distributed.keys() == single.keys()
    for name, value in single.items():
        assert not torch.equal(value, initial[name]), f"{name} did not move"
        assert not torch.equal(single_per_layer[name], value), f"{name}: per-layer run equals the flat one"
    assert_close_at_scale(distributed, single)
    # per-layer clipping, streamed, one all-reduce per chunk
    assert_close_at_scale(torch.load(str(out) + ".per_layer.pt"), single_per_layer, what="per-layer ")
    norms = torch.tensor(verdict["norms"], dtype=torch.float64)
    assert torch.allclose(norms, reference_norms, rtol=1e-9, atol=0)
    batch = reference_norms.numel()
    expected = [[batch, True]] if tensor > 1 else []
    assert verdict["added_collectives"] == expected
