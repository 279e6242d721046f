"""Autograd-aware collectives over a tensor-parallel group (Megatron's ``mappings.py``, device-agnostic).

Each function pairs a forward collective with the backward collective that makes the gradient right,
named by the region the tensor enters or leaves.  All of them are the identity when the group has one
rank, so a tensor degree of 1 costs nothing, and all allocate on the input's device so that gloo/CPU
and NCCL/GPU run the same code.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def group_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over ``group`` into a new tensor (``x`` itself is left as it is)."""
    return x if group_size(group) == 1 else _all_reduce(x.clone(memory_format=torch.contiguous_format), group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce: the input of a column-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce, backward identity: the output of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)

