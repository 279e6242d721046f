"""The DP step as the tests build it: native seams, plain DP-SGD or one method's seam object."""
from __future__ import annotations

from dpdist.privacy.step import DPStep, native_step
from dpdist.train import methods


def private_step(model, *, clip_norm: float, noise_multiplier: float = 0.0, tp_group=None, lsg=None, anadp=None,
                 **options) -> DPStep:
    """``native_step`` with ``lsg`` / ``anadp`` (that config section) as its parametrization / noise scales."""
    parametrization = methods.lsg(lsg, model) if lsg is not None else None
    scales = None
    if anadp is not None:
        scales = methods.anadp(anadp, model, clip_norm=clip_norm, noise_multiplier=noise_multiplier, tp_group=tp_group)
    return native_step(model, clip_norm=clip_norm, noise_multiplier=noise_multiplier, tp_group=tp_group,
                       parametrization=parametrization, noise_scales=scales, **options)
