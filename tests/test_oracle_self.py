"""The brute-force oracle agrees with itself and with the definition of the per-example loss.

Three independent routes to per-example gradients (``vmap(grad)``, ``grad`` in a Python loop, and one
ordinary ``.backward()`` per example) must agree to 1e-12 in float64, and so must the clipped sums
built from them.  A few properties that do not depend on any of the three close the loop: the sum of
the per-example gradients is the gradient of the summed loss from one batched backward, an example
with no target tokens has a zero gradient, examples do not see each other (permuting the batch
permutes the gradients), and the oracle's loss is ``dpdist.parallel.cross_entropy.per_example_loss``.
"""
from __future__ import annotations

import pytest
import torch

from dpdist.parallel.cross_entropy import per_example_loss

from helpers import oracle

TOL = 1e-12


CASES = {
    "tied-layernorm": dict(),
    "untied-rmsnorm-nobias": dict(tie_embeddings=False, norm="rmsnorm", bias=False),
    "tied-padding": dict(padding_idx=3),
}


def _setup(case):
    overrides = CASES[case]
    model = oracle.tiny_model(**overrides)
    ids, labels = oracle.tiny_batch(pad_id=overrides.get("padding_idx"))
    return model, ids, labels


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_equals_loop_and_naive(case):
    model, ids, labels = _setup(case)
    ref = oracle.naive_per_example_grads(model, ids, labels)
    for method in ("vmap", "loop"):
        got = oracle.per_example_grads(model, ids, labels, method=method)
        assert set(got) == set(ref) == {n for n, p in model.named_parameters()}
        for name in ref:
            assert got[name].shape == (ids.shape[0], *dict(model.named_parameters())[name].shape)
            err = oracle.rel_err(got[name], ref[name])
            assert err < TOL, f"{method} vs naive, {name}: rel err {err:.3e}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("clipping", ["flat", "automatic", "per_layer"])
def test_clipped_sum_vmap_equals_naive(case, clipping):
    model, ids, labels = _setup(case)
    norms = oracle.per_example_norms(model, ids, labels)
    real = norms[norms > 0]
    clip = float((real.min() + real.max()) / 2)  # clips some examples, not others
    a = oracle.clipped_sum(model, ids, labels, clip, clipping=clipping)
    b = oracle.naive_clipped_sum(model, ids, labels, clip, clipping=clipping)
    err, name = oracle.dict_rel_err(a, b)
    assert err < TOL, f"{clipping}: worst {name} rel err {err:.3e}"


@pytest.mark.parametrize("case", list(CASES))
def test_sum_of_per_example_grads_is_batch_grad(case):
    model, ids, labels = _setup(case)
    per_ex = oracle.per_example_grads(model, ids, labels)
    model.zero_grad(set_to_none=True)
    oracle.example_loss(model(ids), labels).sum().backward()
    for name, p in model.named_parameters():
        err = oracle.rel_err(per_ex[name].sum(0), p.grad)
        assert err < TOL, f"{name}: rel err {err:.3e}"
    model.zero_grad(set_to_none=True)


def test_examples_are_independent_and_empty_example_is_zero():
    model, ids, labels = _setup("tied-layernorm")
    grads = oracle.per_example_grads(model, ids, labels)
    norms = oracle.norms_from_grads(grads)
    assert norms[2] == 0.0 and (torch.cat([norms[:2], norms[3:]]) > 0).all()
    perm = torch.tensor([3, 0, 4, 2, 1])
    permuted = oracle.per_example_grads(model, ids[perm], labels[perm])
    for name in grads:
        assert oracle.rel_err(permuted[name], grads[name][perm]) < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_library_definition(case):
    model, ids, labels = _setup(case)
    with torch.no_grad():
        logits = model(ids)
        mine = oracle.example_loss(logits, labels)
        lib = per_example_loss(logits, labels)
    assert oracle.rel_err(mine, lib) < TOL
    assert mine[2] == 0.0


def test_clipping_rules():
    norms = torch.tensor([0.0, 0.5, 2.0, 1e6], dtype=torch.float64)
    flat = oracle.clip_factors(norms, 1.0, "flat")
    assert torch.allclose(flat, torch.tensor([1.0, 1.0, 1 / (2 + 1e-6), 1 / (1e6 + 1e-6)], dtype=torch.float64))
    auto = oracle.clip_factors(norms, 1.0, "automatic", gamma=0.01)
    assert torch.allclose(auto, 1.0 / (norms + 0.01))
    # per-layer: two groups, each clipped to C / sqrt(2) on its own norm
    grads = {"a": torch.tensor([[3.0, 4.0]], dtype=torch.float64), "b": torch.tensor([[0.1]], dtype=torch.float64)}
    out = oracle.clipped_sum_from_grads(grads, 2.0, "per_layer", per_layer_groups=[["a"], ["b"]])
    assert torch.allclose(out["a"].norm(), torch.tensor(2.0 / 2 ** 0.5, dtype=torch.float64), rtol=1e-6)
    assert torch.equal(out["b"], grads["b"][0])


def test_module_groups_cover_the_model_once():
    for overrides in ({}, {"tie_embeddings": False, "norm": "rmsnorm", "bias": False}):
        model = oracle.tiny_model(**overrides)
        groups = oracle.module_groups(model)
        names = [n for g in groups for n in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert ["tok_emb.weight"] in groups
        if not overrides:
            assert ["blocks.0.ln_1.weight", "blocks.0.ln_1.bias"] in groups
            assert ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"] in groups
