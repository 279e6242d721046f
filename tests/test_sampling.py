"""Poisson sampling: Bernoulli(q) per example per step, the same global draw on every rank, and the
same number of micro-batches everywhere (an empty step included).

The frequency tests use fixed secrets, so they are deterministic; each states the probability that
it would fail for a correct sampler with a secret drawn at random (its false-alarm rate).
"""
import math

import numpy as np
import pytest
import torch

from dpdist.privacy.noise import derive_key, keystream_words
from dpdist.privacy.sampling import PoissonSampler

SECRET = 0xA11CE


def _local_indices(plan) -> list[int]:
    return [int(i) for micro in plan.micro_batches for i in micro.indices[micro.mask]]


def test_each_example_is_included_with_probability_q():
    n, q, steps = 200, 0.1, 2000
    sampler = PoissonSampler(n, q, SECRET)
    counts = np.zeros(n)
    for step in range(steps):
        counts[sampler.selection(step)] += 1
    # Each count is Binomial(2000, 0.1): within 5 standard deviations for all 200 examples
    # (false alarm 200 * 5.7e-7 = 1.1e-4 by the union bound).
    assert np.all(np.abs(counts - steps * q) < 5 * math.sqrt(steps * q * (1 - q)))
    # The overall rate, Binomial(400000, 0.1), within 5 standard deviations (false alarm 5.7e-7).
    assert abs(counts.sum() - n * steps * q) < 5 * math.sqrt(n * steps * q * (1 - q))


def test_example_i_uses_word_i_of_the_sample_keystream():
    """One 64-bit ChaCha20 keystream word per example, keyed by (secret, step, "sample"): a prefix of the
    examples is selected the same way whatever the data set's size.  (test_noise checks the keystream
    against RFC 8439.)"""
    words = keystream_words(derive_key(SECRET, 5, "sample"), 0, 300)
    expected = np.flatnonzero((words >> np.uint64(11)) * 2.0**-53 < 0.2)
    assert np.array_equal(PoissonSampler(300, 0.2, SECRET).selection(5), expected)
    small = PoissonSampler(120, 0.2, SECRET).selection(5)
    assert np.array_equal(small, expected[expected < 120])


def test_plan_is_a_pure_function_of_secret_and_release():
    a, b = PoissonSampler(500, 0.05, SECRET, micro_batch_size=4), PoissonSampler(500, 0.05, SECRET, micro_batch_size=4)
    for step in (0, 1, 17):
        plan_a, plan_b = a.plan(step), b.plan(step)
        assert plan_a.release == step and plan_a.global_batch_size == plan_b.global_batch_size
        for x, y in zip(plan_a.micro_batches, plan_b.micro_batches, strict=True):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.mask, y.mask)
    assert not np.array_equal(a.selection(0), a.selection(1))
    assert not np.array_equal(a.selection(0), PoissonSampler(500, 0.05, SECRET + 1).selection(0))


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_ranks_partition_the_global_selection(dp_size):
    n, q, mbs = 103, 0.3, 4
    for step in range(5):
        selected = PoissonSampler(n, q, SECRET).selection(step)
        plans = [PoissonSampler(n, q, SECRET, dp_rank=r, dp_size=dp_size, micro_batch_size=mbs).plan(step)
                 for r in range(dp_size)]
        local = [_local_indices(p) for p in plans]
        union = sorted(i for indices in local for i in indices)
        assert union == selected.tolist()  # every selected example once, nothing else
        assert max(map(len, local)) - min(map(len, local)) <= 1  # round-robin: balanced
        assert {len(p.micro_batches) for p in plans} == {math.ceil(math.ceil(len(selected) / dp_size) / mbs)}
        assert all(p.global_batch_size == len(selected) for p in plans)


def test_micro_batches_have_a_fixed_shape_and_zero_padding():
    plan = PoissonSampler(1000, 0.05, SECRET, dp_rank=1, dp_size=3, micro_batch_size=8).plan(2)
    for micro in plan.micro_batches:
        assert micro.indices.shape == micro.mask.shape == (8,)
        assert micro.indices.dtype == torch.int64 and micro.mask.dtype == torch.bool
        assert (micro.indices[~micro.mask] == 0).all()
    masks = torch.cat([m.mask for m in plan.micro_batches])
    assert masks[: int(masks.sum())].all()  # padding only at the end


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_every_rank_runs_the_same_number_of_micro_batches(dp_size):
    for n, q in ((50, 1e-9), (50, 0.02), (37, 0.5), (10, 1.0)):  # the first selects nobody
        for step in range(20):
            plans = [PoissonSampler(n, q, SECRET, dp_rank=r, dp_size=dp_size, micro_batch_size=3).plan(step)
                     for r in range(dp_size)]
            assert len({len(p.micro_batches) for p in plans}) == 1, (n, q, step)
            if q == 1e-9:
                assert plans[0].global_batch_size == 0 and plans[0].micro_batches == []
            if q == 1.0:
                assert plans[0].global_batch_size == n


def test_realised_batch_size_is_random_around_qn():
    sampler = PoissonSampler(2000, 0.05, SECRET)
    sizes = np.array([sampler.plan(step).global_batch_size for step in range(400)])
    assert sampler.expected_batch_size == pytest.approx(100)
    assert len(set(sizes.tolist())) > 10  # Poisson, not a fixed batch size
    # Mean of 400 Binomial(2000, 0.05) sizes within 5 standard errors (false alarm 5.7e-7).
    assert abs(sizes.mean() - 100) < 5 * math.sqrt(2000 * 0.05 * 0.95 / 400)


@pytest.mark.parametrize("kwargs", [dict(num_examples=0), dict(sample_rate=0.0), dict(sample_rate=1.5),
                                    dict(dp_rank=2, dp_size=2), dict(micro_batch_size=0)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        PoissonSampler(**{"num_examples": 10, "sample_rate": 0.1, "secret": SECRET, **kwargs})
