"""The native backend: every data-parallel rank holds the full weights, gradients and optimizer state
of its tensor-parallel shard; the DP step sums the clipped sums over the data group with one
all-reduce, to which each data-parallel rank has added the keyed noise of its 1/D share of the
coordinates.  Checkpoints are DCP (``dpdist.train.dcp_state``), so they reshard between (data, tensor)
layouts.
"""
from __future__ import annotations

import torch
from torch import nn

from ...parallel.state import replica_state_dict
from ...privacy.step import AllReduce, KeyedNoise
from ...runtime.mesh import Mesh
from .. import dcp_state


class NativeBackend:
    reads = ("native", "fsdp")  # DCP shards, resharded to any layout

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = None

    def describe(self) -> str:
        return ""

    def prepare(self, model, optimizer, mesh):
        self.mesh = mesh
        return optimizer

    def dp_seams(self, secret: int, expected_batch_size: float) -> tuple[AllReduce, KeyedNoise]:
        return AllReduce(self.mesh.dp_group), KeyedNoise(secret, self.mesh.dp_rank, self.mesh.dp_size)

    def nonprivate_seam(self):
        return None  # plain autograd and an all-reduce per gradient (NonPrivateStep's own)

    def identity(self) -> dict:
        return {"name": "native"}

    def check_resume(self, saved: dict, folder, saved_layout: dict, layout: dict) -> None:
        pass  # DCP reshards to any layout

    def save(self, folder, model, optimizer, components: list, mesh) -> None:
        dcp_state.save(folder, model, optimizer, components, mesh)

    def load(self, folder, model, optimizer, components: list, mesh) -> None:
        dcp_state.load(folder, model, optimizer, components, mesh, self.cfg.train.optimizer)

    def full_state_dict(self, model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor] | None:
        return replica_state_dict(model, mesh)
