"""FSDP2 as the data-parallel backend: torch's ``fully_shard`` over the data group, composed with
dpdist's tensor parallelism (2-D: each tensor-parallel shard is further sharded over the data group).

``train.backend=fsdp``.  Every transformer block is its own FSDP unit and the model's root holds the
rest (embeddings, final norm, output layer), so besides the root's only the block being computed (and
the one FSDP prefetches) is unsharded.  The model is built whole on each tensor rank and then sharded:
one tensor shard of the weights must fit once; gradients and optimizer state are never whole.  What
stays dpdist's:

- **Clipping.** The layers record for the tap during an ordinary ``backward`` (FSDP's hooks gather
  each block's parameters for it) and form no weight gradient there, so FSDP reduces nothing of the
  unclipped pass.  The tap keys everything by the sharded parameters (it holds the parameters a layer
  had when it was attached), whatever FSDP swaps in during the backward.
- **Sums.** Each layer's clipped sum is reduce-scattered over the data group as soon as it is formed
  (``ShardedSums``: under per-layer clipping during the backward, under book-keeping right after it),
  in fp32 or wider, and this rank keeps only the shard it owns.  No rank holds the whole model's gradient: the
  largest transient is one layer's sum.  Two-pass clipping's weighted backward lets FSDP form and
  reduce-scatter the gradients itself (summed, in the parameters' dtype), and the shards are moved into
  the same store (two-pass under bf16 compute is refused: its gradients would be formed in bf16).
- **Noise** (``ShardNoise``): each rank adds the keyed noise of exactly the coordinates it owns,
  keyed by the index in the full parameter, so the values do not depend on the layout, and noise
  time per rank falls as 1/D.  ``verify_pieces`` checks at start-up that the shards cover every
  element exactly once over the data group.
- **Checkpoints** are DCP, with every shard exposed as a DTensor view of the full parameter on a
  (tensor, data) mesh, so they reshard between fsdp and native layouts and across degrees.

Vocabulary tables are sharded over the data group along their columns: their rows are padded for the
tensor split, and splitting them again by rows would cut at places that depend on the padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...model import TRANSFORMER_BLOCKS
from ...parallel.state import gather_full
from ...privacy.noise import keyed_normal
from ...privacy.precision import accumulation_dtype
from ...privacy.step import Released, full_shape, shard_box
from ...runtime.mesh import Mesh
from .. import dcp_state

SHARDING_MARKS = ("tensor_model_parallel", "partition_dim", "partition_offset", "full_shape", "unpadded_rows")


@dataclass(frozen=True)
class Piece:
    """The part of a (tensor-parallel shard of a) parameter this rank holds: ``length`` entries from
    ``offset`` along dimension ``dim`` of the shard, which every data rank cuts in chunks of ``chunk``."""

    dim: int
    offset: int
    length: int
    chunk: int

    def box(self, param: torch.Tensor) -> tuple[slice, ...]:
        """Where this piece sits in the full parameter."""
        box = list(shard_box(param) or [slice(0, n) for n in full_shape(param)])
        start = box[self.dim].start or 0
        box[self.dim] = slice(start + self.offset, start + self.offset + self.length)
        return tuple(box)


def device_mesh(mesh: Mesh):
    """A (tensor, data) DeviceMesh of this job: its data dimension is what FSDP shards over, and DTensor
    views on it in that order describe a tensor-parallel shard split again over the data group."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.arange(mesh.world_size).view(mesh.dp_size, mesh.tp_size).t()  # rank = dp_rank * tp + tp_rank
    return DeviceMesh(mesh.device.type, ranks, mesh_dim_names=("tensor", "data"))


def _placement(param: nn.Parameter, tp_size: int):
    from torch.distributed.tensor import Shard

    return Shard(1 if getattr(param, "unpadded_rows", None) is not None and tp_size > 1 else 0)


def _pieces(model: nn.Module, marks: dict, mesh: Mesh) -> dict[nn.Parameter, Piece]:
    """Each sharded parameter's piece, from FSDP's placement (chunks of ceil(n / D) along its dim)."""
    pieces = {}
    for name, p in model.named_parameters():
        for mark, value in marks[name].items():
            setattr(p, mark, value)  # the sharded parameter says how it is sharded, as its layer's did
        dim = p.placements[0].dim
        n = p.shape[dim]
        chunk = math.ceil(n / mesh.dp_size)
        offset = min(mesh.dp_rank * chunk, n)
        length = min(chunk, n - offset)
        if p.to_local().shape[dim] != length:
            raise RuntimeError(f"FSDP holds {tuple(p.to_local().shape)} of {name} on data rank {mesh.dp_rank}, not "
                               f"the chunk of {length} along dim {dim} dpdist expects; dpdist cannot place its noise")
        pieces[p] = Piece(dim, offset, length, chunk)
    return pieces


def verify_pieces(pieces: dict[nn.Parameter, Piece], mesh: Mesh) -> None:
    """Over the data group the pieces hold every element of every parameter exactly once."""
    counts = []
    for p, piece in pieces.items():
        count = torch.zeros(p.shape[piece.dim], dtype=torch.int32)
        count[piece.offset:piece.offset + piece.length] += 1
        counts.append(count)
    flat = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int32)
    if mesh.dp_size > 1:
        dist.all_reduce(flat, group=mesh.dp_group)
    if flat.numel() and not bool((flat == 1).all()):
        raise RuntimeError("FSDP shards do not hold every parameter element exactly once over the data group; "
                           "the noise would be missing or doubled")


def _chunks(grad: torch.Tensor, piece: Piece, dp_size: int) -> torch.Tensor:
    """``grad`` (a whole shard) cut along the piece's dim into ``dp_size`` zero-padded chunks, flat: (D, k)."""
    moved = grad.movedim(piece.dim, 0)
    padded = moved.new_zeros((piece.chunk * dp_size, *moved.shape[1:]))
    padded[:moved.shape[0]] = moved
    return padded.reshape(dp_size, -1)


class ShardedSums:
    """Clipped sums reduce-scattered over the data group as each layer's arrives (one collective per
    layer), this rank keeping the pieces it owns, in fp32 or wider."""

    def __init__(self, pieces: dict[nn.Parameter, Piece], mesh: Mesh):
        self.pieces, self.mesh = pieces, mesh
        self.sums: dict[nn.Parameter, torch.Tensor] = {}

    def add(self, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        params = list(sums)
        if self.mesh.dp_size == 1:
            return self.add_local({p: sums[p] for p in params})
        chunks = [_chunks(sums[p], self.pieces[p], self.mesh.dp_size) for p in params]
        stacked = torch.cat(chunks, dim=1)
        mine = stacked.new_empty(stacked.shape[1])
        dist.reduce_scatter_single(mine, stacked.reshape(-1), group=self.mesh.dp_group)
        local = {}
        for p, part in zip(params, mine.split([c.shape[1] for c in chunks])):
            piece = self.pieces[p]
            moved_shape = (piece.chunk, *sums[p].movedim(piece.dim, 0).shape[1:])
            local[p] = part.view(moved_shape)[:piece.length].movedim(0, piece.dim)
        self.add_local(local)

    def add_local(self, sums: dict[nn.Parameter, torch.Tensor]) -> None:
        """Add sums already reduced to this rank's pieces."""
        for p, grad in sums.items():
            if p in self.sums:
                self.sums[p] += grad
            else:
                self.sums[p] = grad.clone()

    def pop(self) -> dict[nn.Parameter, torch.Tensor]:
        """Every trainable parameter's piece of the sums (zero where no example reached it)."""
        sums, self.sums = self.sums, {}
        for p in self.pieces:
            if p.requires_grad and p not in sums:
                sums[p] = torch.zeros_like(p.to_local(), dtype=accumulation_dtype(p.dtype))
        return sums


class ShardReduce:
    """The DP step's reduce seam under FSDP: the sums are already summed into this rank's pieces."""

    def __init__(self, pieces: dict[nn.Parameter, Piece], mesh: Mesh):
        self.store = ShardedSums(pieces, mesh)

    def sums(self) -> ShardedSums:
        return self.store

    def recording_backward(self, loss: torch.Tensor, params: list[nn.Parameter], retain: bool) -> list[bool]:
        """An ordinary backward, so that FSDP's hooks gather each block's parameters for it; the layers
        record for the tap and form no gradient, so FSDP reduces nothing."""
        loss.backward(retain_graph=retain)
        return [p.grad is not None for p in params]

    def backward(self, loss: torch.Tensor, params: list[nn.Parameter], last: bool) -> None:
        """Two-pass: FSDP forms and reduce-scatters the weighted gradients (summed, in fp32); their
        shards move into the store."""
        loss.backward()
        self.store.add_local({p: p.grad.to_local() for p in params if p.grad is not None})
        for p in params:
            p.grad = None
        return None

    def __call__(self, released: list[Released], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(g, r.tensor.device_mesh, r.tensor.placements, shape=r.tensor.shape,
                                   stride=r.tensor.stride(), run_check=False) for r, g in zip(released, grads)]


class ShardNoise:
    """The add_noise seam under FSDP: the keyed noise of exactly the coordinates this rank owns."""

    def __init__(self, secret: int, pieces: dict[nn.Parameter, Piece]):
        self.secret, self.pieces = secret, pieces

    def __call__(self, release: int, released: list[Released], grads: list[torch.Tensor],
                 stds: list[float]) -> list[torch.Tensor]:
        noisy = []
        for item, grad, std in zip(released, grads, stds):
            if std > 0 and grad.numel():
                box = self.pieces[item.tensor].box(item.tensor)
                grad.add_(keyed_normal(self.secret, release, item.name, full_shape(item.tensor), box,
                                       dtype=grad.dtype, device=grad.device), alpha=std)  # the store's own tensor
            noisy.append(grad)
        return noisy


class FSDPBackward:
    """The non-private step's seam: FSDP's backward, summed (its divide factor is 1) over the data group."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def reduce(self, params: list[nn.Parameter]) -> None:
        pass  # FSDP reduce-scattered during the backward


class FSDPBackend:
    reads = ("native", "fsdp")  # DCP shards, resharded to any layout

    def __init__(self, cfg):
        self.cfg = cfg
        self.mesh = self.pieces = self.device_mesh = None

    def describe(self) -> str:
        return ", FSDP"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if mesh.world_size == 1 and not dist.is_initialized():  # FSDP needs a process group, even of one
            dist.init_process_group("nccl" if mesh.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        self.mesh = mesh
        self.device_mesh = device_mesh(mesh)
        names = {p: name for name, p in model.named_parameters()}
        marks = {name: {mark: getattr(p, mark) for mark in SHARDING_MARKS if hasattr(p, mark)}
                 for p, name in names.items()}
        # bf16 compute gathers bf16 copies of the fp32 shards and reduces in fp32; otherwise all in the
        # parameters' dtype (fp32 or wider).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.cfg.train.precision == "bf16" else MixedPrecisionPolicy()
        options = dict(mesh=self.device_mesh["data"], mp_policy=policy,
                       shard_placement_fn=lambda p: _placement(p, mesh.tp_size))
        units = [m for m in model.modules() if isinstance(m, TRANSFORMER_BLOCKS)] + [model]
        for unit in units:
            fully_shard(unit, **options)
        for unit in units:  # FSDP's own reductions (two-pass, non-private) sum over the data group, as the DP step
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:  # the optimizer steps the sharded parameters (it has no state yet)
            group["params"] = [sharded[names[p]] for p in group["params"]]
        self.pieces = _pieces(model, marks, mesh)
        verify_pieces(self.pieces, mesh)
        return optimizer

    def dp_seams(self, secret: int, expected_batch_size: float) -> tuple[ShardReduce, ShardNoise]:
        return ShardReduce(self.pieces, self.mesh), ShardNoise(secret, self.pieces)

    def nonprivate_seam(self) -> FSDPBackward:
        return FSDPBackward()

    def identity(self) -> dict:
        return {"name": "fsdp"}

    def check_resume(self, saved: dict, folder, saved_layout: dict, layout: dict) -> None:
        pass  # DCP reshards between fsdp and native layouts of any degree

    def save(self, folder, model, optimizer, components: list, mesh: Mesh) -> None:
        dcp_state.save(folder, model, optimizer, components, mesh, sharded_mesh=self.device_mesh)

    def load(self, folder, model, optimizer, components: list, mesh: Mesh) -> None:
        dcp_state.load(folder, model, optimizer, components, mesh, self.cfg.train.optimizer,
                       sharded_mesh=self.device_mesh)

    def full_state_dict(self, model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
        """Every parameter at its full shape on every rank (gathered over the data, then tensor group)."""
        model.reshard()  # an evaluation forward leaves the root's parameters gathered
        return {name: gather_full(p, mesh.tp_group, p.full_tensor()) for name, p in model.named_parameters()}
