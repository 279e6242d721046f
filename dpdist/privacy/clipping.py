"""Clip factors from per-example norms.

Flat (Abadi et al.): c_i = min(1, C / (n_i + 1e-6)), so ||c_i g_i|| <= C.  Automatic (Bu et al.):
c_i = C / (n_i + gamma), so ||c_i g_i|| = C n_i / (n_i + gamma) < C.  Per-layer clipping applies the
flat rule to each layer group with C_k = C / sqrt(K), so that sqrt(sum_k C_k^2) = C and the Gaussian
mechanism's sensitivity is unchanged.

An example whose norm is not finite (an inf or NaN activation or gradient) gets the factor 0: its
contribution is dropped, which keeps the sensitivity bound, instead of turning the whole sum, and with
it a release, into NaN (a data-dependent event that no noise covers).
"""
from __future__ import annotations

import math

import torch

EPS = 1e-6


def clip_factors(norms: torch.Tensor, clip_norm: float, method: str = "flat", gamma: float = 0.01) -> torch.Tensor:
    if method == "automatic":
        factors = clip_norm / (norms + gamma)
    else:
        factors = torch.clamp(clip_norm / (norms + EPS), max=1.0)
    return torch.where(torch.isfinite(norms), factors, 0.0)


def per_layer_threshold(clip_norm: float, num_groups: int) -> float:
    return clip_norm / math.sqrt(num_groups)
