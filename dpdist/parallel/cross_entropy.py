"""Per-example language-model loss on vocabulary-sharded logits (Megatron's vocab-parallel cross-entropy).

The privacy unit is one example, so the loss is reduced per example: L_i is the mean token
cross-entropy over example i's target tokens, and labels equal to ``IGNORE_INDEX`` count for nothing.
Normalising by the tokens of the whole batch instead would make one example's gradient depend on the
others (algorithms.md §1, rule 1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .mappings import group_size

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Token losses from logits split over the tensor group along the vocabulary; three all-reduces
    (max, target logit, sum of exponentials) and a purely local backward."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local_vocab = logits.shape[-1]
        inside = (target >= vocab_start) & (target < vocab_start + local_vocab)
        local_target = torch.where(inside, target - vocab_start, torch.zeros_like(target))
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * inside
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_target, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, inside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside.unsqueeze(-1).to(grad.dtype))
        return grad * grad_loss.unsqueeze(-1), None, None, None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int = 0, tp_group=None) -> torch.Tensor:
    """Cross-entropy per token, ``[B, T]``, zero where the label is ignored."""
    valid = labels != IGNORE_INDEX
    if group_size(tp_group) == 1:
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view(labels.shape)
    target = torch.where(valid, labels, torch.zeros_like(labels))
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, tp_group) * valid


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int = 0, tp_group=None) -> torch.Tensor:
    """L_i = mean cross-entropy over example i's target tokens, ``[B]`` (0 for an example with none)."""
    losses = token_losses(logits, labels, vocab_start=vocab_start, tp_group=tp_group)
    counts = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return losses.sum(-1) / counts.to(losses.dtype)
