"""Backends: what holds the weights, gradients and optimizer state, and how gradients are reduced.

A backend is one class in its own file, registered below by the ``train.backend`` name that picks it.
Everything backend-specific is a method of it, so the loop, the engine and the checkpoint never ask
which backend they run:

- ``validate(cfg)`` (static): refuse settings it cannot honour, when the config is read;
- ``describe()``: its part of the run's one-line layout summary;
- ``prepare(model, optimizer, mesh)``: wrap them, return the optimizer the loop steps;
- ``dp_seams(secret, expected_batch_size)``: the DP step's ``reduce`` and ``add_noise`` seams
  (``dpdist.privacy.step``); ``nonprivate_seam()``: the non-private step's backward and reduction;
- ``identity()`` and ``check_resume(saved, folder, saved_layout, layout)``: what a checkpoint records
  of it and whether this run can load one it wrote;
- ``save(folder, state)`` / ``load(folder, state)``: write and read model, optimizer and component
  state (``dpdist.train.checkpoint`` owns the commit protocol around them).

Adding one (FSDP is next) is a new file with such a class plus one line in ``BACKENDS``.
"""
from __future__ import annotations

import importlib

BACKENDS = {  # train.backend -> "module:class"
    "native": "dpdist.train.backends.native:NativeBackend",
    "deepspeed": "dpdist.train.backends.deepspeed:DeepSpeedBackend",
}


def backend_class(name: str):
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def backend_for(cfg):
    """The backend of run config ``cfg`` (its constructor imports nothing heavy)."""
    return backend_class(cfg.train.backend)(cfg)
