"""The data x tensor process mesh, built once from the config and the launcher's environment.

Tensor-parallel ranks are contiguous (rank = dp_rank * tp + tp_rank) so that a tensor group stays
inside a node.  Every group is created on every rank in the same order, because ``new_group`` is a
collective.  A group of one rank is represented by ``None``, which every collective in dpdist treats
as "nothing to do", so a single process needs no process group at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
# torch imports this module lazily (through _dynamo, on an optimizer's first param group) and its
# functions bind ``group.WORLD`` as a default argument when defined.  Imported after
# init_process_group that default is the live group, which then outlives destroy_process_group and can
# abort the interpreter at exit ("terminate called without an active exception"); imported here,
# before any group exists, the default is None.
import torch.distributed.nn.functional  # noqa: F401

from ..config import ConfigError, ParallelConfig


@dataclass
class Mesh:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_group: object = None
    tp_group: object = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_group(self):
        return dist.group.WORLD if self.world_size > 1 else None


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_mesh(cfg: ParallelConfig) -> Mesh:
    world = launched_world_size()
    if world != cfg.world_size:
        raise ConfigError(f"the job has {world} processes but parallel.data x parallel.tensor = "
                          f"{cfg.data} x {cfg.tensor} = {cfg.world_size}; launch {cfg.world_size} processes "
                          "or change parallel.data / parallel.tensor")
    device = torch.device(cfg.device)
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world == 1:
        return Mesh(device=device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.device == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, tp = dist.get_rank(), cfg.tensor
    mesh = Mesh(rank=rank, world_size=world, dp_rank=rank // tp, dp_size=cfg.data, tp_rank=rank % tp, tp_size=tp,
                device=device)
    for dp_index in range(cfg.data):  # tensor groups: contiguous ranks
        ranks = list(range(dp_index * tp, (dp_index + 1) * tp))
        group = dist.new_group(ranks) if tp > 1 else None
        if rank in ranks:
            mesh.tp_group = group
    for tp_index in range(tp):  # data groups: the same tensor rank in every replica
        ranks = list(range(tp_index, world, tp))
        group = dist.new_group(ranks) if cfg.data > 1 else None
        if rank in ranks:
            mesh.dp_group = group
    return mesh


def shutdown(mesh: Mesh) -> None:
    """Barrier, then destroy: without the barrier gloo aborts at exit in about a third of runs."""
    if mesh.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
