"""Keyed noise: a shard is exactly its slice of the whole, and the values are N(0, 1) and independent.

The statistical tests use fixed secrets, so they are deterministic; each states the probability that
it would fail for a correct generator with a secret drawn at random (its false-alarm rate).
"""
import math

import numpy as np
import pytest
import torch

from dpdist.privacy.noise import derive_key, keyed_normal, philox_words

SECRET = 0x5EC12E7
N_STAT = 1 << 20  # about 1e6 samples


def _normal(shape, box=None, secret=SECRET, step=3, name="layer.weight"):
    return keyed_normal(secret, step, name, shape, box, dtype=torch.float64)


def test_philox_advance_jumps_whole_blocks_of_four_words():
    """Why ``philox_words`` cannot position at word w with ``advance(w)``: numpy counts 4-word blocks."""
    key = derive_key(SECRET, "probe")
    whole = np.random.Philox(key=key).random_raw(64)
    bitgen = np.random.Philox(key=key)
    bitgen.advance(3)
    assert np.array_equal(bitgen.random_raw(4), whole[12:16])


def test_philox_words_start_at_any_word_from_any_position():
    key = derive_key(SECRET, "probe")
    whole = np.random.Philox(key=key).random_raw(200)
    bitgen = np.random.Philox(key=key)
    for start in [*range(0, 60), 3, 0, 101, 100, 7]:  # forwards, backwards and inside a block already read
        for count in (0, 1, 2, 3, 5, 8, 31):
            assert np.array_equal(philox_words(bitgen, start, count), whole[start:start + count]), (start, count)


def _split(n, parts):
    edges = np.linspace(0, n, parts + 1).round().astype(int)  # uneven splits
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("shape", [(1000,), (37, 53), (3000, 5), (5, 7, 11), (4, 6, 1)])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_shards_equal_the_slices_of_the_whole_exactly(shape, parts):
    whole = _normal(shape)
    assert whole.shape == shape
    for dim in range(len(shape)):
        pieces = []
        for start, stop in _split(shape[dim], parts):
            box = tuple(slice(start, stop) if k == dim else slice(None) for k in range(len(shape)))
            piece = _normal(shape, box)
            assert torch.equal(piece, whole[box]), (dim, start, stop)
            pieces.append(piece)
        assert torch.equal(torch.cat(pieces, dim), whole)


def test_box_may_spell_full_dimensions_explicitly_and_cast():
    whole = _normal((8, 6))
    box = (slice(0, 8), slice(2, 5))
    assert torch.equal(_normal((8, 6), box), whole[:, 2:5])
    single = keyed_normal(SECRET, 3, "layer.weight", torch.Size([8, 6]), box, dtype=torch.float32)
    assert single.dtype == torch.float32 and torch.equal(single, whole[:, 2:5].float())


@pytest.mark.parametrize("box", [
    (slice(0, 2), slice(0, 3)),  # two restricted dimensions
    (slice(0, 8, 2), slice(None)),  # strided
    (slice(4, 9), slice(None)),  # out of range
    (slice(-2, None), slice(None)),  # negative
    (slice(None),),  # wrong rank
])
def test_boxes_that_no_shard_has_are_refused(box):
    with pytest.raises(ValueError):
        _normal((8, 6), box)


def test_deterministic_and_keyed_by_step_name_and_secret():
    base = _normal((64, 32))
    assert torch.equal(base, _normal((64, 32)))
    for other in (_normal((64, 32), step=4), _normal((64, 32), name="layer.bias"),
                  _normal((64, 32), secret=SECRET + 1)):
        assert not torch.isclose(other, base).any()


def test_key_derivation_separates_its_parts():
    assert derive_key(SECRET, "ab", "c") != derive_key(SECRET, "a", "bc")
    assert derive_key(SECRET, 1, "noise") != derive_key(SECRET, "1", "noise")
    assert derive_key(SECRET, 7, "noise") != derive_key(SECRET, 7, "sample")
    key = derive_key(SECRET, 7, "noise")
    assert derive_key(SECRET, np.int64(7), "noise") == key == derive_key(SECRET, torch.tensor(7), "noise")
    assert 0 <= derive_key(2**124 - 1, 0) < 2**128
    with pytest.raises(ValueError):
        derive_key(-1, 0)


def test_standard_normal_moments_and_tail():
    z = _normal((N_STAT,), secret=11).numpy()
    n = len(z)
    # Mean within 5 standard errors: false alarm 5.7e-7.
    assert abs(z.mean()) < 5 / math.sqrt(n)
    # Std within 1% of 1: the std's standard error is 1/sqrt(2n) = 7e-4, so 1% is 14 SE (false alarm < 1e-40).
    assert abs(z.std() - 1) < 0.01
    # Kurtosis 3 within 0.03: its standard error is sqrt(24/n) = 4.8e-3, 0.03 is 6.3 SE (false alarm 3e-10).
    assert abs((z**4).mean() / z.var() ** 2 - 3) < 0.03
    # P(|z| > 3) = 0.0026998 within 5 binomial standard errors (false alarm 5.7e-7).
    p = math.erfc(3 / math.sqrt(2))
    assert abs((np.abs(z) > 3).mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # Box-Muller with u1 >= 2^-53 bounds |z| by sqrt(106 ln 2) = 8.57: never inf or nan.
    assert np.isfinite(z).all()


@pytest.mark.parametrize("other", [dict(name="layer.bias"), dict(step=4)], ids=["name", "step"])
def test_streams_are_uncorrelated_across_names_and_steps(other):
    a = _normal((N_STAT,), step=3, name="layer.weight").numpy()
    b = _normal((N_STAT,), **{"step": 3, "name": "layer.weight", **other}).numpy()
    # |correlation| of independent streams has standard error 1/sqrt(n): 5 SE, false alarm 5.7e-7.
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(N_STAT)


def test_neighbouring_coordinates_are_uncorrelated():
    """Shards are disjoint index ranges of one stream: their independence is that of its coordinates."""
    z = _normal((N_STAT,)).numpy()
    for lag in (1, 2, 3, 4):  # within and across the 4-word Philox blocks (two coordinates per block)
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 / math.sqrt(N_STAT)  # false alarm 5.7e-7 each


def test_scaled_noise_has_std_sigma_times_clip_norm():
    sigma, clip = 1.3, 0.25
    noise = sigma * clip * keyed_normal(SECRET, 0, "w", (1024, 1024))
    assert noise.dtype == torch.float32
    # Same tolerance as the moment test: 1% is 14 standard errors.
    assert abs(float(noise.double().std()) / (sigma * clip) - 1) < 0.01
