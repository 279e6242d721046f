"""``train.precision``: what the model's forward and backward compute in, with the weights kept fp32.

``bf16`` runs every forward of the model under ``torch.autocast`` (bf16 matmuls, fp32 norms and
softmax), so the backward's matmuls run in bf16 too, while the parameters, their updates and the
optimizer state stay fp32: an update below a bf16 ulp of a weight still moves it, which pure bf16
weights (``model.dtype=bfloat16``, refused for training) would round away.

The autocast region is the model's forward alone, entered by a forward pre-hook and left by a
forward hook, not a context around the DP step: the tap's norm rules run in the backward, on
records it widens to fp32 (``dpdist.privacy.precision``), and inside autocast their matmuls would
be cast back to bf16.  The logits leave the forward in fp32, so the loss and its gradient are fp32.
"""
from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


class Bf16Forward:
    """Hooks that run ``model``'s forward under bf16 autocast on ``device_type`` and return fp32 logits."""

    def __init__(self, model: nn.Module, device_type: str):
        self.device_type = device_type
        self._region: torch.autocast | None = None
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave, always_call=True)  # also when the forward raises

    def _enter(self, module: nn.Module, args) -> None:
        self._region = torch.autocast(self.device_type, dtype=torch.bfloat16)
        self._region.__enter__()

    def _leave(self, module: nn.Module, args, logits: torch.Tensor) -> torch.Tensor:
        region, self._region = self._region, None
        region.__exit__(None, None, None)
        return logits.float()


def apply_precision(precision: str, model: nn.Module, device: str | torch.device) -> Bf16Forward | None:
    """Make ``model`` (fp32 parameters) compute in ``precision``; None for fp32, which changes nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return None
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"train.precision=bf16 keeps fp32 master weights; the model's are {sorted(map(str, dtypes))}, "
                         "so set model.dtype=float32")
    return Bf16Forward(model, torch.device(device).type)
