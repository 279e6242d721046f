"""Embedding tables: token-equality norms, and Phantom Clipping when the table is also the output layer.

Untied (algorithms.md §2.3): the per-example gradient of the table has one row per distinct token,
the sum of that token's output gradients, so ||grad E_i||^2 = sum_v ||sum_{t: s_t = v} g_t||^2.  It is
computed in the O(T d) unique-index form (segment sums over (example, token) pairs) instead of the
O(T^2 d) equality mask.  Ids outside this rank's rows and the padding token arrive as -1 and are
excluded.  Tied: see ``phantom.py``; the output side offers the ghost / materialise / stream choice.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...parallel.layers import VocabParallelEmbedding
from . import Cost, NormRule, register
from . import phantom
from .linear import accumulate_examples, example_sq_norms, streamed


def token_sum_sq_norm(ids: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """sum over distinct tokens v of example i of ||sum_{t: s_t = v} g_t||^2, per example; ids < 0 skipped."""
    batch, _, dim = grad_outputs.shape
    valid = ids >= 0
    if not bool(valid.any()):
        return grad_outputs.new_zeros(batch)
    example = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)[valid]
    stride = int(ids.max()) + 1
    unique_keys, inverse = torch.unique(example * stride + ids[valid], return_inverse=True)
    sums = grad_outputs.new_zeros(unique_keys.numel(), dim).index_add_(0, inverse, grad_outputs[valid])
    owner = unique_keys // stride
    return grad_outputs.new_zeros(batch).index_add_(0, owner, example_sq_norms(sums))


def weighted_token_sum(ids: torch.Tensor, grad_outputs: torch.Tensor, weights: torch.Tensor, num_rows: int) -> torch.Tensor:
    """sum_i w_i grad E_i as one scatter-add of the weighted output gradients into the table's rows."""
    valid = ids >= 0
    scaled = grad_outputs * weights.view(-1, 1, 1).to(grad_outputs.dtype)
    table = grad_outputs.new_zeros(num_rows, grad_outputs.shape[-1])
    return table.index_add_(0, ids[valid], scaled[valid])


@register(VocabParallelEmbedding)
class EmbeddingRule(NormRule):
    completing_site = "embed"  # the input lookup is the last backward call of a (tied) table

    def choices(self, layer, batch, seq_len, elem_bytes, per_layer=False):
        rows, dim = layer.weight.shape
        lookup = Cost(flops=4.0 * batch * seq_len * dim, kept_bytes=float(batch * seq_len * dim * elem_bytes))
        if not layer.tied_output:
            return {"ghost": lookup}
        return {name: replace(c, flops=lookup.flops + c.flops, kept_bytes=lookup.kept_bytes + c.kept_bytes)
                for name, c in phantom.output_choices(batch, seq_len, rows, dim, elem_bytes, per_layer).items()}

    def default_choice(self, layer, seq_len):
        rows, dim = layer.weight.shape
        return "ghost" if not layer.tied_output or 2 * seq_len**2 <= rows * dim else "materialise"

    def prepare(self, layer, recorded, strategy):
        state = {"ids": recorded["embed"]["ids"], "grad_embed": recorded["embed"]["grad_outputs"], "strategy": strategy}
        if layer.tied_output:
            if "project" not in recorded:
                raise RuntimeError("a table built with tied_output=True was not used as the output layer")
            state.update(phantom.prepare_output(recorded["project"]["inputs"], recorded["project"]["grad_outputs"],
                                                strategy))
        return state

    def _chunks(self, layer, state):
        return streamed(state["grad_embed"], tuple(layer.weight.shape),
                        lambda rows, out: phantom.table_grads(state, rows, out))

    def sq_norms(self, layer, state):
        if layer.tied_output and state["strategy"] == "stream":
            return {layer.weight: torch.cat([example_sq_norms(grads) for _, grads in self._chunks(layer, state)])}
        norm = token_sum_sq_norm(state["ids"], state["grad_embed"])
        if layer.tied_output:
            norm = norm + phantom.output_and_cross_sq_norm(state)
        return {layer.weight: norm}

    def clipped_sums(self, layer, state, clip_factors):
        grad = weighted_token_sum(state["ids"], state["grad_embed"], clip_factors, layer.weight.shape[0])
        if layer.tied_output:
            grad += phantom.weighted_output_sum(state, clip_factors)
        return {layer.weight: grad}

    def clip_layer(self, layer, state, clip):
        if not (layer.tied_output and state["strategy"] == "stream"):
            return super().clip_layer(layer, state, clip)
        total = state["grad_embed"].new_zeros(layer.weight.shape)
        for _, grads in self._chunks(layer, state):
            accumulate_examples(total, grads, clip({layer.weight: example_sq_norms(grads)}))
        return {layer.weight: total}
