"""Backends: what holds the weights, gradients and optimizer state, and how gradients are reduced.

A backend is one class in its own file, registered below by the ``train.backend`` name that picks it.
Everything backend-specific is a method of it, so the loop, the engine and the checkpoint never ask
which backend they run:

- ``describe()``: its part of the run's one-line layout summary;
- ``prepare(model, optimizer, mesh)``: wrap them, return the optimizer the loop steps;
- ``dp_seams(secret, expected_batch_size)``: the DP step's ``reduce`` and ``add_noise`` seams
  (``dpdist.privacy.step``); ``nonprivate_seam()``: the non-private step's backward and reduction;
- ``identity()``, ``reads`` and ``check_resume(saved, folder, saved_layout, layout)``: what a
  checkpoint records of it, which backends' checkpoints it reads, and whether this run can load one;
- ``save(folder, state)`` / ``load(folder, state)``: write and read model, optimizer and component
  state (``dpdist.train.checkpoint`` owns the commit protocol around them);
- ``full_state_dict(model, mesh)``: every parameter at its full shape for the final weights (None on
  ranks that need not write them).

Settings a backend cannot honour are refused when the config is read, by its registered checker: a
function of the run config in a module that imports no torch, so reading a config stays cheap.

Adding one is a new file with such a class plus one line in ``BACKENDS``.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple


class Registered(NamedTuple):
    backend: str  # "module:class"
    check: str | None = None  # "module:function" refusing a run config this backend cannot run


BACKENDS = {  # train.backend -> its class and config check
    "native": Registered("dpdist.train.backends.native:NativeBackend"),
    "fsdp": Registered("dpdist.train.backends.fsdp:FSDPBackend"),
    "deepspeed": Registered("dpdist.train.backends.deepspeed:DeepSpeedBackend",
                            "dpdist.deepspeed_config:resolve_deepspeed_config"),
}


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def check_backend_config(cfg) -> None:
    """Raise ``ConfigError`` for settings ``cfg``'s backend refuses (before any process starts)."""
    check = BACKENDS[cfg.train.backend].check
    if check is not None:
        _load(check)(cfg)


def backend_for(cfg):
    """The backend object of run config ``cfg`` (its constructor starts nothing)."""
    return _load(BACKENDS[cfg.train.backend].backend)(cfg)
