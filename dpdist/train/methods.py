"""The optional DP methods, each one object in a seam of the DP step, built from its config section.

A method is chosen by its section's ``enabled``; what it combines with is decided in
``dpdist.config`` (``RunConfig.validate``), nowhere else.  Adding one (LoRA is next) is its own file
with the seam object, its config section, and one line in a registry below.
"""
from __future__ import annotations

import dataclasses

from ..privacy.anadp import NoiseAllocation
from ..privacy.lsg import LowRankGradients
from ..privacy.step import Identity, UniformNoise, dp_layers


def _settings(section) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "enabled"}


def lsg(section, model) -> LowRankGradients:
    """LSG's carriers on every block linear layer of ``model``, as the ``lsg`` config ``section`` says."""
    return LowRankGradients(model, **_settings(section))


def anadp(section, model, *, clip_norm: float, noise_multiplier: float, tp_group=None) -> NoiseAllocation:
    """ANADP's allocation over ``model``'s DP layers (one group each), as the ``anadp`` ``section`` says."""
    names = {p: name for name, p in model.named_parameters() if p.requires_grad}
    groups = [[p for p in layer.parameters(recurse=False) if p.requires_grad] for layer in dp_layers(model)]
    return NoiseAllocation(groups, names, clip_norm=clip_norm, noise_multiplier=noise_multiplier, tp_group=tp_group,
                           **_settings(section))


# config section -> builder(cfg, plan, model, mesh): one line per method
PARAMETRIZATIONS = {"lsg": lambda cfg, plan, model, mesh: lsg(cfg.lsg, model)}
NOISE_SCALES = {"anadp": lambda cfg, plan, model, mesh: anadp(cfg.anadp, model, clip_norm=cfg.privacy.clip_norm,
                                                               noise_multiplier=plan.noise_multiplier,
                                                               tp_group=mesh.tp_group)}


def parametrization(cfg, plan, model, mesh):
    """What the step clips, noises and releases: the enabled parametrization, or the parameters themselves."""
    chosen = [build for section, build in PARAMETRIZATIONS.items() if getattr(cfg, section).enabled]
    return chosen[0](cfg, plan, model, mesh) if chosen else Identity()


def noise_scales(cfg, plan, model, mesh):
    """The noise std of each released tensor: the enabled allocation, or sigma C everywhere."""
    chosen = [build for section, build in NOISE_SCALES.items() if getattr(cfg, section).enabled]
    if chosen:
        return chosen[0](cfg, plan, model, mesh)
    return UniformNoise(plan.noise_multiplier * cfg.privacy.clip_norm)
