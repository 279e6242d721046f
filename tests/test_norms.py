"""The engine's per-example gradient norms equal brute-force ``vmap(grad)`` norms (algorithms.md §11.1).

``dpdist.audit.per_example_norms`` (ghost norms, materialised per-example gradients, the embedding
mask norm, Phantom Clipping for the tied table, norm-layer rules) is compared in float64 with the
oracle in ``tests/oracle.py`` (relative error < 1e-9 per example) on small models:

* tied embeddings (the default, so Phantom Clipping with its cross term), with a token repeated
  inside an example and appearing as a target, some ignored labels, and one example whose labels are
  all ignored (norm exactly 0);
* untied embeddings; LayerNorm and RMSNorm; with and without biases;
* ``padding_idx`` with pad tokens in the inputs (tied and untied);
* every layer forced to the ghost norm, every layer forced to materialised per-example gradients,
  and the default mixed rule (T = 12 puts 2T^2 = 288 above p*d = 256 of the attention output
  projection, so the FLOP rule picks different strategies for different layers);
* the book-keeping and the two-pass mode.
"""
from __future__ import annotations

import functools

import pytest
import torch

from dpdist import audit  # (no importorskip: a broken engine must fail loudly, not skip)
from dpdist.privacy.rules import linear

from helpers import oracle

TOL = 1e-9
BATCH, SEQ = 5, 12


MODELS = {
    "tied-layernorm": dict(),
    "untied": dict(tie_embeddings=False),
    "tied-rmsnorm": dict(norm="rmsnorm"),
    "tied-nobias": dict(bias=False),
    "tied-padding": dict(padding_idx=3),
    "untied-padding-rmsnorm-nobias": dict(tie_embeddings=False, padding_idx=3, norm="rmsnorm", bias=False),
}


@functools.lru_cache(maxsize=None)
def _case(name):
    model, ids, labels = oracle.tiny_case(BATCH, SEQ, **MODELS[name])
    ref = oracle.per_example_norms(model, ids, labels)
    return model, ids, labels, ref


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["bookkeeping", "two_pass"])
@pytest.mark.parametrize("strategy", ["ghost", "materialise", "stream", None])
@pytest.mark.parametrize("name", list(MODELS))
def test_norms_match_oracle(name, strategy, mode):
    model, ids, labels, ref = _case(name)
    before = _snapshot(model)
    got = audit.per_example_norms(model, ids, labels, mode=mode, strategy=strategy)
    assert got.shape == ref.shape == (BATCH,)
    assert got.dtype == torch.float64
    # the all-ignored example (index 2) has a zero gradient; everyone else a positive one
    assert ref[2] == 0 and (ref[torch.arange(BATCH) != 2] > 0).all()
    assert abs(float(got[2])) < 1e-12, f"empty example has norm {float(got[2]):.3e}"
    err = ((got - ref).abs() / ref.clamp(min=1e-300))[ref > 0]
    worst = int(torch.arange(BATCH)[ref > 0][err.argmax()])
    assert float(err.max()) < TOL, (f"{name}/{strategy}/{mode}: example {worst}: engine {float(got[worst]):.15g} vs "
                                    f"oracle {float(ref[worst]):.15g} (rel err {float(err.max()):.3e}); "
                                    f"engine {got.tolist()} oracle {ref.tolist()}")
    # the audit leaves the model as it found it: no tap, same parameters
    for mod_name, module in model.named_modules():
        assert getattr(module, "grad_tap", None) is None, f"{mod_name} still has a tap"
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed"


def test_repeated_and_tied_terms_matter():
    """Guards the test itself: the cases exercise what they claim.  Dropping the embedding's
    repeated-token pairs, or the Phantom cross term, would change the norms by far more than TOL."""
    model, ids, labels, ref = _case("tied-layernorm")
    assert (ids[0, 1] == ids[0, 3] == ids[0, 5]).item()
    grads = oracle.per_example_grads(model, ids, labels)
    # the tied table's gradient, split into its input side and output side
    emb = grads["tok_emb.weight"]
    with torch.no_grad():
        untied = oracle.tiny_model(max_seq_len=SEQ, tie_embeddings=False)
        untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.tok_emb.weight.detach().clone()})
    g2 = oracle.per_example_grads(untied, ids, labels)
    inp, out = g2["tok_emb.weight"], g2["lm_head.weight"]
    assert oracle.rel_err(inp + out, emb) < 1e-12  # same function, so the tied gradient is the sum
    cross = 2 * (inp * out).flatten(1).sum(1)
    assert (cross[ref > 0].abs() / ref[ref > 0].pow(2) > 1e-6).all(), "cross term too small to be tested"


@pytest.mark.parametrize("seq_len", [1, 5, 13, 64, 130])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7, None])
def test_blocked_ghost_norm_equals_direct_per_example_norm(seq_len, blocks):
    """The ghost norm forms only the Grams' blocks on and right of the diagonal and counts the others
    twice; an off-by-one in a block boundary or in that weight moves the result by far more than 1e-12."""
    gen = torch.Generator().manual_seed(seq_len)
    inputs = torch.randn(3, seq_len, 6, dtype=torch.float64, generator=gen)
    grad_outputs = torch.randn(3, seq_len, 5, dtype=torch.float64, generator=gen)
    direct = torch.bmm(grad_outputs.transpose(1, 2), inputs).pow(2).sum((1, 2))
    got = linear.ghost_sq_norm(inputs, grad_outputs, blocks)
    assert float(((got - direct).abs() / direct).max()) < 1e-12
    bounds = linear.gram_bounds(seq_len, blocks)
    assert bounds[0] == 0 and bounds[-1] == seq_len and all(lo < hi for lo, hi in zip(bounds, bounds[1:]))


def test_gram_entries_count_the_upper_blocks():
    assert linear.gram_bounds(128) == [0, 32, 64, 96, 128]  # dpdist bench's T: 4 blocks, the default
    assert linear.gram_entries(128) == 5 * 128**2 // 8  # (k + 1) / 2k of T^2 for k = 4
    assert linear.gram_bounds(64) == [0, 32, 64] and linear.gram_bounds(12) == [0, 12]
    assert linear.gram_entries(12, blocks=1) == 144


@pytest.mark.parametrize("name", ["tied-layernorm", "untied-padding-rmsnorm-nobias"])
def test_ghost_norms_in_row_blocks_match_oracle(name, monkeypatch):
    """The engine path with blocked Grams (T = 12 in 3 blocks of 4 rows) for every linear layer and
    the tied table's output side, against the brute-force oracle."""
    monkeypatch.setattr(linear, "GRAM_MIN_ROWS", 4)
    assert len(linear.gram_bounds(SEQ)) == 4
    model, ids, labels, ref = _case(name)
    got = audit.per_example_norms(model, ids, labels, strategy="ghost")
    err = ((got - ref).abs() / ref.clamp(min=1e-300))[ref > 0]
    assert float(err.max()) < TOL
