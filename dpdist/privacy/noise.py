"""Counter-based keyed Gaussian noise: the value at a coordinate is a pure function of its address.

The noise on element ``i`` (flat index in the FULL, unsharded parameter) of parameter ``name`` at step
``t`` depends only on (secret, t, name, i).  So a tensor-parallel shard draws only its own part,
replicas of a replicated parameter draw identical noise, distinct shards get independent noise, and
neither the parallel layout nor a crash/resume changes a single value: a replayed step releases the
same noise again, never a fresh draw.
"""
from __future__ import annotations

import hashlib
import math
import operator

import numpy as np
import torch

_WORDS_PER_BLOCK = 4  # Philox-4x64 emits four 64-bit words per counter value
_BATCH = 1 << 20  # normals generated per pass (16 MiB of words): fastest on a 2-core CPU


def derive_key(secret: int, *parts) -> int:
    """A 128-bit key for one stream, e.g. ``derive_key(secret, step, "noise", name)``.

    The secret keys BLAKE2b (a PRF), so the key reveals nothing about it.  Each part is hashed with a
    type tag and a length prefix, so no two different part lists encode to the same bytes (("ab", "c")
    vs ("a", "bc"), 1 vs "1"); integers go through ``operator.index`` so a numpy or torch integer
    step keys the same stream as the Python int.
    """
    if not isinstance(secret, int) or not 0 <= secret < 2**128:
        raise ValueError(f"the secret must be a non-negative integer below 2**128; got {secret!r}")
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


def philox_words(bitgen: np.random.Philox, start: int, count: int) -> np.ndarray:
    """Raw 64-bit words ``start .. start+count-1`` of ``bitgen``'s stream, wherever it stood before.

    Philox-4x64 emits counter block b as words 4b .. 4b+3: set the counter to the block holding
    ``start`` and drop the words before it.  (``advance(d)`` counts blocks too, not words, and is
    relative to the current position; setting the counter is absolute and several times cheaper than
    creating a fresh generator per run of a shard.)
    """
    state = bitgen.state
    state["state"]["counter"][:] = (start // _WORDS_PER_BLOCK, 0, 0, 0)
    state["buffer_pos"] = _WORDS_PER_BLOCK  # nothing buffered: the next word starts a block
    bitgen.state = state
    skip = start % _WORDS_PER_BLOCK
    return bitgen.random_raw(skip + count)[skip:]


def _flat_runs(full_shape: tuple[int, ...], box) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """The contiguous runs (start, length) of flat indices that ``box`` covers, and the box's shape."""
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
    restricted = [k for k, (b, n) in enumerate(zip(bounds, full_shape)) if b != (0, n)]
    if not restricted:
        return [(0, math.prod(full_shape))], full_shape
    if len(restricted) > 1:
        raise ValueError(f"box {box!r} restricts dimensions {restricted}; a shard restricts at most one")
    k = restricted[0]
    (start, stop), inner = bounds[k], math.prod(full_shape[k + 1:])
    row = full_shape[k] * inner
    runs = [(outer * row + start * inner, (stop - start) * inner) for outer in range(math.prod(full_shape[:k]))]
    return runs, full_shape[:k] + (stop - start,) + full_shape[k + 1:]


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


def _box_muller(words: np.ndarray, out: torch.Tensor) -> None:
    """One standard normal per pair of words (u1 from the first, u2 from the second), into float64 ``out``."""
    words >>= np.uint64(11)  # 53 random bits: every k / 2^53 is an exact double
    bits = words.view(np.int64)
    u1 = torch.from_numpy(bits[0::2].astype(np.float64))
    u2 = torch.from_numpy(bits[1::2].astype(np.float64))
    radius = u1.add_(1.0).mul_(2.0**-53).log_().mul_(-2.0).sqrt_()  # u1 = (k+1) / 2^53 in (0, 1]: no log(0)
    torch.mul(u2.mul_(2 * math.pi * 2.0**-53).cos_(), radius, out=out)  # angle 2 pi u2, u2 = k / 2^53 in [0, 1)


def keyed_normal(secret: int, step: int, name: str, full_shape: tuple[int, ...],
                 box: tuple[slice, ...] | None = None, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal noise for the sub-box ``box`` of parameter ``name`` (of shape ``full_shape``).

    ``box=None`` is the whole tensor; otherwise one dimension may be a ``slice(start, stop)`` and the
    others full, as a tensor-parallel shard is.  Element i of the full tensor uses Philox words 2i and
    2i+1 (Box-Muller in float64), so any box equals the same slice of the whole, bit for bit.
    """
    full_shape = tuple(int(n) for n in full_shape)
    runs, shape = _flat_runs(full_shape, box)
    bitgen = np.random.Philox(key=derive_key(secret, step, "noise", name))
    out = torch.empty(math.prod(shape), dtype=torch.float64)
    filled = 0
    for batch in _batches(runs, _BATCH):
        chunks = [philox_words(bitgen, 2 * start, 2 * length) for start, length in batch]
        count = sum(length for _, length in batch)
        _box_muller(chunks[0] if len(chunks) == 1 else np.concatenate(chunks), out[filled:filled + count])
        filled += count
    return out.view(shape).to(dtype=dtype, device=device)
