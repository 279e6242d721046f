"""Full (unsharded) parameters from tensor-parallel shards, for saving and for comparing layouts.

Reads the sharding marks the layers put on their parameters (``tensor_model_parallel``,
``partition_dim``) and all-gathers each sharded one over its layer's tensor group; replicated ones are
returned as they are.  Every rank of the group gets the full tensors.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .mappings import group_size


class Sharded(NamedTuple):
    """A tensor held sharded as parameter ``like`` is (a component's state, e.g. a moving average of
    that parameter's gradient): a checkpoint saves it at the parameter's full shape."""

    tensor: torch.Tensor
    like: nn.Parameter


def gather_full(param: torch.Tensor, group, local: torch.Tensor | None = None) -> torch.Tensor:
    """The full ``param``, or with ``local`` the full tensor of which ``local`` is this rank's shard
    sharded as ``param`` is (a gradient, an optimizer state)."""
    local = (param if local is None else local).detach()
    if not getattr(param, "tensor_model_parallel", False) or group_size(group) == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(group_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def unpadded_local_rows(param: torch.Tensor) -> int:
    """This shard's rows that are real, not padding: a vocabulary table is padded to split evenly
    over the tensor group, and its layer marks the real row count as ``unpadded_rows``."""
    unpadded = getattr(param, "unpadded_rows", None)
    if unpadded is None:
        return param.shape[0]
    return max(0, min(param.shape[0], unpadded - getattr(param, "partition_offset", 0)))


def full_state_dict(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every parameter at its full shape, in ``named_parameters`` order (a collective over ``tp_group``)."""
    return {name: gather_full(p, tp_group) for name, p in model.named_parameters()}


def replica_state_dict(model: nn.Module, mesh) -> dict[str, torch.Tensor] | None:
    """``full_state_dict`` on the first data-parallel replica, whose ranks hold every parameter between
    them (None on the other replicas, which hold the same)."""
    return full_state_dict(model, mesh.tp_group) if mesh.dp_rank == 0 else None


def load_into(own: dict, loaded: dict) -> None:
    """Copy a checkpoint's ``loaded`` values into a component's own state tensors ``own`` (its
    ``state_dict()``: tensors, or ``Sharded`` ones) in place, so the component keeps its tensors.  A
    loaded value may lack the rows that pad a vocabulary table for the tensor split."""
    with torch.no_grad():
        for key, target in own.items():
            target = target.tensor if isinstance(target, Sharded) else target
            value = loaded[key]
            value = value.tensor if isinstance(value, Sharded) else value
            if value.data_ptr() != target.data_ptr():  # the padding rows of a vocabulary-sharded one keep theirs
                target.narrow(0, 0, value.shape[0]).copy_(value)
