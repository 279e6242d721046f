"""Linear layers on sequences: ghost norm, materialised or streamed per-example gradients (algorithms.md §2.2).

For input A_i (T x d) and output gradient G_i (T x p), the weight gradient is G_i^T A_i and
||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>.  Three ways to get it:

- ``ghost``: the Gram form, O(T^2 (p + d)) extra work (about 5/8 of it: the Grams are symmetric, and
  only their blocks on and right of the diagonal are formed) and O(T^2) memory;
- ``materialise``: form all B per-example gradients at once and keep them until the clip factors are
  known; no extra matmul under book-keeping (it replaces the weight-gradient matmul) but B*p*d numbers;
- ``stream``: form them a few examples at a time into one reused buffer small enough to stay in cache.
  Under per-layer clipping the chunk's clip factors are known right away, so the chunk is clipped and
  summed on the spot: the per-example matmuls replace the weight gradient and nothing is kept.  Under
  flat clipping the chunks only give norms, and the clipped sum is a separate matmul.

The bias gradient sum_t g_t is always materialised.  On a tensor-parallel rank each of these is the
contribution of the local shard; a replicated row-parallel bias is counted once per tensor group by
the caller.
"""
from __future__ import annotations

import math

import torch

from ...parallel.layers import ColumnParallelLinear, RowParallelLinear
from . import Cost, NormRule, register

# Per-example gradients of one streamed chunk take at most this many bytes, the L2 of the project's
# CPU (1 MiB per core, 2 cores), so a chunk is read back from cache (benchmarks/stream_chunks.py).
STREAM_CHUNK_BYTES = 2 * 2**20
# The ghost norm forms its symmetric Grams in at most this many row blocks of at least this many rows
# ((k + 1) / 2k of the full Grams' work): more or smaller blocks save less work than small matmuls lose.
GRAM_BLOCKS, GRAM_MIN_ROWS = 4, 32


def _sequences(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def gram_bounds(seq_len: int, blocks: int | None = None) -> list[int]:
    """Row-block boundaries of a blocked T x T Gram: ``blocks`` blocks (default: as many blocks of at
    least ``GRAM_MIN_ROWS`` rows as fit, at most ``GRAM_BLOCKS``), the last one taking the remainder."""
    if blocks is None:
        blocks = min(GRAM_BLOCKS, max(1, seq_len // GRAM_MIN_ROWS))
    blocks = max(1, min(blocks, seq_len))
    return [seq_len * k // blocks for k in range(blocks + 1)]


def gram_entries(seq_len: int, blocks: int | None = None) -> int:
    """How many of the T^2 Gram entries the blocked ghost norm forms: the diagonal blocks and those
    right of them, (k + 1) / 2k of all for k equal blocks."""
    bounds = gram_bounds(seq_len, blocks)
    return sum((hi - lo) * (seq_len - lo) for lo, hi in zip(bounds, bounds[1:]))


def ghost_sq_norm(inputs: torch.Tensor, grad_outputs: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T> for every example without forming G_i^T A_i.

    Both Grams are symmetric, so only their row blocks from the diagonal rightwards are formed, and
    an entry off the diagonal blocks counts twice for itself and its mirror image.
    """
    bounds = gram_bounds(inputs.shape[1], blocks)
    total = None
    for lo, hi in zip(bounds, bounds[1:]):
        gram_a = torch.bmm(inputs[:, lo:hi], inputs[:, lo:].transpose(1, 2))  # (B, hi - lo, T - lo)
        gram_g = torch.bmm(grad_outputs[:, lo:hi], grad_outputs[:, lo:].transpose(1, 2))
        product = gram_a * gram_g
        part = product[:, :, : hi - lo].sum((1, 2)) + 2 * product[:, :, hi - lo:].sum((1, 2))
        total = part if total is None else total + part
    return total


def weighted_outer_sum(grad_outputs: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i G_i^T A_i as one matmul (book-keeping: the clipped weight gradient).  The weights
    scale the narrower operand: scaling a tied table's (B, T, V) logits gradient would copy it whole."""
    scale = weights.view(-1, 1, 1)
    if inputs.shape[-1] < grad_outputs.shape[-1]:
        inputs = inputs * scale.to(inputs.dtype)
    else:
        grad_outputs = grad_outputs * scale.to(grad_outputs.dtype)
    return grad_outputs.reshape(-1, grad_outputs.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])


def weighted_example_sum(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i X_i for materialised per-example tensors X (B, ...)."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return (weights.to(flat.dtype) @ flat).view(per_example.shape[1:])


def accumulate_examples(total: torch.Tensor, per_example: torch.Tensor, weights: torch.Tensor) -> None:
    """total += sum_i w_i X_i, one just-formed example at a time while the chunk is still in cache: on
    the project's CPU this ran 1.0-1.3x faster than one matrix-vector product over the chunk
    (benchmarks/stream_chunks.py)."""
    for example, weight in zip(per_example, weights.to(per_example.dtype)):
        total.addcmul_(example, weight)


def example_sq_norms(per_example: torch.Tensor) -> torch.Tensor:
    """||X_i||^2 for per-example tensors X (B, ...), without a squared temporary of X's size."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return torch.linalg.vecdot(flat, flat)


def example_chunks(batch: int, bytes_per_example: int, chunk_bytes: int | None = None):
    """Row slices of a batch whose per-example gradients fit ``chunk_bytes`` (default
    ``STREAM_CHUNK_BYTES``; at least one row)."""
    size = max(1, (STREAM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(bytes_per_example, 1))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def streamed(like: torch.Tensor, shape: tuple[int, ...], form, chunk_bytes: int | None = None):
    """Yield (rows, per-example gradients of those rows) chunk by chunk for the batch of ``like`` (its
    first dimension, whose dtype and device the buffer takes); ``form(rows, out)`` writes them into
    ``out``, a view of one buffer that every chunk reuses (so the chunk is cache-warm and no fresh
    memory is faulted in per chunk).  A yielded chunk is overwritten by the next one."""
    chunks = example_chunks(like.shape[0], math.prod(shape) * like.element_size(), chunk_bytes)
    buffer = like.new_empty((chunks[0].stop - chunks[0].start, *shape))
    for rows in chunks:
        out = buffer[: rows.stop - rows.start]
        form(rows, out)
        yield rows, out


def _outer_products(grad_outputs: torch.Tensor, inputs: torch.Tensor):
    """``form`` for :func:`streamed`: the per-example weight gradients G_i^T A_i (chunk, p, d)."""
    return lambda rows, out: torch.bmm(grad_outputs[rows].transpose(1, 2), inputs[rows], out=out)


def streamed_sq_norms(grad_outputs: torch.Tensor, inputs: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """||G_i^T A_i||_F^2 per example, a cache-sized chunk of per-example gradients at a time."""
    shape = (grad_outputs.shape[-1], inputs.shape[-1])
    chunks = streamed(inputs, shape, _outer_products(grad_outputs, inputs), chunk_bytes)
    return torch.cat([example_sq_norms(per_example) for _, per_example in chunks])


def stream_cost(batch: int, seq_len: int, p: int, d: int, elem_bytes: int, per_layer: bool, ghost: Cost,
                chunk_bytes: int | None = None) -> Cost:
    """Per-layer clipping: the chunks are clipped and summed where they are made, so they replace the
    weight gradient and keep nothing but the chunk buffer.  Flat clipping: norms from the chunks, then
    the clipped sum as one more matmul, as for ghost.  Either way every per-example gradient is written
    once into the cache-sized buffer and read once or twice there (norm, weighted sum)."""
    size = batch * p * d * elem_bytes
    if per_layer:
        chunks = example_chunks(batch, p * d * elem_bytes, chunk_bytes)
        buffer = (chunks[0].stop - chunks[0].start) * p * d * elem_bytes  # what ``streamed`` allocates
        return Cost(flops=4.0 * batch * p * d, kept_bytes=float(buffer), cached_bytes=3.0 * size,
                    reductions=float(len(chunks) - 1))
    return Cost(flops=2.0 * batch * seq_len * p * d + 2.0 * batch * p * d, kept_bytes=ghost.kept_bytes,
                cached_bytes=2.0 * size)


def linear_choices(batch: int, seq_len: int, p: int, d: int, elem_bytes: int, per_layer: bool = False,
                   chunk_bytes: int | None = None) -> dict[str, Cost]:
    # Ghost keeps the output gradients (the inputs are activations the step holds at its peak anyway).
    ghost = Cost(flops=2.0 * batch * gram_entries(seq_len) * (p + d + 1),
                 kept_bytes=float(batch * seq_len * p * elem_bytes))
    materialise = Cost(flops=4.0 * batch * p * d, kept_bytes=float(batch * p * d * elem_bytes),
                       touched_bytes=3.0 * batch * p * d * elem_bytes)
    return {"ghost": ghost, "materialise": materialise,
            "stream": stream_cost(batch, seq_len, p, d, elem_bytes, per_layer, ghost, chunk_bytes)}


@register(ColumnParallelLinear, RowParallelLinear)
class LinearRule(NormRule):
    completing_site = "linear"

    def __init__(self, chunk_bytes: int | None = None, accumulate=accumulate_examples):
        """``chunk_bytes``: the size of a streamed chunk (default ``STREAM_CHUNK_BYTES``); ``accumulate``:
        how a streamed chunk is added into the clipped sum.  benchmarks/stream_chunks.py varies both."""
        self.chunk_bytes, self.accumulate = chunk_bytes, accumulate

    def choices(self, layer, batch, seq_len, elem_bytes, per_layer=False):
        p, d = layer.weight.shape
        return linear_choices(batch, seq_len, p, d, elem_bytes, per_layer, self.chunk_bytes)

    def default_choice(self, layer, seq_len):
        p, d = layer.weight.shape
        return "ghost" if 2 * seq_len**2 <= p * d else "materialise"  # the mixed rule (Bu et al. 2022)

    def prepare(self, layer, recorded, strategy):
        inputs = _sequences(recorded["linear"]["inputs"])
        grad_outputs = _sequences(recorded["linear"]["grad_outputs"])
        state = {"bias": grad_outputs.sum(1) if layer.bias is not None else None, "strategy": strategy}
        if strategy == "materialise":
            state["weight"] = torch.bmm(grad_outputs.transpose(1, 2), inputs)  # (B, p, d)
        else:
            state["inputs"], state["grad_outputs"] = inputs, grad_outputs
        return state

    def sq_norms(self, layer, state):
        if state["strategy"] == "materialise":
            norms = {layer.weight: example_sq_norms(state["weight"])}
        elif state["strategy"] == "stream":
            norms = {layer.weight: streamed_sq_norms(state["grad_outputs"], state["inputs"], self.chunk_bytes)}
        else:
            norms = {layer.weight: ghost_sq_norm(state["inputs"], state["grad_outputs"])}
        if state["bias"] is not None:
            norms[layer.bias] = example_sq_norms(state["bias"])
        return norms

    def clipped_sums(self, layer, state, clip_factors):
        if "weight" in state:
            sums = {layer.weight: weighted_example_sum(state["weight"], clip_factors)}
        else:
            sums = {layer.weight: weighted_outer_sum(state["grad_outputs"], state["inputs"], clip_factors)}
        if state["bias"] is not None:
            sums[layer.bias] = weighted_example_sum(state["bias"], clip_factors)
        return sums

    def clip_layer(self, layer, state, clip):
        if state["strategy"] != "stream":
            return super().clip_layer(layer, state, clip)
        grad_outputs, inputs, bias = state["grad_outputs"], state["inputs"], state["bias"]
        weight_sum = grad_outputs.new_zeros(layer.weight.shape)
        bias_sum = None if bias is None else bias.new_zeros(layer.bias.shape)
        chunks = streamed(inputs, tuple(layer.weight.shape), _outer_products(grad_outputs, inputs), self.chunk_bytes)
        for rows, per_example in chunks:
            contributions = {layer.weight: example_sq_norms(per_example)}
            if bias is not None:
                contributions[layer.bias] = example_sq_norms(bias[rows])
            factors = clip(contributions)
            self.accumulate(weight_sum, per_example, factors)
            if bias is not None:
                bias_sum += weighted_example_sum(bias[rows], factors)
        return {layer.weight: weight_sum} if bias is None else {layer.weight: weight_sum, layer.bias: bias_sum}
