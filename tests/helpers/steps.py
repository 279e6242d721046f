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


def noisy_sgd_steps(engine: DPStep, model, input_ids, labels, releases: int, lr: float = 0.5) -> None:
    """``releases`` noisy steps of plain SGD on one fixed batch (release indices 0, 1, ...)."""
    import torch

    for release in range(releases):
        engine.microbatch(input_ids, labels)
        engine.release(release)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
                    p.grad = None
