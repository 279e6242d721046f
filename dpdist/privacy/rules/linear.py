"""Linear layers on sequences: ghost norm or materialised per-example gradients (algorithms.md §2.2).

For input A_i (T x d) and output gradient G_i (T x p), the weight gradient is G_i^T A_i and
||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>: the ghost norm costs O(T^2 (p + d)) and O(T^2) memory;
materialising costs no extra matmul work under book-keeping (it replaces the weight-gradient matmul)
but keeps B*p*d numbers.  The bias gradient sum_t g_t is always materialised.  On a tensor-parallel
rank each of these is the contribution of the local shard; a replicated row-parallel bias is counted
once per tensor group by the caller.
"""
from __future__ import annotations

import torch

from ...parallel.layers import ColumnParallelLinear, RowParallelLinear
from . import Cost, NormRule, register


def _sequences(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-1])


def ghost_sq_norm(inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """||G_i^T A_i||_F^2 for every example without forming G_i^T A_i."""
    gram_a = torch.bmm(inputs, inputs.transpose(1, 2))  # (B, T, T)
    gram_g = torch.bmm(grad_outputs, grad_outputs.transpose(1, 2))  # (B, T, T)
    return (gram_a * gram_g).sum((1, 2))


def weighted_outer_sum(grad_outputs: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i G_i^T A_i as one matmul (book-keeping: the clipped weight gradient)."""
    scaled = grad_outputs * weights.view(-1, 1, 1).to(grad_outputs.dtype)
    return scaled.reshape(-1, scaled.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])


def weighted_example_sum(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i X_i for materialised per-example tensors X (B, ...)."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return (weights.to(flat.dtype) @ flat).view(per_example.shape[1:])


def linear_choices(batch: int, seq_len: int, p: int, d: int, elem_bytes: int) -> dict[str, Cost]:
    # Ghost keeps the output gradients (the inputs are activations the step holds at its peak anyway).
    ghost = Cost(flops=2.0 * batch * seq_len**2 * (p + d + 1), kept_bytes=float(batch * seq_len * p * elem_bytes))
    materialise = Cost(flops=4.0 * batch * p * d, kept_bytes=float(batch * p * d * elem_bytes),
                       touched_bytes=3.0 * batch * p * d * elem_bytes)
    return {"ghost": ghost, "materialise": materialise}


@register(ColumnParallelLinear, RowParallelLinear)
class LinearRule(NormRule):
    completing_site = "linear"

    def choices(self, layer, batch, seq_len, elem_bytes):
        p, d = layer.weight.shape
        return linear_choices(batch, seq_len, p, d, elem_bytes)

    def default_choice(self, layer, seq_len):
        p, d = layer.weight.shape
        return "ghost" if 2 * seq_len**2 <= p * d else "materialise"  # the mixed rule (Bu et al. 2022)

    def prepare(self, layer, recorded, strategy):
        inputs = _sequences(recorded["linear"]["inputs"])
        grad_outputs = _sequences(recorded["linear"]["grad_outputs"])
        state = {"bias": grad_outputs.sum(1) if layer.bias is not None else None}
        if strategy == "materialise":
            state["weight"] = torch.bmm(grad_outputs.transpose(1, 2), inputs)  # (B, p, d)
        else:
            state["inputs"], state["grad_outputs"] = inputs, grad_outputs
        return state

    def sq_norms(self, layer, state):
        if "weight" in state:
            norms = {layer.weight: state["weight"].pow(2).sum((1, 2))}
        else:
            norms = {layer.weight: ghost_sq_norm(state["inputs"], state["grad_outputs"])}
        if state["bias"] is not None:
            norms[layer.bias] = state["bias"].pow(2).sum(1)
        return norms

    def clipped_sums(self, layer, state, clip_factors):
        if "weight" in state:
            sums = {layer.weight: weighted_example_sum(state["weight"], clip_factors)}
        else:
            sums = {layer.weight: weighted_outer_sum(state["grad_outputs"], state["inputs"], clip_factors)}
        if state["bias"] is not None:
            sums[layer.bias] = weighted_example_sum(state["bias"], clip_factors)
        return sums
