"""Full (unsharded) parameters from tensor-parallel shards, for saving and for comparing layouts.

Reads the sharding marks the layers put on their parameters (``tensor_model_parallel``,
``partition_dim``) and all-gathers each sharded one over its layer's tensor group; replicated ones are
returned as they are.  Every rank of the group gets the full tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .mappings import group_size


def gather_full(param: torch.Tensor, group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or group_size(group) == 1:
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(group_size(group))]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def full_state_dict(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter at its full shape, in ``named_parameters`` order (a collective over ``tp_group``)."""
    return {name: gather_full(p, tp_group) for name, p in model.named_parameters()}
