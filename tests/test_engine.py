"""The DP step's release: noise placement and scale, normalisation, coverage of every parameter, planning."""
import math

import pytest
import torch
from torch import nn

from dpdist import ModelConfig, build_model
from dpdist.privacy.noise import keyed_normal
from dpdist.privacy.strategy import plan_strategies
from dpdist.privacy.step import dp_layers, native_step

SIGMA, CLIP, EXPECTED_BATCH, SECRET = 2.0, 0.5, 10.0, 99


def model(**overrides):
    cfg = dict(vocab_size=211, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dtype="float64")
    return build_model(ModelConfig(**{**cfg, **overrides}))


def released_noise(m, step=0):
    engine = native_step(m, clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH,
                         secret=SECRET)
    engine.release(step)  # an empty Poisson batch still releases noise, normalised by qN
    return {name: p.grad * EXPECTED_BATCH for name, p in m.named_parameters()}


def test_noise_on_the_sum_has_std_sigma_c_and_zero_mean():
    noise = torch.cat([g.reshape(-1) for g in released_noise(model()).values()])
    n = noise.numel()
    assert n > 30_000
    # 5 standard errors: false alarm about 6e-7 for the mean; the std tolerance is > 9 standard errors.
    assert abs(float(noise.mean())) < 5 * SIGMA * CLIP / math.sqrt(n)
    assert abs(float(noise.std()) / (SIGMA * CLIP) - 1) < 0.03


def test_noise_is_keyed_by_step_and_parameter_name():
    m = model()
    noise = released_noise(m, step=7)
    for name, p in m.named_parameters():
        expected = SIGMA * CLIP * keyed_normal(SECRET, 7, name, p.full_shape, None, dtype=torch.float64)
        assert torch.allclose(noise[name], expected, rtol=1e-14, atol=0), name
    a, b = noise["blocks.0.mlp.fc.weight"].reshape(-1), noise["blocks.1.mlp.fc.weight"].reshape(-1)
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(a.numel())  # independent across parameters


def test_clipped_sum_is_divided_by_the_expected_batch_size():
    m = model()
    engine = native_step(m, clip_norm=CLIP, noise_multiplier=0.0, expected_batch_size=EXPECTED_BATCH,
                         micro_batch_size=3, seq_len=8)
    ids = torch.randint(0, 211, (3, 8))
    engine.microbatch(ids, ids.roll(-1, 1))
    engine.microbatch(ids, ids.roll(-1, 1), mask=torch.tensor([1, 0, 1]))
    engine.release(0)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    engine.microbatch(ids, ids.roll(-1, 1), mask=torch.tensor([2, 0, 2]) / 2)  # same examples, once, mask 0/1
    engine.microbatch(ids, ids.roll(-1, 1))
    sums = engine.clipped_sums()
    for name, grad in grads.items():
        assert torch.allclose(grad * EXPECTED_BATCH, sums[name], rtol=1e-12, atol=1e-14), name


def test_a_parameter_without_a_norm_rule_is_refused_by_name():
    m = model()
    m.extra = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"extra\.weight.*no per-example norm rule"):
        native_step(m, clip_norm=1.0)


def test_frozen_parameters_are_allowed_and_get_no_noise():
    m = model()
    m.extra = nn.Linear(4, 4).double().requires_grad_(False)
    m.pos_emb.weight.requires_grad_(False)
    assert all(type(layer) is not nn.Linear for layer in dp_layers(m))
    native_step(m, clip_norm=CLIP, noise_multiplier=SIGMA, secret=SECRET).release(0)
    assert m.extra.weight.grad is None and m.pos_emb.weight.grad is None
    assert m.tok_emb.weight.grad is not None


def test_memory_budget_is_respected_and_buys_time():
    from dpdist.privacy.strategy import time_cost

    m = model(d_model=64, vocab_size=2000)
    layers = dp_layers(m)

    def plan(budget):
        return plan_strategies(layers, batch=8, seq_len=128, elem_bytes=8, budget_bytes=budget)

    def total_time(p):
        return sum(time_cost(c) for c in p.costs.values())

    tight, loose = plan(0.0), plan(float("inf"))
    budgets = [tight.kept_bytes(False) + f * (loose.kept_bytes(False) - tight.kept_bytes(False)) for f in (0.3, 0.7)]
    plans = [tight] + [plan(b) for b in budgets] + [loose]
    for p, budget in zip(plans[1:-1], budgets):
        assert p.kept_bytes(False) <= budget
    times = [total_time(p) for p in plans]
    assert times == sorted(times, reverse=True)  # more memory never costs time


def test_per_layer_planner_charges_a_streamed_layer_its_chunk_all_reduces_under_tensor_parallelism():
    """Per-layer clipping of a streamed layer clips (one tensor-group all-reduce) chunk by chunk: a
    layer whose per-example gradients need many chunks streams on one process, and goes ghost when
    its shards are tensor-parallel, where each extra chunk costs an all-reduce."""
    from dpdist.privacy.rules import linear

    m = model(d_model=256, n_layers=1, vocab_size=211, max_seq_len=160)
    fc = m.blocks[0].mlp.fc
    kwargs = dict(batch=32, seq_len=160, elem_bytes=4, per_layer=True)
    chunks = len(linear.example_chunks(32, fc.weight.numel() * 4))
    assert chunks > 8 and plan_strategies([fc], **kwargs).costs[fc].reductions == chunks - 1
    assert plan_strategies([fc], **kwargs).strategies[fc] == "stream"
    assert plan_strategies([fc], **kwargs, tensor_parallel=True).strategies[fc] == "ghost"
