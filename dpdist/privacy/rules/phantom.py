"""Phantom Clipping: the exact per-example norm of a table used as input embedding AND output layer.

With token ids s (T), the gradient Ge (T x d) at the embedding output, the final hidden states H
(T' x d) and the logits gradient Gz (T' x M), the per-example gradient of the table is
A^T Ge + Gz^T H (A the one-hot of s), and (algorithms.md §3.2)

    ||grad E||^2 = <A A^T, Ge Ge^T>        (I)   input side: ``embedding.token_sum_sq_norm``
                 + ||Gz^T H||^2            (II)  output side: ghost <Gz Gz^T, H H^T> or materialised
                 + 2 <A Gz^T, Ge H^T>      (III) cross term; (A Gz^T)[j, k] = Gz[k, s_j] is a gather

Summing the two sites' separate norms would drop (III) and be wrong.  The ``stream`` strategy forms
the whole per-example table gradient A^T Ge + Gz^T H a few examples at a time instead, so the three
terms are never separated.  On a vocabulary shard every term is restricted to the local rows (ids
outside arrive as -1), and the shards' contributions add up.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import Cost
from .linear import ghost_sq_norm, gram_entries, stream_cost, weighted_example_sum, weighted_outer_sum


def output_choices(batch: int, seq_len: int, rows: int, dim: int, elem_bytes: int, per_layer: bool) -> dict[str, Cost]:
    cross = 2.0 * batch * seq_len**2 * dim
    ghost = Cost(flops=2.0 * batch * gram_entries(seq_len) * (rows + dim + 1) + cross,
                 kept_bytes=float(batch * seq_len * rows * elem_bytes))
    materialise = Cost(flops=4.0 * batch * rows * dim + 2.0 * batch * seq_len * dim,
                       kept_bytes=float(batch * rows * dim * elem_bytes), touched_bytes=3.0 * batch * rows * dim * elem_bytes)
    stream = stream_cost(batch, seq_len, rows, dim, elem_bytes, per_layer, ghost)
    if per_layer:  # the logits gradient is kept until the input lookup's record completes the table
        stream = replace(stream, kept_bytes=stream.kept_bytes + ghost.kept_bytes)
    return {"ghost": ghost, "materialise": materialise, "stream": stream}


def prepare_output(hidden: torch.Tensor, grad_logits: torch.Tensor, strategy: str) -> dict:
    if strategy == "materialise":
        return {"grad_output_table": torch.bmm(grad_logits.transpose(1, 2), hidden)}  # (B, M, d) = Gz^T H
    return {"hidden": hidden, "grad_logits": grad_logits}


def table_grads(state: dict, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """The whole per-example table gradients A_i^T Ge_i + Gz_i^T H_i of examples ``rows``, written
    into ``out`` (chunk, M, d)."""
    ids, grad_embed = state["ids"][rows], state["grad_embed"][rows]
    grads = torch.bmm(state["grad_logits"][rows].transpose(1, 2), state["hidden"][rows], out=out)
    chunk, num_rows, dim = grads.shape
    valid = ids >= 0
    flat_rows = (torch.arange(chunk, device=ids.device).unsqueeze(1) * num_rows + ids)[valid]
    grads.view(chunk * num_rows, dim).index_add_(0, flat_rows, grad_embed[valid])
    return grads


def output_and_cross_sq_norm(state: dict) -> torch.Tensor:
    """Terms (II) + (III) per example (ghost and materialise)."""
    ids, grad_embed = state["ids"], state["grad_embed"]
    valid = (ids >= 0).unsqueeze(-1).to(grad_embed.dtype)
    safe_ids = ids.clamp(min=0)
    if "grad_output_table" in state:
        table = state["grad_output_table"]  # (B, M, d)
        rows_at_inputs = table.gather(1, safe_ids.unsqueeze(-1).expand(-1, -1, table.shape[-1]))  # (B, T, d)
        flat = table.reshape(table.shape[0], -1)
        output = torch.linalg.vecdot(flat, flat)
        cross = 2 * (grad_embed * rows_at_inputs * valid).sum((1, 2))
        return output + cross
    hidden, grad_logits = state["hidden"], state["grad_logits"]
    output = ghost_sq_norm(hidden, grad_logits)
    index = safe_ids.unsqueeze(1).expand(-1, grad_logits.shape[1], -1)  # (B, T', T)
    agt = grad_logits.gather(2, index) * valid.transpose(1, 2)  # (B, T', T): Gz[k, s_j], zero for invalid j
    cross = 2 * (agt.transpose(1, 2) * torch.bmm(grad_embed, hidden.transpose(1, 2))).sum((1, 2))
    return output + cross


def weighted_output_sum(state: dict, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i Gz_i^T H_i, the output side of the clipped gradient."""
    if "grad_output_table" in state:
        return weighted_example_sum(state["grad_output_table"], weights)
    return weighted_outer_sum(state["grad_logits"], state["hidden"], weights)
