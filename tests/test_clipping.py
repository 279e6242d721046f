"""The engine's pre-noise clipped gradient sum against the brute-force oracle (algorithms.md §1, §5, §11.2).

(a) Flat and automatic clipping: ``dpdist.audit.clipped_sum`` in book-keeping mode and in two-pass
    mode, the oracle's ``vmap(grad)`` path and the oracle's naive per-example ``.backward()`` loop all
    give the same sum_i c_i g_i (float64, relative error < 1e-9 per parameter), for every strategy
    (ghost, materialise, stream; streamed chunks of one and two examples too), with
    a clip norm between the smallest and the largest per-example norm so that some examples are
    clipped and others are not.
(b) Per-layer clipping: groups = the parameters of each module that owns parameters (the tied table
    is one group covering both its uses, a norm's weight+bias one group, a linear's weight+bias one
    group), C_k = C / sqrt(K), against the oracle.  The clip norm is chosen so that some groups clip.
(c) Sensitivity: with an adversarial example whose gradient norm is >= 1000 C (a target token whose
    logit the model pushes to -1e4 for every context), the clipped sums of neighbouring batches
    (add/remove one example; "removed" = all labels ignored, which is checked to equal dropping the
    row) differ by at most C for flat, automatic and per-layer clipping.  For a replacement the
    bound is 2C (triangle inequality), which is asserted too.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from dpdist import audit  # (no importorskip: a broken engine must fail loudly, not skip)

from helpers import oracle

TOL = 1e-9
BATCH, SEQ = 5, 10


MODELS = {
    "tied-layernorm": dict(),
    "untied-rmsnorm": dict(tie_embeddings=False, norm="rmsnorm"),
    "tied-padding-nobias": dict(padding_idx=3, bias=False),
}
STRATEGIES = ["ghost", "materialise", "stream", None]


@functools.lru_cache(maxsize=None)
def _case(name):
    model, ids, labels = oracle.tiny_case(BATCH, SEQ, **MODELS[name])
    grads = oracle.per_example_grads(model, ids, labels)
    naive = oracle.naive_per_example_grads(model, ids, labels)
    norms = oracle.norms_from_grads(grads)
    real = norms[norms > 0]
    clip = float(real.min() + 0.5 * (real.max() - real.min()))
    assert (norms > clip).any() and ((norms > 0) & (norms < clip)).any()
    return model, ids, labels, grads, naive, clip


def _check(got, ref, what):
    err, name = oracle.dict_rel_err(got, ref)
    assert err < TOL, f"{what}: worst parameter {name}: rel err {err:.3e}"


# ------------------------------------------------------------------------- (a) flat / automatic

@functools.lru_cache(maxsize=None)
def _oracle_sums(name, clipping):
    model, ids, labels, grads, naive, clip = _case(name)
    return (oracle.clipped_sum_from_grads(grads, clip, clipping),
            oracle.clipped_sum_from_grads(naive, clip, clipping))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_four_paths(name, clipping, strategy):
    model, ids, labels, grads, naive, clip = _case(name)
    ref_vmap, ref_naive = _oracle_sums(name, clipping)
    _check(ref_naive, ref_vmap, "oracle naive loop vs oracle vmap")
    bk = audit.clipped_sum(model, ids, labels, clip, clipping=clipping, mode="bookkeeping", strategy=strategy)
    tp = audit.clipped_sum(model, ids, labels, clip, clipping=clipping, mode="two_pass", strategy=strategy)
    assert set(bk) == set(tp) == {n for n, _ in model.named_parameters()}
    _check(bk, ref_vmap, f"{name}/{clipping}/{strategy}: engine book-keeping vs oracle")
    _check(tp, ref_vmap, f"{name}/{clipping}/{strategy}: engine two-pass vs oracle")
    _check(bk, tp, f"{name}/{clipping}/{strategy}: engine book-keeping vs engine two-pass")
    _check(bk, ref_naive, f"{name}/{clipping}/{strategy}: engine book-keeping vs naive loop")


# -------------------------------------------------------------------------------- (b) per-layer

def _per_layer_clip(name):
    model, ids, labels, grads, naive, _ = _case(name)
    groups = oracle.module_groups(model)
    group_norms = torch.stack([oracle.norms_from_grads(grads, g) for g in groups])  # [K, B]
    positive = group_norms[group_norms > 0]
    threshold = float(positive.median())  # C_k: about half the (group, example) pairs clip
    return threshold * math.sqrt(len(groups)), groups, group_norms, threshold


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_per_layer_clipping(name, strategy):
    model, ids, labels, grads, naive, _ = _case(name)
    clip, groups, group_norms, threshold = _per_layer_clip(name)
    assert (group_norms > threshold).any() and ((group_norms > 0) & (group_norms < threshold)).any()
    tok_group = next(g for g in groups if "tok_emb.weight" in g)
    assert tok_group == ["tok_emb.weight"]
    ref = oracle.clipped_sum_from_grads(grads, clip, "per_layer", per_layer_groups=groups)
    _check(oracle.clipped_sum_from_grads(naive, clip, "per_layer", per_layer_groups=groups), ref,
           "oracle naive vs vmap")
    got = audit.clipped_sum(model, ids, labels, clip, clipping="per_layer", mode="bookkeeping", strategy=strategy)
    _check(got, ref, f"{name}/per_layer/{strategy}: engine vs oracle (K={len(groups)}, C_k={threshold:.4g})")


@pytest.mark.parametrize("chunk_examples", [1, 2])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_streamed_chunks(name, clipping, chunk_examples, monkeypatch):
    """The ``stream`` strategy with chunks of 1 and of 2 examples (BATCH = 5: the last chunk is
    short), so several chunks and, under per-layer clipping, several clip-factor calls per layer."""
    from dpdist.privacy.rules import linear

    model, ids, labels, grads, naive, clip = _case(name)
    table_bytes = model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()
    monkeypatch.setattr(linear, "STREAM_CHUNK_BYTES", chunk_examples * table_bytes)
    assert len(linear.example_chunks(BATCH, table_bytes)) == math.ceil(BATCH / chunk_examples)
    groups = None
    if clipping == "per_layer":
        clip, groups, _, _ = _per_layer_clip(name)
    ref = oracle.clipped_sum_from_grads(grads, clip, clipping, per_layer_groups=groups)
    got = audit.clipped_sum(model, ids, labels, clip, clipping=clipping, mode="bookkeeping", strategy="stream")
    _check(got, ref, f"{name}/{clipping}/stream, {chunk_examples} example(s) per chunk: engine vs oracle")
    norms = audit.per_example_norms(model, ids, labels, strategy="stream")
    ref_norms = oracle.norms_from_grads(grads)
    assert float(((norms - ref_norms).abs() / ref_norms.clamp(min=1e-300))[ref_norms > 0].max()) < TOL


# ------------------------------------------------------------------------------ (c) sensitivity

ADV_TOKEN = 0
ADV_SCALE = 1e4


@functools.lru_cache(maxsize=None)
def _adversarial(tied):
    """A model in which token 0's logit is about -ADV_SCALE in every context: ln_f's bias is the
    all-ones vector and token 0's output row is -ADV_SCALE / sqrt(d) * ones, so h . row ~ -ADV_SCALE.
    Batches that never use token 0 do not notice it (softmax weight exp(-1e4) = 0); an example whose
    targets are all token 0 has a loss of ~1e4 and a gradient of norm ~1e4."""
    model = oracle.tiny_model(max_seq_len=SEQ, tie_embeddings=tied)
    d = model.cfg.d_model
    with torch.no_grad():
        model.ln_f.bias.fill_(1.0)
        table = model.tok_emb.weight if tied else model.lm_head.weight
        table[ADV_TOKEN] = -ADV_SCALE / math.sqrt(d)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, model.cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(1, model.cfg.vocab_size, (BATCH, SEQ), generator=gen)
    norms = oracle.per_example_norms(model, ids, labels)
    clip = float((norms.min() + norms.max()) / 2)  # clips some ordinary examples, not all
    removed = labels.clone()
    removed[0] = oracle.IGNORE_INDEX  # example 0 contributes nothing
    adversarial = labels.clone()
    adversarial[0] = ADV_TOKEN
    adv_norms = oracle.per_example_norms(model, ids, adversarial)
    assert adv_norms[0] >= 1000 * clip, f"adversarial norm {float(adv_norms[0]):.4g} < 1000 C = {1000 * clip:.4g}"
    assert torch.allclose(adv_norms[1:], norms[1:], rtol=1e-12, atol=0)  # the others do not notice
    return model, ids, labels, removed, adversarial, clip


SENS_CASES = [(tied, clipping, mode) for tied in (True, False) for clipping in ("flat", "automatic", "per_layer")
              for mode in ("bookkeeping", "two_pass") if not (clipping == "per_layer" and mode == "two_pass")]


@pytest.mark.parametrize("tied,clipping,mode", SENS_CASES,
                         ids=[f"{'tied' if t else 'untied'}-{c}-{m}" for t, c, m in SENS_CASES])
def test_sensitivity(tied, clipping, mode):
    model, ids, labels, removed, adversarial, clip = _adversarial(tied)

    def engine(lab, ids_=ids):
        return audit.clipped_sum(model, ids_, lab, clip, clipping=clipping, mode=mode)

    s, s_removed, s_adv = engine(labels), engine(removed), engine(adversarial)
    bound = clip * (1 + 1e-9)
    d_remove = float(oracle.flat_norm(oracle.dict_sub(s, s_removed)))
    d_add_adv = float(oracle.flat_norm(oracle.dict_sub(s_adv, s_removed)))
    d_replace = float(oracle.flat_norm(oracle.dict_sub(s_adv, s)))
    assert d_remove <= bound, f"remove an ordinary example: ||S - S'|| = {d_remove:.12g} > C = {clip:.12g}"
    assert d_add_adv <= bound, f"add the adversarial example: ||S - S'|| = {d_add_adv:.12g} > C = {clip:.12g}"
    assert d_replace <= 2 * bound, f"replace by the adversarial example: {d_replace:.12g} > 2C = {2 * clip:.12g}"

    # The adversarial example is clipped, not dropped: its contribution has the norm the rule predicts.
    groups = oracle.module_groups(model) if clipping == "per_layer" else None
    adv_grads = oracle.per_example_grads(model, ids[:1], adversarial[:1])
    expected = float(oracle.flat_norm(oracle.clipped_sum_from_grads(adv_grads, clip, clipping,
                                                                    per_layer_groups=groups)))
    assert abs(d_add_adv - expected) <= 1e-9 * expected, f"adversarial contribution {d_add_adv:.12g} vs {expected:.12g}"
    if clipping == "flat":
        assert expected >= clip * (1 - 1e-6)
    # ... and the engine's sum with it present is still the oracle's.
    _check(s_adv, oracle.clipped_sum(model, ids, adversarial, clip, clipping=clipping, per_layer_groups=groups),
           f"{clipping}/{mode}: engine vs oracle with the adversarial example")

    # "Removed" by ignoring every label is the same as dropping the row.
    s_dropped = engine(labels[1:], ids[1:])
    _check(s_dropped, s_removed, "all-ignored example vs dropped row")
