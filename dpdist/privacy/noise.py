"""Counter-based keyed Gaussian noise: the value at a coordinate is a pure function of its address.

The noise on element ``i`` (flat index in the FULL, unsharded parameter) of parameter ``name`` in
release ``r`` depends only on (secret, r, name, i).  So a tensor-parallel shard draws only its own
part, replicas of a replicated parameter draw identical noise, distinct shards get independent noise,
and the parallel layout changes no value.  ``r`` is the release index, the position of the release in
the privacy ledger (not the training step): a step computed twice is two ledger lines, so it draws
fresh noise the second time, since the same noise on two different clipped sums would cancel in their
difference.

The generator is ChaCha20 (RFC 8439's block function) keyed per stream by :func:`derive_key` (BLAKE2b
keyed by the secret).  Both are standard pseudorandom functions, so the noise is computationally
indistinguishable from true randomness to anyone without the secret.  Block b of a stream is the
block function at the 64-bit counter b (state words 12 and 13, little-endian) with a zero nonce
(words 14 and 15); it is read as the little-endian 64-bit keystream words 8b .. 8b+7, so any word is
reachable without generating the ones before it.  Elements 2p and 2p+1 of a parameter are the
Box-Muller pair of word p of its radius stream (``derive_key(secret, r, "noise", name)``) and word p
of its angle stream (``"noise-angle"``).

The keystream has two implementations that give the same bits: OpenSSL's (through ``cryptography``)
on the CPU, and :func:`_chacha_blocks`, torch integer operations, on any other device, so a CUDA run
generates its noise where its parameters live.  The uniforms become normals by :func:`_box_muller`,
one sequence of correctly rounded float64 operations (no libm call, no fused operation) that runs
unchanged on either device: the noise is bit-identical on CPU and GPU (docs/noise.md).
"""
from __future__ import annotations

import hashlib
import math
import operator

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_WORD = np.dtype("<u8")  # keystream words are read little-endian on every host
_WORDS_PER_BLOCK = 8  # a ChaCha20 block is 64 bytes: eight 64-bit words, four Box-Muller pairs
_OPENSSL_SPAN = 1 << 32  # OpenSSL's counter is the 32-bit word 12 alone: it may not cross a multiple of this
_ZEROS = memoryview(np.zeros(1 << 22, np.uint8))  # plaintext: ChaCha20 over zeros is the bare keystream
_CPU_BATCH = 1 << 18  # normals per pass on the CPU: ~10 MiB of temporaries, in the L3 cache
_DEVICE_BATCH = 1 << 23  # normals per pass elsewhere: few kernel launches, bounded memory (~0.5 GiB)
_GAP = 1 << 9  # blocks (32 KiB) of keystream to run through rather than start a new OpenSSL encryptor
_M32 = 0xFFFFFFFF
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


def derive_key(secret: int, *parts) -> int:
    """A 256-bit key for one stream, e.g. ``derive_key(secret, release, "noise", name)``.

    The secret keys BLAKE2b (a PRF), so the key reveals nothing about it.  Each part is hashed with a
    type tag and a length prefix, so no two different part lists encode to the same bytes (("ab", "c")
    vs ("a", "bc"), 1 vs "1"); integers go through ``operator.index`` so a numpy or torch integer
    keys the same stream as the Python int.
    """
    if not isinstance(secret, int) or not 0 <= secret < 2**128:
        raise ValueError("the secret must be a non-negative integer below 2**128")  # never echo it
    digest = hashlib.blake2b(digest_size=32, key=secret.to_bytes(16, "little"), person=b"dpdist.key")
    for part in parts:
        if isinstance(part, str):
            tag, data = b"s", part.encode()
        elif isinstance(part, bytes):
            tag, data = b"b", part
        else:
            tag, data = b"i", str(operator.index(part)).encode()
        digest.update(tag + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(digest.digest(), "little")


# ---------------------------------------------------------------------------------------------------
# The keystream on the CPU: OpenSSL.

def _openssl_blocks(key: bytes, first: int, count: int, out: memoryview) -> None:
    """Blocks ``first .. first+count-1`` into ``out`` (64 bytes each).

    ``cryptography`` passes its 16-byte nonce to OpenSSL as RFC 8439 lays it out: word 12, the 32-bit
    block counter, then words 13-15.  Our 64-bit counter puts the low half in word 12 and the high half
    in word 13; ``cryptography`` refuses a run that would carry out of word 12, so runs are split at
    every multiple of 2^32 blocks and each piece starts a fresh encryptor with word 13 set.
    """
    pos = 0
    while count:
        take = min(count, _OPENSSL_SPAN - first % _OPENSSL_SPAN)
        encryptor = Cipher(algorithms.ChaCha20(key, first.to_bytes(8, "little") + bytes(8)), mode=None).encryptor()
        nbytes = 64 * take
        for at in range(0, nbytes, len(_ZEROS)):
            encryptor.update_into(_ZEROS[:min(len(_ZEROS), nbytes - at)], out[pos + at:])
        first, count, pos = first + take, count - take, pos + nbytes


def _check_range(start: int, count: int) -> tuple[int, int]:
    start, count = operator.index(start), operator.index(count)
    if start < 0 or count < 0 or start + count > _WORDS_PER_BLOCK << 64:
        raise ValueError(f"need 0 <= start and 0 <= count with start + count <= 2^67 keystream words; "
                         f"got {start}, {count}")
    return start, count


def keystream_words(key: int, start: int, count: int) -> np.ndarray:
    """64-bit words ``start .. start+count-1`` of the ChaCha20 keystream of ``key`` (a 256-bit int)."""
    start, count = _check_range(start, count)
    first, skip = divmod(start, _WORDS_PER_BLOCK)
    blocks = -(-(skip + count) // _WORDS_PER_BLOCK)
    words = np.empty(_WORDS_PER_BLOCK * blocks, _WORD)
    _openssl_blocks(key.to_bytes(32, "little"), first, blocks, memoryview(words.view(np.uint8)))
    return words[skip:skip + count]


# ---------------------------------------------------------------------------------------------------
# The same keystream on any device: torch integer operations, vectorised over block counters.  Each
# 32-bit state word sits in an int64 lane in [0, 2^32); sums are masked back, so every operation is
# exact integer arithmetic on every device.

def _rotl(x: torch.Tensor, r: int) -> None:
    """Rotate each 32-bit lane of ``x`` left by ``r`` (in place)."""
    low = x >> (32 - r)
    x.bitwise_left_shift_(r).bitwise_and_(_M32).bitwise_or_(low)


def _quarter_rounds(a, b, c, d) -> None:
    """RFC 8439's quarter round on four rows of the state at once (in place)."""
    for x, y, z, r in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
        x.add_(y).bitwise_and_(_M32)  # x += y mod 2^32
        z.bitwise_xor_(x)
        _rotl(z, r)


def _chacha_blocks(key: int, counters: torch.Tensor, nonce: int = 0) -> torch.Tensor:
    """The ChaCha20 blocks at the 64-bit ``counters`` (int64, any device): shape (n, 16), the 32-bit
    output words in int64 lanes.  ``nonce`` fills words 14 and 15 (the keystream uses 0; RFC 8439's
    test vectors use others)."""
    device = counters.device
    key_words = np.frombuffer(key.to_bytes(32, "little"), "<u4").tolist()
    fixed = torch.tensor([*_SIGMA, *key_words, 0, 0, nonce & _M32, nonce >> 32], dtype=torch.int64, device=device)
    initial = fixed.view(16, 1).repeat(1, counters.numel())
    initial[12] = counters & _M32
    initial[13] = (counters >> 32) & _M32
    x = initial.clone()
    diagonal = torch.tensor([0, 1, 2, 3, 5, 6, 7, 4, 10, 11, 8, 9, 15, 12, 13, 14], device=device)
    for _ in range(10):
        _quarter_rounds(x[0:4], x[4:8], x[8:12], x[12:16])  # column round
        y = x[diagonal]  # diagonal round: rows 1-3 turned left by 1, 2 and 3
        _quarter_rounds(y[0:4], y[4:8], y[8:12], y[12:16])
        x[diagonal] = y
    x += initial
    x &= _M32
    return x.t()


def _device_words(key: int, blocks: torch.Tensor) -> torch.Tensor:
    """The keystream words of ``blocks`` (int64 counters), shape (n, 8), as int64 two's complement."""
    out = _chacha_blocks(key, blocks)
    return out[:, 0::2] | (out[:, 1::2] << 32)


def _device_words_at(key: int, indices: torch.Tensor) -> torch.Tensor:
    """Keystream word w for each w in ``indices`` (int64, any device): only the blocks holding them."""
    return _device_words(key, indices // _WORDS_PER_BLOCK).gather(1, (indices % _WORDS_PER_BLOCK).view(-1, 1)).view(-1)


def device_keystream_words(key: int, start: int, count: int, device) -> torch.Tensor:
    """:func:`keystream_words` computed on ``device`` by torch, as int64 (the same 64 bits)."""
    start, count = _check_range(start, count)
    first, skip = divmod(start, _WORDS_PER_BLOCK)
    blocks = -(-(skip + count) // _WORDS_PER_BLOCK)
    counters = torch.arange(blocks, dtype=torch.int64, device=device)
    if first:
        counters += first - 2**64 if first >= 2**63 else first  # int64 lanes hold the counter's two's complement
    return _device_words(key, counters).reshape(-1)[skip:skip + count]


# ---------------------------------------------------------------------------------------------------
# Uniforms to normals with correctly rounded float64 operations only (+ - * / sqrt, comparisons, bit
# operations on the representation): each is exact or rounded once to nearest on every IEEE device,
# so the same sequence gives the same bits on CPU and GPU.  libm's log/sin/cos are not correctly
# rounded and differ between implementations (glibc, Sleef, CUDA); fused multiply-adds round once
# where the plain sequence rounds twice.  None is used.  Scalars multiply but never divide: CUDA
# divides by a scalar through its reciprocal.

_MASK53 = (1 << 53) - 1
_ABOVE_SQRT2 = (1 << 52) - 0x6A09E667F3BCD  # 2^52 less the mantissa bits of sqrt(2)
# fdlibm's e_log.c: ln 2 split so that k * _LN2_HI is exact for |k| < 2^20, and its minimax polynomial.
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, 2.222219843214978396e-01,
       1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01)
# fdlibm's k_sin.c and k_cos.c: minimax polynomials for sin and cos on [-pi/4, pi/4].
_S = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
      2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_C = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
      -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)
_OCTANT = (math.pi / 4) * 2.0**-51  # (2g + 1) * this = (pi / 4) (g + 1/2) / 2^50, the angle within an octant
_TWO52 = 2.0**52
_TWO52_BITS = 0x4330000000000000  # the bits of 2^52: OR-ing an integer below 2^52 in gives 2^52 + it


def _ln(m: torch.Tensor, scale: int, work: torch.Tensor) -> torch.Tensor:
    """ln(m 2^-scale) for float64 integers ``m`` >= 1, to within one ulp (fdlibm's ``__ieee754_log``).

    m = 2^e x with x in [sqrt(2)/2, sqrt(2)), e read off the bits; ln x = 2 atanh(f / (2 + f)), f = x - 1
    (exact), by fdlibm's minimax polynomial.  ``m`` is overwritten; ``work`` is 6 float64 rows of
    m's length (every step writes into it: fresh temporaries would cost more than the arithmetic).
    Returns work[0].
    """
    k, s, z, w, p1, p2 = work
    # Adding _ABOVE_SQRT2 to the bits carries into the exponent field iff the mantissa is >= sqrt(2)'s:
    # the field then holds E = e + 1023 with x = m 2^-e in [sqrt(2)/2, sqrt(2)).
    biased = torch.add(m.view(torch.int64), _ABOVE_SQRT2, out=p1.view(torch.int64)).bitwise_right_shift_(52)
    k.copy_(biased).sub_(1023 + scale)  # e - scale: a small integer, exact
    # x = m 2^-e, the power of two built from its bits (2046 - E = (E ^ 2047) - 1 for E < 2048): exact.
    m.mul_(biased.bitwise_xor_(2047).sub_(1).bitwise_left_shift_(52).view(torch.float64))
    f = m.sub_(1.0)
    torch.div(f, torch.add(f, 2.0, out=s), out=s)
    torch.mul(s, s, out=z)
    torch.mul(z, z, out=w)
    t1 = torch.mul(w, _LG[5], out=p1).add_(_LG[3]).mul_(w).add_(_LG[1]).mul_(w)
    t2 = torch.mul(w, _LG[6], out=p2).add_(_LG[4]).mul_(w).add_(_LG[2]).mul_(w).add_(_LG[0]).mul_(z)
    hfsq = torch.mul(f, f, out=z).mul_(0.5)
    r = t2.add_(t1).add_(hfsq).mul_(s).add_(torch.mul(k, _LN2_LO, out=t1))  # s (hfsq + R) + k ln2_lo
    return k.mul_(_LN2_HI).sub_(hfsq.sub_(r).sub_(f))  # k ln2_hi - ((hfsq - (s (hfsq + R) + k ln2_lo)) - f)


def _sin_cos_turn(j: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2 pi (j + 1/2) / 2^53 for int64 ``j`` in [0, 2^53), each within two ulps.

    The top 3 bits of j are the octant; the angle within it, (pi / 4) (g + 1/2) / 2^50, is mirrored
    in odd octants (g -> 2^50 - 1 - g, exact) so that it lies in (0, pi/4), where fdlibm's kernels
    take it.  The grid's half step makes the angle's distribution symmetric under every reflection
    of the circle.  ``j`` is overwritten; ``work`` is 5 float64 rows of j's length.  Returns
    (cos, sin), work[0] and work[1].
    """
    cos, sin, octant, z, v = work
    octant = torch.bitwise_right_shift(j, 50, out=octant.view(torch.int64))
    mirror = torch.bitwise_left_shift(octant, 63, out=v.view(torch.int64)).bitwise_right_shift_(63)  # -1 if odd
    j.bitwise_and_((1 << 50) - 1).bitwise_xor_(mirror.bitwise_and_((1 << 50) - 1))
    x = j.bitwise_left_shift_(1).bitwise_or_(_TWO52_BITS | 1).view(torch.float64).sub_(_TWO52).mul_(_OCTANT)
    torch.mul(x, x, out=z)
    torch.mul(z, _S[5], out=sin).add_(_S[4]).mul_(z).add_(_S[3]).mul_(z).add_(_S[2]).mul_(z).add_(_S[1])
    sin.mul_(z).add_(_S[0]).mul_(torch.mul(z, x, out=v)).add_(x)  # x + x^3 (S1 + z r)
    torch.mul(z, _C[5], out=cos).add_(_C[4]).mul_(z).add_(_C[3]).mul_(z).add_(_C[2]).mul_(z).add_(_C[1])
    cos.mul_(z).add_(_C[0]).mul_(z).mul_(z)  # z (z r): the polynomial's part beyond 1 - z/2
    torch.mul(z, 0.5, out=v).sub_(cos)  # z/2 - z^2 r
    torch.mul(v, -1.0, out=cos).add_(1.0)  # 1 - (z/2 - z^2 r); the product by -1 is exact
    # Octants 1, 2, 5, 6 swap cos and sin, octants 2-5 negate cos and 4-7 negate sin: bit operations
    # on the representation (a swap and a sign flip are exact).
    c, s, o = cos.view(torch.int64), sin.view(torch.int64), octant
    swap = torch.add(o, 1, out=x.view(torch.int64)).bitwise_left_shift_(62).bitwise_right_shift_(63)  # -1 if bit 1
    differ = torch.bitwise_xor(c, s, out=v.view(torch.int64)).bitwise_and_(swap)
    c ^= differ
    s ^= differ
    c ^= torch.add(o, 2, out=swap).bitwise_right_shift_(2).bitwise_left_shift_(63)  # bit 2 of o + 2: octants 2-5
    s ^= o.bitwise_right_shift_(2).bitwise_left_shift_(63)
    return cos, sin


def _box_muller(radius_words: torch.Tensor, angle_words: torch.Tensor, out: torch.Tensor, deep_words=None,
                work: torch.Tensor | None = None) -> None:
    """Two standard normals per pair, into contiguous ``out`` (twice as long as the word tensors).

    Pair p takes 64-bit keystream words (int64, two's complement) from two streams: u1 from the top 53
    bits k1 of ``radius_words[p]``, u2 from those (k2) of ``angle_words[p]``.  out[2p] = r cos(2 pi u2)
    and out[2p+1] = r sin(2 pi u2) with r = sqrt(-2 ln u1), two independent N(0, 1), computed in
    float64 by :func:`_ln` and :func:`_sin_cos_turn` and rounded once on the store into ``out``'s
    dtype.  u1 = (k1 + 1) / 2^53 and u2 = (k2 + 1/2) / 2^53.  Every operation is elementwise, so a
    value never depends on where its pair sits in a batch.  ``work`` (float64, 7 rows of at least one
    per pair) is reused from batch to batch.

    u1 = (k1+1) / 2^53 would cut the radius at sqrt(106 ln 2) = 8.57, a tail of 2^-53 per pair that
    over a large model's run (10^11 pairs and more) costs a delta far above any delta a user asks for
    (README: "The Gaussian's truncated tail").  So the lowest bucket, k1 = 0, that is u1 in
    (0, 2^-53], is refined with 53 more bits: ``deep_words(positions)`` gives a word (int64, on
    the words' device) for each pair at those batch positions (from a third keyed stream), and
    u1 = (k'+1) / 2^106.  The radius then reaches sqrt(212 ln 2) = 12.12, and the tail beyond it has
    mass 2^-106 per pair.
    """
    n = radius_words.numel()
    work = _workspace(n, radius_words.device) if work is None else work[:, :n]
    m, rows = work[0], work[1:]
    k1 = torch.bitwise_right_shift(radius_words, 11, out=rows[0].view(torch.int64)).bitwise_and_(_MASK53)
    refine = bool(k1.min() == 0)  # probability 2^-53 per pair: the cost is nil
    lowest = torch.nonzero(k1 == 0).view(-1) if refine else None
    radius = _ln(m.copy_(k1).add_(1.0), 53, rows[:6])  # k1 + 1 <= 2^53: exact
    if refine:
        if deep_words is None:
            raise ValueError("a pair in the lowest u1 bucket needs deep_words to refine it")
        deep = (deep_words(lowest) >> 11).bitwise_and_(_MASK53).add_(1).to(torch.float64)
        radius[lowest] = _ln(deep, 106, torch.empty((6, len(deep)), dtype=torch.float64, device=deep.device))
    radius.mul_(-2.0).sqrt_()
    j = torch.bitwise_right_shift(angle_words, 11, out=m.view(torch.int64)).bitwise_and_(_MASK53)
    cos, sin = _sin_cos_turn(j, rows[1:6])
    pairs = out.view(-1, 2)
    pairs[:, 0].copy_(cos.mul_(radius))
    pairs[:, 1].copy_(sin.mul_(radius))


def _workspace(pairs: int, device) -> torch.Tensor:
    """Scratch rows for :func:`_box_muller`: 7 float64 rows of ``pairs``."""
    return torch.empty((7, pairs), dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------------------------------
# Boxes, runs and batches.

def _flat_runs(full_shape: tuple[int, ...], box) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """The contiguous runs (start, length) of flat indices that ``box`` covers, in its row-major order,
    and the box's shape.  A box may restrict any dimensions (a tensor-parallel shard restricts one, an
    FSDP shard of it one more): each run spans the innermost restricted dimension's range and every
    dimension inside it."""
    if box is None:
        return [(0, math.prod(full_shape))], full_shape
    if len(box) != len(full_shape) or not all(isinstance(s, slice) for s in box):
        raise ValueError(f"box must be a tuple of {len(full_shape)} slices for shape {full_shape}; got {box!r}")
    bounds = []
    for s, n in zip(box, full_shape):
        start = 0 if s.start is None else operator.index(s.start)  # a plain int, never a float
        stop = n if s.stop is None else operator.index(s.stop)
        if s.step not in (None, 1) or not 0 <= start <= stop <= n:
            raise ValueError(f"box {box!r} is not a contiguous in-range slice of shape {full_shape}")
        bounds.append((start, stop))
    shape = tuple(stop - start for start, stop in bounds)
    restricted = [k for k, (b, n) in enumerate(zip(bounds, full_shape)) if b != (0, n)]
    if not restricted:
        return [(0, math.prod(full_shape))], full_shape
    k = restricted[-1]
    strides = [math.prod(full_shape[d + 1:]) for d in range(len(full_shape))]
    length = shape[k] * strides[k]
    starts = np.full((), bounds[k][0] * strides[k], dtype=np.int64)
    for d in range(k):  # every index combination of the dimensions outside the run, row-major
        starts = starts[..., None] + np.arange(*bounds[d], dtype=np.int64) * strides[d]
    return [(int(start), length) for start in starts.reshape(-1)], shape


def _batches(runs: list[tuple[int, int]], size: int):
    """Regroup runs into batches of at most ``size`` elements: a cache-sized working set and bounded
    memory for huge parameters, and few Box-Muller passes for many short runs."""
    batch, filled = [], 0
    for start, length in runs:
        while length:
            take = min(length, size - filled)
            batch.append((start, take))
            start, length, filled = start + take, length - take, filled + take
            if filled == size:
                yield batch
                batch, filled = [], 0
    if batch:
        yield batch


def pair_indices(pairs: list[tuple[int, int]], positions: np.ndarray) -> list[int]:
    """The index in the full tensor of the pairs at ``positions`` of a batch that concatenates the pair
    ranges ``[p0, p1)`` of ``pairs``."""
    firsts = np.cumsum([0] + [p1 - p0 for p0, p1 in pairs])  # batch position of each range's first pair
    ranges = np.searchsorted(firsts, positions, side="right") - 1
    return [pairs[r][0] + int(position - firsts[r]) for r, position in zip(ranges, positions)]


def _cpu_run_words(key: bytes, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Words [w0, w1) of each range, concatenated, from OpenSSL.  Ranges a short gap apart share one
    encryptor (running through the gap is cheaper than starting a new one)."""
    spans = []  # [first block, end block, the ranges it serves]
    for w0, w1 in ranges:
        b0, b1 = w0 // _WORDS_PER_BLOCK, -(-w1 // _WORDS_PER_BLOCK)
        if spans and spans[-1][0] <= b0 <= spans[-1][1] + _GAP:
            spans[-1][1] = max(spans[-1][1], b1)
        else:
            spans.append([b0, b1, []])
        spans[-1][2].append((w0, w1))
    pieces = []
    for b0, b1, served in spans:
        words = np.empty(_WORDS_PER_BLOCK * (b1 - b0), _WORD)
        _openssl_blocks(key, b0, b1 - b0, memoryview(words.view(np.uint8)))
        pieces += [words[w0 - _WORDS_PER_BLOCK * b0:w1 - _WORDS_PER_BLOCK * b0] for w0, w1 in served]
    words = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return torch.from_numpy(words.view(np.int64))


def _device_run_words(key: int, ranges: list[tuple[int, int]], device) -> torch.Tensor:
    """Words [w0, w1) of each range, concatenated, computed on ``device``: each range's blocks once,
    then the words picked by index."""
    firsts, lengths, shifts, total = [], [], [], 0
    for w0, w1 in ranges:
        b0, b1 = w0 // _WORDS_PER_BLOCK, -(-w1 // _WORDS_PER_BLOCK)
        firsts.append(b0)
        lengths.append(b1 - b0)
        shifts.append(_WORDS_PER_BLOCK * (total - b0))  # word w of the stream sits at w + shift
        total += b1 - b0
    lengths_t = torch.tensor(lengths, device=device)
    starts = torch.tensor(firsts, dtype=torch.int64, device=device) - torch.tensor(
        np.cumsum([0] + lengths[:-1]), dtype=torch.int64, device=device)
    counters = torch.arange(total, dtype=torch.int64, device=device) + torch.repeat_interleave(starts, lengths_t)
    words = _device_words(key, counters).reshape(-1)
    if len(ranges) == 1:
        (w0, w1), = ranges
        return words[w0 + shifts[0]:w1 + shifts[0]]
    counts = torch.tensor([w1 - w0 for w0, w1 in ranges], device=device)
    first = torch.tensor([w0 + shift for (w0, _), shift in zip(ranges, shifts)], dtype=torch.int64, device=device)
    firsts_out = torch.cumsum(counts, 0) - counts  # where each range starts in the output
    within = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(firsts_out, counts)
    return words[within + torch.repeat_interleave(first, counts)]


# ---------------------------------------------------------------------------------------------------
# The public entry points.

def keyed_normal(secret: int, release: int, name: str, full_shape: tuple[int, ...],
                 box: tuple[slice, ...] | None = None, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal noise for the sub-box ``box`` of parameter ``name`` (of shape ``full_shape``),
    generated on ``device``.

    ``box=None`` is the whole tensor; otherwise one dimension may be a ``slice(start, stop)`` and the
    others full, as a tensor-parallel shard is.  Elements 2p and 2p+1 of the full tensor are the
    Box-Muller pair (float64) of word p of two keystreams; a run that starts or ends inside a pair
    draws the whole pair and drops the other half, so any box equals the same slice of the whole, bit
    for bit, on any device.
    """
    runs, shape = _flat_runs(tuple(int(n) for n in full_shape), box)
    return keyed_normal_runs(secret, release, name, runs, dtype, device=device).view(shape)


def keyed_normal_slice(secret: int, release: int, name: str, full_shape: tuple[int, ...], box, start: int,
                       stop: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Elements ``start:stop`` of ``keyed_normal(..., box).reshape(-1)``, drawing only those.

    A ZeRO optimizer partition holds such a flat range of a (shard of a) parameter: its owner draws
    exactly the noise the whole parameter would carry there, so partitioning changes no value.
    """
    runs, shape = _flat_runs(tuple(int(n) for n in full_shape), box)
    if not 0 <= start <= stop <= math.prod(shape):
        raise ValueError(f"flat range {start}:{stop} is outside a box of {math.prod(shape)} elements")
    picked, offset = [], 0
    for run_start, length in runs:  # the box's runs, in its own (row-major) order
        lo, hi = max(start, offset), min(stop, offset + length)
        if lo < hi:
            picked.append((run_start + lo - offset, hi - lo))
        offset += length
    return keyed_normal_runs(secret, release, name, picked, dtype, device=device)


def keyed_normal_runs(secret: int, release: int, name: str, runs: list[tuple[int, int]],
                      dtype=torch.float64, *, device="cpu") -> torch.Tensor:
    """Noise of the flat index runs ``(start, length)`` of parameter ``name``, concatenated, generated
    on ``device``: float64 values rounded to ``dtype`` (written straight into a ``dtype`` buffer,
    saving a conversion pass).  On the CPU the keystream comes from OpenSSL, elsewhere from
    :func:`_chacha_blocks` on the device; the transform is the same code on both."""
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    keys = [derive_key(secret, release, stream, name) for stream in ("noise", "noise-angle")]  # u1's and u2's
    deep_key = derive_key(secret, release, "noise-deep", name)  # refines the rare lowest u1 (``_box_muller``)
    out = torch.empty(sum(length for _, length in runs), dtype=dtype, device=device)
    filled, work = 0, _workspace(0, device)
    for batch in _batches(runs, _CPU_BATCH if on_cpu else _DEVICE_BATCH):
        count = sum(length for _, length in batch)
        pairs = [(start // 2, (start + length + 1) // 2) for start, length in batch]  # covering pairs [p0, p1)
        if on_cpu:
            radius_words, angle_words = (_cpu_run_words(key.to_bytes(32, "little"), pairs) for key in keys)
        else:
            radius_words, angle_words = (_device_run_words(key, pairs, device) for key in keys)
        if work.shape[1] < radius_words.numel():
            work = _workspace(radius_words.numel(), device)  # reused by the batches that follow

        def deep_words(positions: torch.Tensor, pairs=pairs) -> torch.Tensor:
            """Word p of the deep stream for each pair, p its index in the full tensor, so that a refined
            value is the same whatever batch, shard or device draws it."""
            indices = pair_indices(pairs, positions.cpu().numpy())
            if on_cpu:
                words = np.concatenate([keystream_words(deep_key, p, 1) for p in indices])
                return torch.from_numpy(words.view(np.int64))
            return _device_words_at(deep_key, torch.tensor(indices, dtype=torch.int64, device=device))

        if count == 2 * radius_words.numel():  # every run starts and ends on a pair boundary
            _box_muller(radius_words, angle_words, out[filled:filled + count], deep_words, work)
        else:
            normals = torch.empty(2 * radius_words.numel(), dtype=torch.float64, device=device)
            _box_muller(radius_words, angle_words, normals, deep_words, work)
            keep = torch.ones(normals.numel(), dtype=torch.bool)
            pos = 0
            for (start, length), (p0, p1) in zip(batch, pairs):
                keep[2 * pos] = start % 2 == 0  # the run starts at the second half of its first pair
                pos += p1 - p0
                keep[2 * pos - 1] = (start + length) % 2 == 0  # and ends at the first half of its last pair
            out[filled:filled + count] = normals[keep.to(device)]
        filled += count
    return out
