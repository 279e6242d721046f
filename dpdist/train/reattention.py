"""Re-Attention's inputs for a run, resolved once, before the model is built.

The model corrects its attention for the DP noise left in its weights (``dpdist.model.reattention``):
it needs that noise's size (sigma C and qN, from the run's plan) and the token frequencies
(``dpdist.privacy.frequencies``).  In training, rank 0 resolves the frequencies, drawing and charging
the ``dp`` release there and nowhere else, and every rank receives rank 0's; an evaluation of a
finished run reads the release its training saved and draws nothing.  Either way the model is built
with one :class:`~dpdist.model.reattention.Reattention`, or with None when there is nothing to correct.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..model.reattention import Reattention, weight_noise
from ..privacy import frequencies
from ..runtime.mesh import Mesh

if TYPE_CHECKING:  # plan.py imports this module for release_history
    from .plan import RunPlan


def draws_release(cfg: RunConfig) -> bool:
    """Whether the run draws the DP frequency release: a private run whose correction is on and uses ``dp``."""
    r = cfg.reattention
    return cfg.privacy.enabled and r.enabled and r.variance_scale > 0 and r.frequencies == "dp"


def release_history(cfg: RunConfig) -> list[tuple[float, float, int]]:
    """What the frequency release of ``cfg`` adds to the ledger, as accounting's ``prior``: the plan must
    fit it into the budget along with the steps."""
    return frequencies.release_entry(cfg.reattention.frequency_noise) if draws_release(cfg) else []


def reattention_for_training(cfg: RunConfig, plan: RunPlan, data, run_dir: Path, mesh: Mesh, secret: int,
                             ledger) -> Reattention | None:
    """The training loop's one call, before it builds the model (None unless ``reattention.enabled``):
    rank 0 resolves the token frequencies, drawing the ``dp`` release and charging ``ledger`` (None
    without DP) unless the run already did, and every rank receives rank 0's."""
    if not cfg.reattention.enabled:
        return None
    p = torch.empty(cfg.model.vocab_size, dtype=torch.float64)
    if mesh.is_main:
        p = _frequencies(cfg, plan, run_dir, data=data, secret=secret, ledger=ledger)
    if mesh.world_size > 1:
        shared = p.to(mesh.device)
        dist.broadcast(shared, src=0, group=mesh.world_group)
        p = shared.cpu()
    return _reattention(cfg, plan, p.to(mesh.device))


def reattention_of_finished_run(run_dir: Path, cfg: RunConfig, plan: RunPlan,
                                device: torch.device) -> Reattention | None:
    """What the model of the run in ``run_dir`` corrected for in training, from its saved release, so
    that an evaluation computes what training computed; no release is ever drawn outside training."""
    if not cfg.reattention.enabled:
        return None
    return _reattention(cfg, plan, _frequencies(cfg, plan, run_dir).to(device))


def _frequencies(cfg: RunConfig, plan: RunPlan, run_dir: Path, **drawing) -> torch.Tensor:
    r = cfg.reattention
    if r.frequencies == "dp" and not draws_release(cfg):
        # nothing to correct (no DP noise, or lambda = 0): no release is needed
        return torch.ones(cfg.model.vocab_size, dtype=torch.float64)
    return frequencies.token_frequencies(r.frequencies, cfg.model.vocab_size, plan.num_examples, cfg.data.seq_len,
                                         r.frequency_noise, run_dir, **drawing)


def _reattention(cfg: RunConfig, plan: RunPlan, p: torch.Tensor) -> Reattention | None:
    """sigma C (0 without DP), qN and p as the model's weight noise; None when it is zero."""
    noise_std = plan.noise_multiplier * cfg.privacy.clip_norm if cfg.privacy.enabled else 0.0
    noise = weight_noise(noise_std, plan.expected_batch_size, p, cfg.reattention.variance_scale, cfg.model.padding_idx)
    return None if noise is None else Reattention(noise, cfg.reattention.block_indices(cfg.model.n_layers))
