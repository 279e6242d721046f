"""The run's gradient computation, assembled once from the config: the backend, the DP step with its
four seams (the backend's reduce and add_noise, the method's parametrization and noise scales), or
the non-private baseline in the same shape.  The step itself is ``dpdist.privacy.step``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..privacy.step import DPStep, NonPrivateStep
from ..runtime.mesh import Mesh
from . import methods
from .backends import backend_for
from .plan import RunPlan


@dataclass
class Gradient:
    step: DPStep | NonPrivateStep  # microbatch(...) per micro-batch, release(index, step) per step
    optimizer: object  # what the loop steps (the backend's wrapper where it has one)
    backend: object  # saves and loads the checkpoint's state
    components: list  # what else a checkpoint holds: objects with state_dict() / load_state_dict()


def build_gradient(cfg: RunConfig, plan: RunPlan, model, optimizer, mesh: Mesh, secret: int) -> Gradient:
    backend = backend_for(cfg)
    optimizer = backend.prepare(model, optimizer, mesh)
    if not cfg.privacy.enabled:
        step = NonPrivateStep(model, expected_batch_size=plan.expected_batch_size, dp_group=mesh.dp_group,
                              tp_group=mesh.tp_group, backend=backend.nonprivate_seam())
        return Gradient(step, optimizer, backend, [])
    p = cfg.privacy
    reduce, add_noise = backend.dp_seams(secret, plan.expected_batch_size)
    parametrization = methods.parametrization(cfg, plan, model, mesh)
    noise_scales = methods.noise_scales(cfg, plan, model, mesh)
    step = DPStep(model, clip_norm=p.clip_norm, expected_batch_size=plan.expected_batch_size, clipping=p.clipping,
                  automatic_gamma=p.automatic_gamma, mode=p.mode, micro_batch_size=cfg.train.micro_batch_size,
                  seq_len=cfg.data.seq_len,
                  memory_budget_bytes=p.memory_budget_mb * 2**20 if p.memory_budget_mb is not None else None,
                  tp_group=mesh.tp_group, reduce=reduce, add_noise=add_noise, parametrization=parametrization,
                  noise_scales=noise_scales)
    components = [c for c in (parametrization, noise_scales) if c.state_dict()]
    return Gradient(step, optimizer, backend, components)
