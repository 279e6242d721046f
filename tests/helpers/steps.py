"""The DP step as the tests build it: native seams, plain DP-SGD or one method's seam object."""
from __future__ import annotations

from dpdist.privacy.step import AllReduce, DPStep, KeyedNoise, UniformNoise
from dpdist.train import methods


def private_step(model, *, clip_norm: float, noise_multiplier: float = 0.0, secret: int = 0, dp_group=None,
                 tp_group=None, lsg=None, anadp=None, **options) -> DPStep:
    """``DPStep`` on one data group with keyed noise; ``lsg`` / ``anadp``: that config section's method."""
    parametrization = methods.lsg(lsg, model) if lsg is not None else None
    if anadp is not None:
        scales = methods.anadp(anadp, model, clip_norm=clip_norm, noise_multiplier=noise_multiplier, tp_group=tp_group)
    else:
        scales = UniformNoise(noise_multiplier * clip_norm)
    return DPStep(model, clip_norm=clip_norm, tp_group=tp_group, reduce=AllReduce(dp_group), add_noise=KeyedNoise(secret),
                  parametrization=parametrization, noise_scales=scales, **options)
