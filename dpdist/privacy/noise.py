"""Counter-based keyed Gaussian noise: the value at a coordinate is a pure function of its address.

The noise on element ``i`` (flat index in the FULL, unsharded parameter) of parameter ``name`` in
release ``r`` depends only on (secret, r, name, i).  So a tensor-parallel shard draws only its own
part, replicas of a replicated parameter draw identical noise, distinct shards get independent noise,
and the parallel layout changes no value.  ``r`` is the release index, the position of the release in
the privacy ledger (not the training step): a step computed twice is two ledger lines, so it draws
fresh noise the second time, since the same noise on two different clipped sums would cancel in their
difference.

The generator is AES-128 in counter mode, keyed per stream by :func:`derive_key` (BLAKE2b keyed by the
secret).  Both are standard pseudorandom functions, so the noise is computationally indistinguishable
from true randomness to anyone without the secret, and AES-NI produces the keystream at several GB/s.
Counter block b (the 128-bit big-endian counter b, starting from an all-zero initial block) gives
keystream words 2b and 2b+1, so any word is reachable without generating the ones before it.
"""
from __future__ import annotations

import hashlib
import math
import operator

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_BLOCK = 16  # bytes per AES block: two 64-bit keystream words, one Box-Muller pair
_WORD = np.dtype("<u8")  # keystream words are read little-endian on every host
_ZEROS = memoryview(np.zeros(1 << 22, np.uint8))  # plaintext: AES-CTR over zeros is the bare keystream
_BATCH = 1 << 20  # normals generated per pass (8 MiB of keystream): fastest on a 2-core CPU
_GAP = 1 << 11  # blocks of keystream (32 KiB) to skip by encrypting rather than by a new encryptor


def derive_key(secret: int, *parts) -> int:
    """A 128-bit key for one stream, e.g. ``derive_key(secret, release, "noise", name)``.

    The secret keys BLAKE2b (a PRF), so the key reveals nothing about it.  Each part is hashed with a
    type tag and a length prefix, so no two different part lists encode to the same bytes (("ab", "c")
    vs ("a", "bc"), 1 vs "1"); integers go through ``operator.index`` so a numpy or torch integer
    keys the same stream as the Python int.
    """
    if not isinstance(secret, int) or not 0 <= secret < 2**128:
        raise ValueError("the secret must be a non-negative integer below 2**128")  # never echo it
    digest = hashlib.blake2b(digest_size=16, key=secret.to_bytes(16, "little"), person=b"dpdist.key")
    for part in parts:
        if isinstance(part, str):
            tag, data = b"s", part.encode()
        elif isinstance(part, bytes):
            tag, data = b"b", part
        else:
            tag, data = b"i", str(operator.index(part)).encode()
        digest.update(tag + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(digest.digest(), "little")


def _ctr(aes: algorithms.AES, block: int):
    """An AES-CTR encryptor whose first keystream block is counter block ``block``."""
    return Cipher(aes, modes.CTR(block.to_bytes(_BLOCK, "big"))).encryptor()


def _encrypt_zeros(encryptor, out: memoryview, nbytes: int) -> None:
    """Write the next ``nbytes`` keystream bytes of ``encryptor`` into ``out`` (which may be longer).

    Callers leave a spare block at the end of ``out``: older releases of cryptography wanted
    ``len(data) + 15`` bytes of room in ``update_into`` (50 wants ``len(data)``).
    """
    for pos in range(0, nbytes, len(_ZEROS)):
        encryptor.update_into(_ZEROS[:min(len(_ZEROS), nbytes - pos)], out[pos:])


def _aes(key: int) -> algorithms.AES:
    return algorithms.AES(key.to_bytes(16, "little"))


def keystream_words(key: int, start: int, count: int) -> np.ndarray:
    """64-bit words ``start .. start+count-1`` of the AES-128-CTR keystream of ``key`` (a 128-bit int).

    Block b encrypts the big-endian counter b and is read as the little-endian words 2b and 2b+1:
    start the counter at block ``start // 2`` and drop the first word if ``start`` is odd.
    """
    start, count = operator.index(start), operator.index(count)
    if start < 0 or count < 0:
        raise ValueError(f"need start >= 0 and count >= 0; got {start}, {count}")
    block, skip = divmod(start, 2)
    blocks = (skip + count + 1) // 2
    words = np.empty(2 * blocks + 2, _WORD)  # one spare block: see _encrypt_zeros
    _encrypt_zeros(_ctr(_aes(key), block), memoryview(words.view(np.uint8)), _BLOCK * blocks)
    return words[skip:skip + count]


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


def _box_muller(words: np.ndarray, out: torch.Tensor, deep_words=None) -> None:
    """Two standard normals per pair of words, into contiguous ``out`` (as long as ``words``).

    Words 2p and 2p+1 give u1 and u2; out[2p] = r cos(2 pi u2) and out[2p+1] = r sin(2 pi u2) with
    r = sqrt(-2 ln u1), two independent N(0, 1), computed in float64 and rounded once on the store
    into ``out``'s dtype.  The transcendental functions run on contiguous buffers of whole pairs, so a
    value never depends on where its pair sits in a batch.

    u1 = (k+1) / 2^53 from the word's top 53 bits k would cut the radius at sqrt(106 ln 2) = 8.57, a
    tail of 2^-53 per pair that over a large model's run (10^11 pairs and more) costs a delta far
    above any delta a user asks for (README: "The Gaussian's truncated tail").  So the lowest bucket,
    k = 0, that is u1 in (0, 2^-53], is refined with 53 more bits: ``deep_words(pairs)`` gives a word
    for each listed pair (from another keyed stream), and u1 = (k'+1) / 2^106.  The radius then
    reaches sqrt(212 ln 2) = 12.12, and the tail beyond it has mass 2^-106 per pair.
    """
    words >>= np.uint64(11)  # 53 random bits: every k / 2^53 is an exact double
    bits = words.view(np.int64)
    u1 = torch.from_numpy(bits[0::2].astype(np.float64))
    u2 = torch.from_numpy(bits[1::2].astype(np.float64))
    u1.add_(1.0).mul_(2.0**-53)  # u1 = (k+1) / 2^53 in (0, 1]: no log(0)
    lowest = np.flatnonzero(bits[0::2] == 0)
    if lowest.size:  # probability 2^-53 per pair: the cost is nil
        if deep_words is None:
            raise ValueError("a pair in the lowest u1 bucket needs deep_words to refine it")
        deep = (deep_words(lowest) >> np.uint64(11)).view(np.int64).astype(np.float64)
        u1[torch.from_numpy(lowest)] = torch.from_numpy(deep).add_(1.0).mul_(2.0**-106)
    radius = u1.log_().mul_(-2.0).sqrt_()
    angle = u2.mul_(2 * math.pi * 2.0**-53)  # angle 2 pi u2, u2 = k / 2^53 in [0, 1)
    pairs = out.view(-1, 2)
    torch.mul(torch.sin(angle), radius, out=pairs[:, 1])
    torch.mul(angle.cos_(), radius, out=pairs[:, 0])


def keyed_normal(secret: int, release: int, name: str, full_shape: tuple[int, ...],
                 box: tuple[slice, ...] | None = None, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal noise for the sub-box ``box`` of parameter ``name`` (of shape ``full_shape``).

    ``box=None`` is the whole tensor; otherwise one dimension may be a ``slice(start, stop)`` and the
    others full, as a tensor-parallel shard is.  Elements 2p and 2p+1 of the full tensor are the
    Box-Muller pair (float64) of keystream block p; a run that starts or ends inside a pair draws the
    whole pair and drops the other half, so any box equals the same slice of the whole, bit for bit.
    """
    runs, shape = _flat_runs(tuple(int(n) for n in full_shape), box)
    return keyed_normal_runs(secret, release, name, runs, dtype).view(shape).to(device=device)


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
    return keyed_normal_runs(secret, release, name, picked, dtype).to(device=device)


def keyed_normal_runs(secret: int, release: int, name: str, runs: list[tuple[int, int]],
                      dtype=torch.float64) -> torch.Tensor:
    """Noise of the flat index runs ``(start, length)`` of parameter ``name``, concatenated: float64
    values rounded to ``dtype`` (written straight into a ``dtype`` buffer, saving a conversion pass)."""
    aes = _aes(derive_key(secret, release, "noise", name))
    deep_key = derive_key(secret, release, "noise-deep", name)  # refines the rare lowest u1 (``_box_muller``)
    out = torch.empty(sum(length for _, length in runs), dtype=dtype)
    gap = memoryview(np.empty(_BLOCK * (_GAP + 1), np.uint8))  # discarded keystream between runs
    filled = 0
    for batch in _batches(runs, _BATCH):
        count = sum(length for _, length in batch)
        pairs = [(start // 2, (start + length + 1) // 2) for start, length in batch]  # covering pairs [p0, p1)
        total = sum(p1 - p0 for p0, p1 in pairs)
        words = np.empty(2 * total + 2, _WORD)  # one spare block: see _encrypt_zeros
        view, drop, pos = memoryview(words.view(np.uint8)), [], 0
        encryptor, at = None, 0  # ``at``: the counter block the encryptor emits next
        for (start, length), (p0, p1) in zip(batch, pairs):
            if encryptor is None or not at <= p0 <= at + _GAP:
                encryptor = _ctr(aes, p0)
            elif p0 > at:  # a short gap between runs: running through it is cheaper than a new encryptor
                _encrypt_zeros(encryptor, gap, _BLOCK * (p0 - at))
            _encrypt_zeros(encryptor, view[_BLOCK * pos:], _BLOCK * (p1 - p0))
            at = p1
            if start % 2:
                drop.append(2 * pos)  # the run starts at the second half of its first pair
            pos += p1 - p0
            if (start + length) % 2:
                drop.append(2 * pos - 1)  # and ends at the first half of its last pair

        def deep_words(positions: np.ndarray, pairs=pairs) -> np.ndarray:
            """Word p of the deep stream for each pair, p its index in the full tensor, so that a refined
            value is the same whatever batch or shard draws it."""
            return np.array([keystream_words(deep_key, p, 1)[0] for p in pair_indices(pairs, positions)], dtype=_WORD)

        if not drop:
            _box_muller(words[:-2], out[filled:filled + count], deep_words)
        else:
            normals = torch.empty(2 * total, dtype=torch.float64)
            _box_muller(words[:-2], normals, deep_words)
            keep = torch.ones(2 * total, dtype=torch.bool)
            keep[drop] = False
            out[filled:filled + count] = normals[keep]
        filled += count
    return out
