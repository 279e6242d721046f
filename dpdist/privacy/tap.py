"""The tap attached to every DP-aware layer: recorded tensors in, norm contributions and clipped sums out.

During the backward each layer hands its recorded tensors to ``record``; the tap applies the layer's
norm rule with the planned strategy and keeps the local per-example squared-norm contributions (a
B-vector).  Replicated parameters count only on tensor-parallel rank 0, so that summing the vector
over the tensor group (the one collective clipping needs) gives every rank the full norms.  Then:

- ``bookkeeping``: keep each layer's state until ``accumulate_clipped(c)`` forms sum_i c_i grad_i once;
- ``per_layer``: clip each layer group as soon as it is complete, with its own threshold, and keep
  nothing (one tensor-group all-reduce per layer, or per chunk of examples for a rule that streams
  its per-example gradients);
- ``norms``: only the norms (pass 1 of two-pass clipping; pass 2 is an ordinary weighted backward).

Clipped sums accumulate in a store across micro-batches until the step releases them: ``LocalSums``
holds them whole; a backend that shards gradients brings one that reduce-scatters each layer's sum
into the shard it owns as soon as it is formed, so no rank holds the whole model's gradient.

Sums and norm contributions are keyed by the parameters the layer held when the tap was attached.
A wrapper that swaps a layer's parameters during the forward and backward (FSDP all-gathers them
into other tensors) then changes no key.

Every pre-noise quantity is fp32 or wider whatever the model computes in (``dpdist.privacy.precision``):
recorded bf16/fp16 tensors are widened as they arrive, so norms, clip factors and clipped sums are fp32.
An example with an inf or NaN in
its records has a non-finite norm (every rule's norm reads every recorded value of the example), which
``clip_factors`` turns into the factor 0; its rows of the records are then zeroed before a clipped sum
is formed, since 0 x inf would still be NaN.  The norms tell which examples those are, so the common
path scans no record.

Each layer may complete once per backward: a layer called twice in one forward has the per-example
gradient g1 + g2, whose norm needs the cross term that two separate records cannot give, so that is
an error rather than a silently wrong norm.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..parallel.mappings import group_rank, group_sum
from .clipping import clip_factors
from .precision import widened
from .rules import NormRule, rule_for

MODES = ("bookkeeping", "per_layer", "norms")


def _without_rows(state: dict, rows: torch.Tensor) -> dict:
    """A rule's state with the examples ``rows`` (a B mask) zeroed in every per-example tensor."""
    def zeroed(value):
        if torch.is_tensor(value) and value.is_floating_point() and value.dim() and value.shape[0] == rows.shape[0]:
            return value.masked_fill(rows.view(-1, *[1] * (value.dim() - 1)), 0.0)
        return value
    return {key: zeroed(value) for key, value in state.items()}


def _rekeyed(per_param: dict, keys: dict) -> dict:
    """``per_param`` with each key the parameter it stands for at attach time (``keys``)."""
    return {keys.get(param, param): value for param, value in per_param.items()} if keys else per_param


class LocalSums:
    """Clipped sums held whole on this rank, parameter -> sum, until the release pops them."""

    def __init__(self):
        self.sums: dict[torch.Tensor, torch.Tensor] = {}

    def add(self, sums: dict[torch.Tensor, torch.Tensor]) -> None:
        """Add one layer's sums (or a weighted backward's gradients)."""
        for param, grad in sums.items():
            if param in self.sums:
                self.sums[param] += grad
            else:
                self.sums[param] = grad

    def pop(self) -> dict[torch.Tensor, torch.Tensor]:
        sums, self.sums = self.sums, {}
        return sums


class PerExampleTap:
    def __init__(self, layers: list[nn.Module], strategies: dict[nn.Module, str], *, mode: str = "bookkeeping",
                 tp_group=None, layer_clip_norm: float | None = None, names: dict[nn.Module, str] | None = None,
                 rules: dict[nn.Module, NormRule] | None = None, sums=None):
        """``rules``: each layer's norm rule (default: the registry's for its type); a parametrization
        that trains a layer through other tensors (LSG's carriers) brings its own.  ``sums``: the store
        of clipped sums (default ``LocalSums``)."""
        if mode not in MODES:
            raise ValueError(f"tap mode must be one of {MODES}; got {mode!r}")
        if mode == "per_layer" and layer_clip_norm is None:
            raise ValueError("per-layer clipping needs layer_clip_norm")
        self.layers, self.strategies, self.mode = layers, strategies, mode
        self.tp_group, self.layer_clip_norm = tp_group, layer_clip_norm
        self.names = names or {}
        self.rules = {layer: (rules or {}).get(layer) or rule_for(layer) for layer in layers}
        self.tp_rank = group_rank(tp_group)
        self.defer_weight_grad = True
        self.sums = sums if sums is not None else LocalSums()
        self._own = {layer: dict(layer.named_parameters(recurse=False)) for layer in layers}  # the keys
        self._pending: dict[nn.Module, dict] = {}
        self._states: list = []
        self._sq_norms: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None  # examples whose norm in this micro-batch is not finite
        self._completed: set[nn.Module] = set()

    def attach(self) -> "PerExampleTap":
        for layer in self.layers:
            layer.grad_tap = self
        return self

    def detach(self) -> None:
        for layer in self.layers:
            layer.grad_tap = None

    @contextlib.contextmanager
    def forming_weight_grads(self):
        """Within this block the layers form their weight gradients themselves (the second backward of
        two-pass clipping), instead of recording for the tap."""
        self.defer_weight_grad = False
        try:
            yield
        finally:
            self.defer_weight_grad = True

    def record(self, layer: nn.Module, site: str, **tensors) -> None:
        pending = self._pending.setdefault(layer, {})
        if site in pending or layer in self._completed:
            raise RuntimeError(f"layer {self.names.get(layer, type(layer).__name__)} ran its backward twice in one "
                               "step: a layer called twice in one forward (shared weights) has per-example gradient "
                               "g1 + g2, and the norm rules cannot form its cross term from two records; give each "
                               "call its own layer")
        pending[site] = {key: widened(tensor) for key, tensor in tensors.items()}
        rule = self.rules[layer]
        if site != rule.completing_site:
            return
        del self._pending[layer]
        self._completed.add(layer)
        state = rule.prepare(layer, pending, self.strategies[layer])
        keys = self._keys(layer)
        if self.mode == "per_layer":
            contribution = self._clip_layer(layer, rule, state, keys)
        else:
            contribution = self._counted(_rekeyed(rule.sq_norms(layer, state), keys))
            if self.mode == "bookkeeping":
                self._states.append((layer, rule, state, keys))
        self._sq_norms = contribution if self._sq_norms is None else self._sq_norms + contribution

    def _keys(self, layer: nn.Module) -> dict:
        """The layer's parameters as it holds them now -> as it held them at attach time."""
        own = self._own[layer]
        return {p: own[name] for name, p in layer.named_parameters(recurse=False) if p is not own[name]}

    def _clip_layer(self, layer: nn.Module, rule, state, keys: dict) -> torch.Tensor:
        """Per-layer clipping of one layer: its clipped sums into the store, its counted squared-norm
        contributions returned.  An example whose norm in this layer is not finite made the sums NaN
        (its factor 0 times its inf): the layer is clipped again with that example's records zeroed,
        which every tensor rank decides alike, from the reduced norms."""
        rows, bad = [], []
        sums = rule.clip_layer(layer, state, lambda contributions: self._clip_rows(_rekeyed(contributions, keys),
                                                                                   rows, bad))
        nonfinite = torch.cat(bad)
        if nonfinite.any():
            rows, bad = [], []
            sums = rule.clip_layer(layer, _without_rows(state, nonfinite),
                                   lambda contributions: self._clip_rows(_rekeyed(contributions, keys), rows, bad))
            self._accumulate(_rekeyed(sums, keys))
            return torch.cat(rows).masked_fill(nonfinite, math.nan)
        self._accumulate(_rekeyed(sums, keys))
        return torch.cat(rows)

    def _clip_rows(self, contributions: dict, rows: list, bad: list) -> torch.Tensor:
        """Per-layer clip factors of some consecutive examples from their local contributions; the
        counted contributions are appended to ``rows``.  A layer with a sharded parameter needs one
        tensor-group all-reduce per call.  A layer of replicated parameters only (a norm layer, the
        position table) has the same per-example gradients on every tensor rank, so its local norms
        are already the full ones and no collective is needed."""
        counted = self._counted(contributions)
        rows.append(counted)
        if any(getattr(param, "tensor_model_parallel", False) for param in contributions):
            full = group_sum(counted, self.tp_group)
        else:
            full = sum(contributions.values())
        bad.append(~torch.isfinite(full))
        return clip_factors(full.clamp(min=0).sqrt(), self.layer_clip_norm)

    def take_sq_norms(self) -> torch.Tensor:
        """This micro-batch's per-example squared norms, summed over the tensor group, at least 0 (a
        ghost norm can come out slightly negative under cancellation) and NaN for an example with a
        non-finite record; resets them and ends the backward.  (Under per-layer clipping the factors
        are already applied; the norms serve statistics.)"""
        if self._pending:
            names = ", ".join(type(layer).__name__ for layer in self._pending)
            raise RuntimeError(f"incomplete per-example records after the backward for: {names}")
        if self._sq_norms is None:
            raise RuntimeError("no DP-aware layer recorded anything; was the backward run with the tap attached?")
        sq_norms, self._sq_norms = self._sq_norms, None
        self._completed.clear()
        sq_norms = group_sum(sq_norms, self.tp_group).clamp(min=0)
        self._nonfinite = ~torch.isfinite(sq_norms)
        return sq_norms

    @torch.no_grad()  # the recorded inputs are activations that require grad: build no graph on them
    def accumulate_clipped(self, clip: torch.Tensor) -> None:
        """Book-keeping: add sum_i c_i grad_i of every recorded layer to the store, then forget the
        records.  Examples whose norm was not finite (factor 0) have their records zeroed first."""
        dropped = self._nonfinite if self._nonfinite is not None and bool(self._nonfinite.any()) else None
        for layer, rule, state, keys in self._states:
            state = state if dropped is None else _without_rows(state, dropped)
            self._accumulate(_rekeyed(rule.clipped_sums(layer, state, clip), keys))
        self._states.clear()

    def add_to_sums(self, grads: dict[nn.Parameter, torch.Tensor]) -> None:
        """Two-pass: add the weighted backward's gradients to the store."""
        self._accumulate(grads)

    def pop_grad_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        return self.sums.pop()

    def _counted(self, per_param: dict) -> torch.Tensor:
        total = None
        for param, sq in per_param.items():
            if getattr(param, "tensor_model_parallel", False) or self.tp_rank == 0:
                total = sq if total is None else total + sq
        return total if total is not None else torch.zeros_like(next(iter(per_param.values())))

    def _accumulate(self, sums: dict) -> None:
        self.sums.add(sums)  # fp32 or wider: every record was widened
