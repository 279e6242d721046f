"""Public auditing API: the engine's own per-example norms and clipped sums, for reviewers and tests.

Both functions run the same code path as training (``dpdist.privacy.step.DPStep``) on one
process, with no noise, and work in float64 when the model is float64, so they can be compared with
brute-force per-example gradients.  In a bf16 model the clipped sums are fp32, as in training, and
``removal_shift`` on ``near_duplicates`` checks the sensitivity bound in that precision.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .privacy.step import DPStep


def _engine(model: nn.Module, input_ids: torch.Tensor, clip_norm: float, **options) -> DPStep:
    batch, seq_len = input_ids.shape
    return DPStep(model, clip_norm=clip_norm, micro_batch_size=batch, seq_len=seq_len, **options)


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


def near_duplicates(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``batch`` copies of one random sequence, each with one token changed.
    Their clipped gradients nearly align, so the clipped sum grows like batch x C: the case where a sum
    rounded in low precision moves by more than C when one example is removed."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (seq_len + 1,), generator=generator).repeat(batch, 1)
    where = torch.randint(0, seq_len + 1, (batch,), generator=generator)
    tokens[torch.arange(batch), where] = torch.randint(0, vocab_size, (batch,), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def removal_shift(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, clip_norm: float,
                  removed, **options) -> float:
    """The largest ||S(D) - S(D - {i})|| / C over the examples i in ``removed``, where S is the pre-noise
    clipped sum (``clipped_sum`` with ``options``) in the model's own precision, compared in float64.
    Removing example i leaves the batch's shape and every other row as it is: its labels are ignored,
    so it has no target token and contributes nothing, as a padding row does."""
    full = clipped_sum(model, input_ids, labels, clip_norm, **options)
    worst = 0.0
    for i in removed:
        neighbour = labels.clone()
        neighbour[i] = -100
        sums = clipped_sum(model, input_ids, neighbour, clip_norm, **options)
        shift = sum((full[n].double() - sums[n].double()).pow(2).sum() for n in full)
        worst = max(worst, float(shift.sqrt()) / clip_norm)
    return worst


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
