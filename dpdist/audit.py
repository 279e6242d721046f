"""Public auditing API: the engine's own per-example norms and clipped sums, for reviewers and tests.

Both functions run the same code path as training (``dpdist.train.engine.PrivateGradient``) on one
process, with no noise, and work in float64 when the model is float64, so they can be compared with
brute-force per-example gradients.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .train.engine import PrivateGradient


def _engine(model: nn.Module, input_ids: torch.Tensor, clip_norm: float, **options) -> PrivateGradient:
    batch, seq_len = input_ids.shape
    return PrivateGradient(model, clip_norm=clip_norm, micro_batch_size=batch, seq_len=seq_len, **options)


def per_example_norms(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                      mode: str = "bookkeeping", strategy: str | None = None,
                      memory_budget_bytes: float | None = None) -> torch.Tensor:
    """Per-example gradient L2 norms over all trainable parameters, ``[B]``."""
    engine = _engine(model, input_ids, float("inf"), mode=mode, strategy=strategy,
                     memory_budget_bytes=memory_budget_bytes)
    try:
        losses = engine.loss(input_ids, labels)
        losses.sum().backward()
        return engine.tap.take_sq_norms().sqrt().detach()
    finally:
        engine.detach()


def clipped_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, clip_norm: float, *,
                clipping: str = "flat", automatic_gamma: float = 0.01, mode: str = "bookkeeping",
                strategy: str | None = None, memory_budget_bytes: float | None = None) -> dict[str, torch.Tensor]:
    """The pre-noise clipped gradient sum sum_i c_i grad L_i, keyed by parameter name."""
    engine = _engine(model, input_ids, clip_norm, clipping=clipping, automatic_gamma=automatic_gamma, mode=mode,
                     strategy=strategy, memory_budget_bytes=memory_budget_bytes)
    try:
        engine.microbatch(input_ids, labels)
        return {name: grad.detach() for name, grad in engine.clipped_sums().items()}
    finally:
        engine.detach()


def brute_force_grads(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: [B, *shape]}`` by ``torch.func`` on the plain model: the reference
    the engine is checked against (memory B x parameters, so only for audits on small batches)."""
    from torch.func import functional_call, grad, vmap

    from .parallel.cross_entropy import per_example_loss

    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(params, ids, target):
        logits = functional_call(model, params, (ids.unsqueeze(0),))
        return per_example_loss(logits, target.unsqueeze(0), vocab_start=getattr(model, "vocab_start", 0))[0]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, input_ids, labels)
