"""Keyed noise: a shard is exactly its slice of the whole, the values are N(0, 1) and independent, and
the keystream is ChaCha20 (RFC 8439) bit for bit, from OpenSSL on the CPU and from torch elsewhere.

The statistical tests use fixed secrets, so they are deterministic; each states the probability that
it would fail for a correct generator with a secret drawn at random (its false-alarm rate).
"""
import math
import struct

import numpy as np
import pytest
import torch

from dpdist.privacy.noise import (_box_muller, _chacha_blocks, _cpu_run_words, _device_run_words, _device_words_at,
                                  _ln, _sin_cos_turn, derive_key, device_keystream_words, keyed_normal,
                                  keyed_normal_slice, keystream_words)

SECRET = 0x5EC12E7
N_STAT = 1 << 20  # about 1e6 samples


def _normal(shape, box=None, secret=SECRET, step=3, name="layer.weight"):
    return keyed_normal(secret, step, name, shape, box, dtype=torch.float64)


def _reference_block(key: bytes, counter: int, nonce: int = 0) -> bytes:
    """RFC 8439 section 2.3's block function in plain Python integers, written from the RFC: the state
    is the constants, the key, the 64-bit counter (words 12-13) and the nonce (words 14-15)."""
    def rotl(v, r):
        return ((v << r) & 0xFFFFFFFF) | (v >> (32 - r))

    def quarter(s, a, b, c, d):
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)  # noqa: E702
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)  # noqa: E702
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)  # noqa: E702
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)  # noqa: E702

    initial = [*struct.unpack("<4I", b"expand 32-byte k"), *struct.unpack("<8I", key),
               counter & 0xFFFFFFFF, counter >> 32, nonce & 0xFFFFFFFF, nonce >> 32]
    state = list(initial)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(state, a, b, c, d)
    return struct.pack("<16I", *[(x + y) & 0xFFFFFFFF for x, y in zip(state, initial)])


def _reference_words(key: int, start: int, count: int) -> np.ndarray:
    """Keystream words ``start .. start+count-1``: block b is words 8b .. 8b+7, read little-endian."""
    blocks = range(start // 8, (start + count - 1) // 8 + 1)
    data = b"".join(_reference_block(key.to_bytes(32, "little"), b) for b in blocks)
    return np.frombuffer(data, "<u8")[start % 8:start % 8 + count]


# RFC 8439 section 2.3.2: key 00:01:..:1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block count 1.
RFC_KEY = int.from_bytes(bytes(range(32)), "little")
RFC_COUNTER = 1 | 0x09000000 << 32  # word 12 is the block count, word 13 the nonce's first word
RFC_NONCE = 0x4A000000  # words 14 and 15
RFC_BLOCK = bytes.fromhex("10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
                          "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")


def test_the_block_function_is_rfc_8439s():
    assert _reference_block(RFC_KEY.to_bytes(32, "little"), RFC_COUNTER, RFC_NONCE) == RFC_BLOCK
    words = _chacha_blocks(RFC_KEY, torch.tensor([RFC_COUNTER]), RFC_NONCE)
    assert words.shape == (1, 16) and words.dtype == torch.int64
    assert np.array(words[0].tolist(), "<u4").tobytes() == RFC_BLOCK
    # the keystream of our zero nonce: block RFC_COUNTER of OpenSSL's and of torch's agree with the reference
    expected = np.frombuffer(_reference_block(RFC_KEY.to_bytes(32, "little"), RFC_COUNTER), "<u8")
    assert np.array_equal(keystream_words(RFC_KEY, 8 * RFC_COUNTER, 8), expected)
    assert np.array_equal(device_keystream_words(RFC_KEY, 8 * RFC_COUNTER, 8, "cpu").numpy().view(np.uint64), expected)


@pytest.mark.parametrize("first", [0, 1, 12345, 2**32 - 3, 2**33 - 2, 2**63 - 2, 2**64 - 5])
def test_openssl_and_torch_give_the_reference_keystream_at_any_counter(first):
    """Random-access words from both implementations, starting mid-block, including runs whose counter
    carries from word 12 into word 13 (cryptography refuses to carry: the run is split there) and
    counters at the top of the 64-bit range."""
    key = derive_key(SECRET, "probe", first)
    rng = np.random.default_rng(first % 1000)
    for skip, count in [(0, 8), (3, 29), (int(rng.integers(0, 8)), int(rng.integers(1, 33)))]:
        expected = _reference_words(key, 8 * first + skip, count)
        assert np.array_equal(keystream_words(key, 8 * first + skip, count), expected), (skip, count)
        on_torch = device_keystream_words(key, 8 * first + skip, count, "cpu")
        assert on_torch.dtype == torch.int64 and np.array_equal(on_torch.numpy().view(np.uint64), expected)


def test_keystream_words_start_at_any_word_and_refuse_bad_ranges():
    key = derive_key(SECRET, "probe")
    whole = keystream_words(key, 0, 200)
    assert whole.shape == (200,) and whole.dtype == np.uint64 and len(set(whole.tolist())) == 200
    assert np.array_equal(whole, _reference_words(key, 0, 200))
    for start in range(0, 40):
        for count in (0, 1, 2, 3, 5, 8, 9, 31):  # inside one block and across blocks
            assert np.array_equal(keystream_words(key, start, count), whole[start:start + count]), (start, count)
    assert not np.array_equal(keystream_words(key + 1, 0, 4), whole[:4])
    for start, count in [(-1, 2), (0, -1), (8 * 2**64 - 1, 2)]:
        with pytest.raises(ValueError, match="keystream words"):
            keystream_words(key, start, count)


def test_keystream_longer_than_one_pass_of_the_zero_buffer():
    """OpenSSL encrypts passes of 4 MiB (2^16 blocks) of a reused zero plaintext: the seam must not show."""
    key = derive_key(SECRET, "long")
    whole = keystream_words(key, 1, (1 << 20) + 1001)  # word w is whole[w - 1]
    for block in (1, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, (1 << 17) + 5):
        assert np.array_equal(whole[8 * block - 1:8 * block + 7], _reference_words(key, 8 * block, 8)), block


def test_the_device_path_picks_the_same_words_for_any_runs():
    """The words of a batch's ranges, from OpenSSL (CPU) and from torch (any other device): the ranges
    share blocks, are a short or a long gap apart, and start and end mid-block."""
    key = derive_key(SECRET, 3, "noise", "w")
    for ranges in ([(0, 1)], [(3, 4)], [(0, 5), (5, 9)], [(1, 3), (6, 7), (7, 30)], [(2, 5), (5000, 5003)],
                   [(9, 10), (2**40 + 3, 2**40 + 17)], [(w, w + 3) for w in range(0, 60, 7)]):
        cpu = _cpu_run_words(key.to_bytes(32, "little"), ranges)
        expected = np.concatenate([_reference_words(key, w0, w1 - w0) for w0, w1 in ranges])
        assert cpu.dtype == torch.int64 and np.array_equal(cpu.numpy().view(np.uint64), expected), ranges
        assert torch.equal(_device_run_words(key, ranges, "cpu"), cpu), ranges
    # the deep stream's word p on a device: block p // 8, word p % 8
    indices = torch.tensor([0, 7, 8, 12345, 2**35 + 3])
    picked = _device_words_at(key, indices)
    assert picked.tolist() == [int(keystream_words(key, p, 1).view(np.int64)[0]) for p in indices.tolist()]


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
    # Rows of odd width: starts of both parities, lengths odd and even.  Runs up to 2^9 blocks (4096
    # elements) apart share one OpenSSL encryptor (the keystream between them is generated and
    # dropped), farther ones get a fresh one: rows of 4099 to 4111 put the runs on both sides of that.
    for width in (9, 4099, 4103, 4111):
        whole = _normal((7, width))
        for start, stop in [(1, 4), (1, 5), (0, 3), (2, 9), (3, 8), (4, 5), (8, 9), (0, 1), (5, 5)]:
            box = (slice(None), slice(start, stop))
            assert torch.equal(_normal((7, width), box), whole[box]), (width, start, stop)
    flat = _normal((101,))
    for start, stop in [(1, 2), (1, 3), (3, 100), (0, 99), (2, 101), (57, 58), (100, 101)]:
        assert torch.equal(_normal((101,), (slice(start, stop),)), flat[start:stop]), (start, stop)
    # runs across the CPU's batches of 2^18 normals
    long = _normal((3 << 18,))
    for start, stop in [((1 << 18) - 3, (1 << 18) + 4), (5, (2 << 18) + 1), ((2 << 18) - 1, 3 << 18)]:
        assert torch.equal(_normal((3 << 18,), (slice(start, stop),)), long[start:stop]), (start, stop)


def test_values_do_not_depend_on_the_number_of_cpu_threads():
    """torch splits the transform's operations over its threads: the same values, bit for bit, also for
    a box whose runs cross the CPU's batches of 2^18 normals."""
    threads = torch.get_num_threads()
    shape, box = (3, (1 << 18) + 5), (slice(None), slice(1, (1 << 18) + 2))
    try:
        torch.set_num_threads(1)
        single = _normal(shape), _normal(shape, box)
        torch.set_num_threads(3)
        several = _normal(shape), _normal(shape, box)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], several[0]) and torch.equal(single[1], several[1])
    assert torch.equal(single[1], single[0][box])


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
    (slice(1, 4), slice(2, 7), slice(1, 3)),  # all three restricted
    (slice(None), slice(3, 5), slice(None)),
    (slice(2, 5), slice(None), slice(0, 1)),
])
def test_a_box_restricting_several_dimensions_is_that_slice_of_the_whole(box):
    """An FSDP shard of a tensor-parallel shard restricts two dimensions."""
    whole = _normal((6, 8, 4))
    assert torch.equal(_normal((6, 8, 4), box), whole[box])


@pytest.mark.parametrize("box", [
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
    assert 2**128 <= derive_key(2**124 - 1, 0) < 2**256  # 256 bits: a ChaCha20 key (false alarm 2^-128)
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


def _log(m: torch.Tensor, scale: int) -> torch.Tensor:
    return _ln(m.clone(), scale, torch.empty((6, len(m)), dtype=torch.float64))


def _cos_sin(j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _sin_cos_turn(j.clone(), torch.empty((5, len(j)), dtype=torch.float64))


def _ulps(got: torch.Tensor, expected) -> np.ndarray:
    """|got - expected| in units of the last place of ``expected`` (float64)."""
    expected = np.asarray(expected, dtype=np.float64)
    return np.abs(got.numpy() - expected) / np.spacing(np.abs(expected))


def test_the_portable_log_is_within_one_ulp_of_libm():
    """ln(m 2^-s) for the integers m = k + 1 that u1 takes, s = 53 (and 106 in the refined bucket),
    against torch's float64 log (glibc's, which is within an ulp itself)."""
    rng = np.random.default_rng(5)
    sqrt2 = 0x6A09E667F3BCD  # the mantissa bits of sqrt(2): the range reduction switches there
    edges = [1, 2, 3, 4, 5, 2**26 + 1, 2**52 - 1, 2**52, 2**52 + 1, 2**53 - 1, 2**53,
             (1 << 52) | sqrt2, ((1 << 52) | sqrt2) + 1, ((1 << 52) | sqrt2) - 1, ((1 << 30) | (sqrt2 >> 22))]
    m = np.concatenate([edges, rng.integers(1, 2**53 + 1, 1 << 18), 2 ** rng.integers(0, 54, 1000)])
    for scale in (53, 106):
        got = _log(torch.from_numpy(m.astype(np.float64)), scale)
        expected = torch.log(torch.from_numpy(m.astype(np.float64)) * 2.0**-scale)
        assert _ulps(got, expected).max() <= 1.0, scale
    assert _log(torch.tensor([2.0**53], dtype=torch.float64), 53).item() == 0.0  # u1 = 1: radius 0
    assert _log(torch.tensor([1.0], dtype=torch.float64), 106).item() == pytest.approx(-106 * math.log(2), rel=1e-16)


def _reference_cos_sin(j: int) -> tuple[float, float]:
    """cos and sin of 2 pi (j + 1/2) / 2^53 to 200 bits, rounded to float64."""
    import mpmath
    with mpmath.workprec(200):
        angle = 2 * mpmath.pi * (mpmath.mpf(j) + mpmath.mpf(0.5)) / mpmath.mpf(2) ** 53
        return float(mpmath.cos(angle)), float(mpmath.sin(angle))


def test_the_portable_sin_and_cos_are_within_two_ulps_and_exactly_symmetric():
    rng = np.random.default_rng(6)
    boundaries = [o * 2**50 + d for o in range(8) for d in (-2, -1, 0, 1) if o * 2**50 + d >= 0]  # octants' edges
    edges = [0, 1, 2**53 - 1, 2**53 - 2] + boundaries
    j = np.array(edges + rng.integers(0, 2**53, 3000).tolist(), dtype=np.int64)
    cos, sin = _cos_sin(torch.from_numpy(j))
    reference = np.array([_reference_cos_sin(int(v)) for v in j])
    assert _ulps(cos, reference[:, 0]).max() <= 2.0 and _ulps(sin, reference[:, 1]).max() <= 2.0
    # The half-step grid is symmetric: j and 2^53 - 1 - j are the angles a and -a, and the octant
    # reduction maps them to the same polynomial input, so cos agrees and sin flips, bit for bit.
    mirror_cos, mirror_sin = _cos_sin(torch.from_numpy(2**53 - 1 - j))
    assert torch.equal(mirror_cos, cos) and torch.equal(mirror_sin, -sin)
    assert (cos.abs() <= 1).all() and (sin.abs() <= 1).all() and (cos * sin != 0).all()


def test_box_muller_is_within_a_few_ulps_of_the_exact_transform():
    """Against r cos(2 pi u2), r sin(2 pi u2), r = sqrt(-2 ln u1), evaluated to 200 bits."""
    import mpmath
    rng = np.random.default_rng(7)
    radius_words, angle_words = rng.integers(-2**63, 2**63, (2, 1000), dtype=np.int64)
    radius_words[:4] = [-1, 0x7FF, -(1 << 62), 1 << 11]  # u1 = 1, the lowest bucket, large and small radii
    out = torch.empty(2000, dtype=torch.float64)
    _box_muller(torch.from_numpy(radius_words), torch.from_numpy(angle_words), out,
                lambda positions: torch.zeros(len(positions), dtype=torch.int64))
    with mpmath.workprec(200):
        expected = []
        for w1, w2 in zip(radius_words.view(np.uint64).tolist(), angle_words.view(np.uint64).tolist()):
            k1, k2 = w1 >> 11, w2 >> 11
            u1 = mpmath.mpf(k1 + 1) / 2**53 if k1 else mpmath.mpf(1) / 2**106  # the deep word 0 refines k1 = 0
            radius = mpmath.sqrt(-2 * mpmath.log(u1))
            angle = 2 * mpmath.pi * (mpmath.mpf(k2) + mpmath.mpf(0.5)) / 2**53
            expected += [float(radius * mpmath.cos(angle)), float(radius * mpmath.sin(angle))]
    expected = np.array(expected)
    nonzero = expected != 0
    assert _ulps(out[torch.from_numpy(nonzero)], expected[nonzero]).max() <= 4.0
    assert (out[torch.from_numpy(~nonzero)] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_is_bit_identical_to_the_cpus():
    """The GPU's keystream (torch integer ops) and the CPU's (OpenSSL) are one ChaCha20 stream, and the
    transform is the same correctly rounded float64 operations on both: every value agrees exactly."""
    cases = [((1000,), None), ((37, 53), None), ((37, 53), (slice(None), slice(3, 40))),
             ((64, 33, 5), (slice(None), slice(1, 30), slice(None))), ((999,), (slice(1, 998),)),
             (((1 << 23) + 7,), None), (((1 << 23) + 7,), (slice(3, (1 << 23) + 5),))]  # two device batches
    for shape, box in cases:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            cpu = keyed_normal(SECRET, 3, "layer.weight", shape, box, dtype=dtype)
            gpu = keyed_normal(SECRET, 3, "layer.weight", shape, box, dtype=dtype, device="cuda")
            assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu), (shape, box, dtype)
    cpu = keyed_normal_slice(SECRET, 9, "w", (48, 20), (slice(None), slice(5, 15)), 7, 333)
    gpu = keyed_normal_slice(SECRET, 9, "w", (48, 20), (slice(None), slice(5, 15)), 7, 333, device="cuda")
    assert torch.equal(gpu.cpu(), cpu)
    key = derive_key(SECRET, "probe")
    for start in (0, 8 * (2**32 - 2) + 3):
        words = device_keystream_words(key, start, 100, "cuda").cpu().numpy().view(np.uint64)
        assert np.array_equal(words, keystream_words(key, start, 100))
