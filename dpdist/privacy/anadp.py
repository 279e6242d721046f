"""ANADP: noise allocated to layer groups by importance, at the privacy cost of plain DP-SGD.

Each DP layer is a group k with clipping threshold C_k = C / sqrt(K) (per-layer clipping) and noise
N(0, s_k^2) with s_k = sigma C_k / sqrt(w_k).  For sum_k w_k = 1 this gives

    sum_k C_k^2 / s_k^2 = sum_k w_k / sigma^2 = 1 / sigma^2,

so the step is a Gaussian mechanism of noise multiplier sigma on the whitened sum (algorithms.md 7.2)
and the accountant's epsilon is the one of uniform DP-SGD.  Uniform w_k = 1/K gives s_k = sigma C:
plain DP-SGD with per-layer clipping.  The invariant is checked every step (``stds``).

The weights come from the *released* noisy gradient only (post-processing, free in privacy terms),
AdaLoRA-style (algorithms.md 7.1, marked [R]: the paper's exact constants are not known):
sensitivity I = |w * g_noisy| per coordinate, its moving average I_bar (beta1), the moving average of
the deviation |I - I_bar| (beta2) as uncertainty U_bar, importance s = I_bar * U_bar, S_k = the mean of
s over group k, and w_k proportional to S_k ** temperature with a floor of ``min_weight`` / K.  The
weights used at step t depend on releases before t only; they stay uniform for the warm-up.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.mappings import group_rank, group_size
from ..parallel.state import Sharded, load_into, unpadded_local_rows
from .clipping import per_layer_threshold
from .precision import accumulation_dtype
from .step import Released


class NoiseAllocation:
    """ANADP as the DP step's noise_scales seam: per-group noise scales and the importance state they
    are computed from.  The keyword arguments are the ``anadp`` config section's."""

    def __init__(self, groups: list[list[nn.Parameter]], names: dict[nn.Parameter, str], *, clip_norm: float,
                 noise_multiplier: float, tp_group=None, beta1: float = 0.85, beta2: float = 0.85,
                 warmup_steps: int = 20, refresh_every: int = 1, temperature: float = 1.0, min_weight: float = 0.1):
        if not groups or any(not g for g in groups):
            raise ValueError("ANADP needs at least one group, each with a parameter")
        self.groups, self.names, self.tp_group = groups, names, tp_group
        self.beta1, self.beta2, self.warmup_steps, self.refresh_every = beta1, beta2, warmup_steps, refresh_every
        self.temperature, self.min_weight = temperature, min_weight
        self.noise_multiplier = noise_multiplier
        self.layer_clip = per_layer_threshold(clip_norm, len(groups))
        self.weights = torch.full((len(groups),), 1.0 / len(groups), dtype=torch.float64)
        params = [p for group in groups for p in group]
        self.sensitivity = {p: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in params}
        self.uncertainty = {p: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in params}
        self.group_of = {p: k for k, group in enumerate(groups) for p in group}

    def group_stds(self) -> list[float]:
        """s_k for every group, after checking sum_k C_k^2 / s_k^2 <= 1 / sigma^2."""
        if self.noise_multiplier == 0:
            return [0.0] * len(self.groups)
        stds = [self.noise_multiplier * self.layer_clip / math.sqrt(float(w)) for w in self.weights]
        whitened = sum(self.layer_clip ** 2 / s ** 2 for s in stds)
        if whitened > (1 + 1e-9) / self.noise_multiplier ** 2:
            raise RuntimeError(f"ANADP noise allocation breaks the privacy invariant: sum C_k^2/s_k^2 = {whitened:.6g} "
                               f"> 1/sigma^2 = {1 / self.noise_multiplier ** 2:.6g}")
        return stds

    def stds(self, released: list[Released]) -> list[float]:
        """The noise std of each released tensor: its group's s_k."""
        stds = self.group_stds()
        return [stds[self.group_of[r.tensor]] for r in released]

    @torch.no_grad()
    def observe(self, step: int, released: dict[nn.Parameter, torch.Tensor]) -> None:
        """Update the importance state with step ``step``'s released gradient (already noised, the
        same on every replica), and re-allocate the weights used from step ``step + 1`` on."""
        b1, b2 = self.beta1, self.beta2
        for p, grad in released.items():
            state = self.sensitivity[p]
            sensitivity = (p.detach().to(state.dtype) * grad.to(state.dtype)).abs_()
            self.sensitivity[p].mul_(b1).add_(sensitivity, alpha=1 - b1)
            self.uncertainty[p].mul_(b2).add_((sensitivity - self.sensitivity[p]).abs_(), alpha=1 - b2)
        done = step + 1
        if done >= self.warmup_steps and (done - self.warmup_steps) % self.refresh_every == 0:
            self.weights = self._allocate(self._group_importance())

    def _group_importance(self) -> torch.Tensor:
        """S_k: the mean importance over each group's coordinates, summed over tensor-parallel shards
        (a replicated parameter counts once, on tensor rank 0), so every rank gets the same S."""
        totals = torch.zeros(2 * len(self.groups), dtype=torch.float64)
        counts_once = group_rank(self.tp_group) == 0
        for k, group in enumerate(self.groups):
            for p in group:
                if getattr(p, "tensor_model_parallel", False) or counts_once:
                    rows = unpadded_local_rows(p)  # vocabulary padding would tie S to the tensor degree
                    importance = self.sensitivity[p][:rows].double() * self.uncertainty[p][:rows].double()
                    totals[k] += float(importance.sum())
                    totals[len(self.groups) + k] += importance.numel()
        if group_size(self.tp_group) > 1:
            dist.all_reduce(totals, group=self.tp_group)
        return totals[:len(self.groups)] / totals[len(self.groups):]

    def _allocate(self, importance: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(importance).all()) or float(importance.sum()) <= 0:
            return torch.full_like(self.weights, 1.0 / len(self.groups))
        raw = importance.clamp(min=0) ** self.temperature
        weights = raw / raw.sum()
        floor = self.min_weight / len(self.groups)
        weights = weights.clamp(min=floor)
        return weights / weights.sum()

    def state_dict(self) -> dict:
        """Every tensor an exact resume needs, by checkpoint key (``Sharded`` as its parameter is)."""
        state = {"anadp/weights": self.weights}
        for p in self.sensitivity:
            state[f"anadp/{self.names[p]}/sensitivity"] = Sharded(self.sensitivity[p], p)
            state[f"anadp/{self.names[p]}/uncertainty"] = Sharded(self.uncertainty[p], p)
        return state

    def load_state_dict(self, state: dict) -> None:
        load_into(self.state_dict(), state)
