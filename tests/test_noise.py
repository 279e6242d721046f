"""Keyed noise: a shard is exactly its slice of the whole, and the values are N(0, 1) and independent.

The statistical tests use fixed secrets, so they are deterministic; each states the probability that
it would fail for a correct generator with a secret drawn at random (its false-alarm rate).
"""
import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dpdist.privacy.noise import derive_key, keyed_normal, keystream_words

SECRET = 0x5EC12E7
N_STAT = 1 << 20  # about 1e6 samples


def _normal(shape, box=None, secret=SECRET, step=3, name="layer.weight"):
    return keyed_normal(secret, step, name, shape, box, dtype=torch.float64)


def _aes_block(key: int, block: int) -> np.ndarray:
    """Block ``block`` of the keystream computed independently: AES-ECB of the big-endian counter."""
    encryptor = Cipher(algorithms.AES(key.to_bytes(16, "little")), modes.ECB()).encryptor()
    return np.frombuffer(encryptor.update(block.to_bytes(16, "big")) + encryptor.finalize(), "<u8")


def test_keystream_block_is_aes_of_the_big_endian_counter():
    key = derive_key(SECRET, "probe")
    for block in (0, 1, 2, 255, 256, 12345, 2**32 - 1, 2**32, 2**64 - 1, 2**64, 2**100 + 7):
        assert np.array_equal(keystream_words(key, 2 * block, 2), _aes_block(key, block)), block
    # Runs whose counter carries out of its low 32 and low 64 bits (OpenSSL's AES-NI CTR increments a
    # 32-bit counter and carries into the rest separately), starting mid-block.
    for first in (2**32 - 3, 2**64 - 3):
        words = keystream_words(key, 2 * first + 1, 11)
        expected = np.concatenate([_aes_block(key, first + k) for k in range(7)])[1:12]
        assert np.array_equal(words, expected), first
    # FIPS-197 appendix C.1: key 000102..0f encrypts 00112233..ff to 69c4e0d8..c55a.
    fips_key = int.from_bytes(bytes(range(16)), "little")
    counter = int.from_bytes(bytes.fromhex("00112233445566778899aabbccddeeff"), "big")
    words = keystream_words(fips_key, 2 * counter, 2)
    assert words.dtype == np.uint64 and words.tobytes() == bytes.fromhex("69c4e0d86a7b0430d8cdb78070b4c55a")


def test_keystream_words_start_at_any_word():
    key = derive_key(SECRET, "probe")
    whole = keystream_words(key, 0, 200)
    assert whole.shape == (200,) and len(set(whole.tolist())) == 200
    for start in range(0, 60):
        for count in (0, 1, 2, 3, 5, 8, 31):  # odd and even, inside one block and across blocks
            words = keystream_words(key, start, count)
            assert np.array_equal(words, whole[start:start + count]), (start, count)
    assert not np.array_equal(keystream_words(key + 1, 0, 4), whole[:4])
    with pytest.raises(ValueError):
        keystream_words(key, -1, 2)


def test_keystream_longer_than_one_pass_of_the_zero_buffer():
    """The keystream is encrypted in passes of 4 MiB (2^18 blocks) of a reused zero plaintext: the seam
    between passes must not show."""
    key = derive_key(SECRET, "long")
    whole = keystream_words(key, 1, (1 << 19) + 1001)  # word w is whole[w - 1]
    for block in (1, (1 << 18) - 1, 1 << 18, (1 << 18) + 1, (1 << 18) + 500):
        assert np.array_equal(whole[2 * block - 1:2 * block + 1], _aes_block(key, block)), block
    assert np.array_equal(keystream_words(key, (1 << 19) - 3, 7), whole[(1 << 19) - 4:(1 << 19) + 3])


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


def test_runs_that_start_or_end_inside_a_box_muller_pair_equal_the_whole():
    """Elements 2p and 2p+1 are one Box-Muller pair: a run starting at an odd index or ending at an even
    one must draw the whole pair and drop its other half."""
    # Rows of odd width: starts of both parities, lengths odd and even.  Runs up to 2^11 blocks apart
    # share one encryptor (the keystream between them is encrypted and dropped), farther ones get a
    # fresh one: rows of 4099 put the runs 2045..2048 blocks apart, rows of 4103 2047..2050.
    for width in (9, 4099, 4103):
        whole = _normal((7, width))
        for start, stop in [(1, 4), (1, 5), (0, 3), (2, 9), (3, 8), (4, 5), (8, 9), (0, 1), (5, 5)]:
            box = (slice(None), slice(start, stop))
            assert torch.equal(_normal((7, width), box), whole[box]), (width, start, stop)
    flat = _normal((101,))
    for start, stop in [(1, 2), (1, 3), (3, 100), (0, 99), (2, 101), (57, 58), (100, 101)]:
        assert torch.equal(_normal((101,), (slice(start, stop),)), flat[start:stop]), (start, stop)


def test_box_may_spell_full_dimensions_explicitly_and_cast():
    whole = _normal((8, 6))
    box = (slice(0, 8), slice(2, 5))
    assert torch.equal(_normal((8, 6), box), whole[:, 2:5])
    single = keyed_normal(SECRET, 3, "layer.weight", torch.Size([8, 6]), box, dtype=torch.float32)
    assert single.dtype == torch.float32 and torch.equal(single, whole[:, 2:5].float())
    # a narrower dtype is the float64 value rounded once, with or without a pair split at the edges
    for shape, box in [((1000,), None), ((999,), (slice(1, 998),))]:
        exact = keyed_normal(SECRET, 3, "w", shape, box, dtype=torch.float64)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(keyed_normal(SECRET, 3, "w", shape, box, dtype=dtype), exact.to(dtype)), (shape, dtype)


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
    for lag in (1, 2, 3, 4):  # lag 1 is half within a Box-Muller pair (2p, 2p+1), half across pairs
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 / math.sqrt(N_STAT)  # false alarm 5.7e-7 each


def test_the_two_halves_of_a_box_muller_pair_are_independent():
    """z_2p = r cos(2 pi u2) and z_2p+1 = r sin(2 pi u2) share r: exactly independent N(0, 1) all the
    same, so neither they nor their squares (which a shared radius would correlate) are correlated."""
    z = _normal((N_STAT,)).numpy()
    even, odd = z[0::2], z[1::2]
    bound = 5 / math.sqrt(len(even))  # 5 standard errors of a correlation: false alarm 5.7e-7 each
    assert abs(np.corrcoef(even, odd)[0, 1]) < bound
    assert abs(np.corrcoef(even**2, odd**2)[0, 1]) < bound
    assert abs(np.corrcoef(np.abs(even), np.abs(odd))[0, 1]) < bound
    # Both halves are N(0, 1) by themselves: std within 1.5% (15 standard errors of 1/sqrt(2 n/2)).
    assert abs(even.std() - 1) < 0.015 and abs(odd.std() - 1) < 0.015


def test_scaled_noise_has_std_sigma_times_clip_norm():
    sigma, clip = 1.3, 0.25
    noise = sigma * clip * keyed_normal(SECRET, 0, "w", (1024, 1024))
    assert noise.dtype == torch.float32
    # Same tolerance as the moment test: 1% is 14 standard errors.
    assert abs(float(noise.double().std()) / (sigma * clip) - 1) < 0.01
