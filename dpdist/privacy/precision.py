"""Every pre-noise quantity is fp32 or wider, whatever the model computes in.

A bf16 or fp16 sum of clipped gradients is rounded before the noise, and the rounding depends on every
example: removing one of 512 near-duplicates moved a bf16 sum by 1.6 C, past the sensitivity bound
the noise is calibrated to.  Records, norms, sums, reductions and the noise are therefore held in
``accumulation_dtype`` of the model's dtype.
"""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a pre-noise quantity of a ``dtype`` model is held in: fp32 for bf16/fp16, else itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its accumulation dtype (token ids and other integers as they are)."""
    return tensor.to(accumulation_dtype(tensor.dtype))
