"""Per-layer norm rules: pure functions of a layer's recorded tensors, registered by layer type.

A rule turns what a layer recorded during the backward (input activations, output gradients, token
ids) into (1) per-example squared-norm contributions of each of the layer's parameters and (2) the
clipped gradient sum once the clip factors are known, without ever forming the per-example gradients
of the whole model.  Adding a layer kind means adding a file with a rule and registering it; a model
with a trainable parameter that no rule covers is refused (``rule_for`` raises).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_RULES: dict[type, "NormRule"] = {}


@dataclass(frozen=True)
class Cost:
    """Extra work of one way of computing a layer's norms, beyond a non-private step.

    ``flops`` counts floating-point operations; ``kept_bytes`` is what must stay alive from the
    layer's backward until the clip factors are known (book-keeping) beyond the activations a
    non-private step holds at its peak anyway; ``touched_bytes`` is the memory traffic that the FLOP
    count does not show (writing and re-reading per-example gradients), and ``cached_bytes`` the part
    of it that stays in a cache-sized buffer (streamed chunks), which costs less per byte;
    ``reductions`` counts the tensor-group all-reduces beyond one per layer (per-layer clipping of a
    streamed layer clips chunk by chunk)."""

    flops: float
    kept_bytes: float
    touched_bytes: float = 0.0
    cached_bytes: float = 0.0
    reductions: float = 0.0


class NormRule:
    """Interface of a norm rule.  ``sites`` name the backward calls a layer makes; the record is
    complete when ``completing_site`` has arrived (for a table used twice, the input lookup comes last
    in the backward)."""

    completing_site: str

    def choices(self, layer: nn.Module, batch: int, seq_len: int, elem_bytes: int,
                per_layer: bool = False) -> dict[str, Cost]:
        """The strategies this layer offers and their costs; ``per_layer`` says whether the clip
        factors will be known as soon as the layer's record is complete (per-layer clipping)."""
        raise NotImplementedError

    def default_choice(self, layer: nn.Module, seq_len: int) -> str:
        """Flat clipping's choice without a memory budget (the FLOP rule where there is a choice)."""
        return next(iter(self.choices(layer, 1, seq_len, 4)))

    def prepare(self, layer: nn.Module, recorded: dict, strategy: str):
        raise NotImplementedError

    def sq_norms(self, layer: nn.Module, state) -> dict[nn.Parameter, "torch.Tensor"]:
        raise NotImplementedError

    def clipped_sums(self, layer: nn.Module, state, clip_factors) -> dict[nn.Parameter, "torch.Tensor"]:
        raise NotImplementedError

    def clip_layer(self, layer: nn.Module, state, clip) -> dict[nn.Parameter, "torch.Tensor"]:
        """Per-layer clipping of this layer alone.  ``clip`` turns local squared-norm contributions
        (per parameter, for consecutive rows of the batch, in order) into those rows' clip factors; a
        rule may call it chunk by chunk so that its per-example gradients never all exist at once."""
        return self.clipped_sums(layer, state, clip(self.sq_norms(layer, state)))


def register(*layer_types: type):
    def wrap(rule_cls):
        for layer_type in layer_types:
            _RULES[layer_type] = rule_cls()
        return rule_cls
    return wrap


def rule_for(layer: nn.Module) -> NormRule:
    try:
        return _RULES[type(layer)]
    except KeyError:
        raise TypeError(f"no per-example norm rule for layer type {type(layer).__name__}") from None


def has_rule(layer: nn.Module) -> bool:
    return type(layer) in _RULES


from . import embedding, linear, norm  # noqa: E402,F401  (registration)
