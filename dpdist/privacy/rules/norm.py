"""LayerNorm / RMSNorm: per-example gradients are d-vectors, so materialise them (algorithms.md §2.4).

grad_gamma_i = sum_t g_t * xhat_t and grad_beta_i = sum_t g_t: B x d numbers, negligible next to the
activations, computed as soon as the layer's backward runs.
"""
from __future__ import annotations

from ...parallel.layers import Norm
from . import Cost, NormRule, register
from .linear import example_sq_norms, weighted_example_sum


@register(Norm)
class NormLayerRule(NormRule):
    completing_site = "norm"

    def choices(self, layer, batch, seq_len, elem_bytes, per_layer=False):
        d = layer.dim
        return {"materialise": Cost(flops=4.0 * batch * seq_len * d, kept_bytes=float(2 * batch * d * elem_bytes))}

    def prepare(self, layer, recorded, strategy):
        xhat, grad_outputs = recorded["norm"]["normalized"], recorded["norm"]["grad_outputs"]
        reduce_dims = tuple(range(1, grad_outputs.dim() - 1))
        state = {layer.weight: (grad_outputs * xhat).sum(reduce_dims)}
        if layer.bias is not None:
            state[layer.bias] = grad_outputs.sum(reduce_dims)
        return state

    def sq_norms(self, layer, state):
        return {param: example_sq_norms(g) for param, g in state.items()}

    def clipped_sums(self, layer, state, clip_factors):
        return {param: weighted_example_sum(g, clip_factors) for param, g in state.items()}
