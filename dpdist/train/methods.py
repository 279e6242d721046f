"""The optional DP methods, each one object in a seam of the DP step, built from its config section.

A method is chosen by its section's ``enabled``; what it combines with is decided in
``dpdist.config`` (``RunConfig.validate``), nowhere else.  Adding one is its own file with the seam
object (or the model transform), its config section, and one line in a registry below.

A model transform (LoRA) changes the built model itself, once, before anything else sees it: the
optimizer, the DP step, checkpoints and the saved model all work on the transformed model, and the DP
step releases its trainable parameters through the default parametrization.
"""
from __future__ import annotations

import dataclasses

from ..model.lora import add_adapters
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


def lora(section, model, *, tp_group=None, seed: int = 0) -> list[str]:
    """LoRA adapters on ``model``'s targeted block linears, as the ``lora`` config ``section`` says."""
    return add_adapters(model, **_settings(section), tp_group=tp_group, seed=seed)


# config section -> transform(cfg, model, tp_group), applied in place right after the model is built
MODEL_TRANSFORMS = {"lora": lambda cfg, model, tp_group: lora(cfg.lora, model, tp_group=tp_group,
                                                              seed=cfg.model.init_seed)}
# config section -> builder(cfg, plan, model, mesh): one line per method
PARAMETRIZATIONS = {"lsg": lambda cfg, plan, model, mesh: lsg(cfg.lsg, model)}
NOISE_SCALES = {"anadp": lambda cfg, plan, model, mesh: anadp(cfg.anadp, model, clip_norm=cfg.privacy.clip_norm,
                                                               noise_multiplier=plan.noise_multiplier,
                                                               tp_group=mesh.tp_group)}


def transform_model(cfg, model, tp_group=None):
    """Apply the enabled model transforms to ``model`` (built for ``tp_group``) in place; returns it."""
    for section, transform in MODEL_TRANSFORMS.items():
        if getattr(cfg, section).enabled:
            transform(cfg, model, tp_group)
    return model


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
