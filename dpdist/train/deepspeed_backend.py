"""DeepSpeed ZeRO-1/2 as the data-parallel backend, with the privacy mechanism kept in dpdist's hands.

What DeepSpeed does: shard the optimizer state (ZeRO-1) and the gradients (ZeRO-2) over the data
group, reduce gradients, keep fp32 master partitions under bf16.  What stays dpdist's, so that the
guarantee never rests on a DeepSpeed internal:

- **Clipping.** The per-example norms come from dpdist's norm rules in the backward (one tensor-group
  all-reduce of the B-vector), exactly as in the native path.  The clipped sum reaches DeepSpeed
  through its public ``engine.backward``: either a *linear surrogate* ``sum_p <p, g_p>`` whose gradient
  is the book-kept clipped sum g_p (modes ``bookkeeping`` and per-layer clipping), or, under
  ``mode=two_pass``, the second backward of ``sum_i c_i L_i`` itself, which ZeRO-2 reduce-scatters
  as it goes so no full gradient is ever held.  DeepSpeed never sees an unclipped gradient.
- **Noise.** DeepSpeed calls the client optimizer once per parameter group, on this data rank's flat
  fp32 partition, whose ``.grad`` is the data-group *mean* of the clipped sums.  A step pre-hook on
  that optimizer multiplies by the group size, adds the keyed noise of exactly the coordinates the
  partition holds (keyed by parameter name and index in the full parameter, as the native path is),
  and divides by the expected batch size qN.  Each coordinate lives in one partition, so it gets
  noise once, and the values do not depend on how ZeRO partitions.
- **Checks that fail loudly instead of silently going non-private.** The map from partition offsets
  to parameter coordinates is read from the ZeRO optimizer once and verified against the master
  weights and the data group's coverage of every element; after every step each partition must
  have been noised exactly once (a skipped or repeated inner step is an error).
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig
from ..deepspeed_config import resolve_deepspeed_config
from ..privacy.noise import keyed_normal_slice
from ..runtime.mesh import Mesh
from .engine import NonPrivateGradient, PrivateGradient, shard_box

CHECKPOINT_TAG = "deepspeed"  # the sub-folder DeepSpeed writes inside a dpdist checkpoint


def import_deepspeed(device: torch.device):
    """``import deepspeed`` for this device: the CPU accelerator (gloo) on CPU, and no JIT build of the
    shared-memory all-reduce op (inference-only, 35 s and a compiler on first use)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ImportError("train.backend=deepspeed needs DeepSpeed: pip install 'dpdist[deepspeed]' (with your "
                          "torch already installed, so that pip keeps it)") from None
    comm = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm.torch as attribute: that is torch
    if hasattr(comm, "build_shm_op"):
        comm.build_shm_op = lambda: None
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    return deepspeed


class MeshMPU:
    """The ``mpu`` DeepSpeed asks for: this mesh's data and tensor groups as real process groups
    (dpdist writes a group of one rank as None; DeepSpeed needs an object, so singletons are made)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        world = dist.get_world_size()
        self.data_group = mesh.dp_group or _singleton_group(world, dist.get_rank())
        self.tensor_group = mesh.tp_group or _singleton_group(world, dist.get_rank())
        self.data_ranks = [r for r in range(world) if r % mesh.tp_size == mesh.tp_rank]

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.data_ranks

    def get_model_parallel_group(self):
        return self.tensor_group

    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def _singleton_group(world: int, rank: int):
    """The one-rank group of ``rank`` (``new_group`` is collective: every rank makes all of them)."""
    if world == 1:
        return dist.group.WORLD
    mine = None
    for r in range(world):
        group = dist.new_group([r])
        if r == rank:
            mine = group
    return mine


def ensure_process_group() -> None:
    """DeepSpeed needs torch.distributed even for one process; the mesh makes none there."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@dataclass
class Slice:
    """Elements ``start:stop`` of a parameter (flat, in its local shard) at ``offset`` in a partition."""

    name: str
    param: nn.Parameter
    start: int
    stop: int
    offset: int


def partition_slices(zero_optimizer, names: dict, group_index: int, partition_id: int) -> list[Slice]:
    """Which parameter elements this rank's flat fp32 partition of group ``group_index`` holds.

    Read from the ZeRO-1/2 optimizer's record of where each parameter sits in the group's flat
    buffer (``round_robin_bit16_groups``/``_offsets``, the order it reduces in) and its partition
    size; ``verify_partitions`` checks the result, so a change in DeepSpeed fails at start-up.
    """
    for attribute in ("round_robin_bit16_groups", "round_robin_bit16_offsets", "partition_size"):
        if not hasattr(zero_optimizer, attribute):
            raise RuntimeError(f"this DeepSpeed's ZeRO optimizer has no {attribute}: dpdist cannot place the noise "
                               "on its partitions; use the DeepSpeed version pinned in pyproject.toml")
    size = int(zero_optimizer.partition_size[group_index])
    low, high = partition_id * size, (partition_id + 1) * size
    slices = []
    for param, where in zip(zero_optimizer.round_robin_bit16_groups[group_index],
                            zero_optimizer.round_robin_bit16_offsets[group_index]):
        lo, hi = max(low, where), min(high, where + param.numel())
        if lo < hi:
            slices.append(Slice(names[param], param, lo - where, hi - where, lo - low))
    return slices


class PartitionNoise:
    """The optimizer step pre-hook that turns a partition's mean clipped sum into the noisy update."""

    def __init__(self, engine, model: nn.Module, mesh: Mesh, *, secret: int, std: float, expected_batch_size: float):
        self.secret, self.std, self.expected_batch_size = secret, std, expected_batch_size
        self.dp_size = mesh.dp_size
        self.release: int | None = None  # the release index keying this step's noise
        names = {p: name for name, p in model.named_parameters() if p.requires_grad}
        zero = engine.optimizer
        partitions = zero.single_partition_of_fp32_groups
        self.slices = {id(partition): partition_slices(zero, names, i, mesh.dp_rank)
                       for i, partition in enumerate(partitions)}
        self.partitions = list(partitions)
        self._noised: set[int] = set()
        verify_partitions(self.partitions, self.slices, names, mesh)

    def __call__(self, optimizer, args, kwargs) -> None:
        if self.release is None:
            raise RuntimeError("the DeepSpeed optimizer stepped without a release; call release(index) first")
        with torch.no_grad():
            for group in optimizer.param_groups:
                for partition in group["params"]:
                    if id(partition) not in self.slices:
                        raise RuntimeError("the optimizer was handed a tensor that is not a ZeRO partition dpdist "
                                           "mapped; its noise would be missing")
                    if id(partition) in self._noised:
                        raise RuntimeError("a ZeRO partition was stepped twice in one step; it would get noise twice")
                    self._noised.add(id(partition))
                    self._noise(partition)

    def _noise(self, partition: torch.Tensor) -> None:
        grad = partition.grad
        grad.mul_(self.dp_size)  # DeepSpeed averaged over the data group: back to the sum
        if self.std > 0:
            for piece in self.slices[id(partition)]:
                p = piece.param
                noise = keyed_normal_slice(self.secret, self.release, piece.name, p.full_shape, shard_box(p),
                                           piece.start, piece.stop, dtype=grad.dtype, device=grad.device)
                grad[piece.offset:piece.offset + piece.stop - piece.start].add_(noise, alpha=self.std)
        grad.div_(self.expected_batch_size)

    def finish(self) -> None:
        """After ``engine.step()``: every partition was noised exactly once, or the step is an error."""
        missing = len(self.partitions) - len(self._noised)
        self._noised.clear()
        self.release = None
        if missing:
            raise RuntimeError(f"DeepSpeed skipped the optimizer step of {missing} partition(s) (an overflow skip?); "
                               "a DP step must update every coordinate once")


def verify_partitions(partitions: list, slices: dict, names: dict, mesh: Mesh) -> None:
    """The partition map is right: the master weights hold the mapped parameter values, and over the
    data group every element of every parameter is held exactly once."""
    with torch.no_grad():
        counts = {p: torch.zeros(p.numel(), dtype=torch.int32) for p in names}
        for partition in partitions:
            for piece in slices[id(partition)]:
                held = partition[piece.offset:piece.offset + piece.stop - piece.start]
                expected = piece.param.detach().reshape(-1)[piece.start:piece.stop].to(held.dtype)
                if not torch.equal(held, expected):
                    raise RuntimeError(f"ZeRO partition map is wrong for {piece.name}: the master weights at the mapped "
                                       "offsets are not the parameter's; dpdist cannot place the noise")
                counts[piece.param][piece.start:piece.stop] += 1
        flat = torch.cat([c for c in counts.values()]) if counts else torch.zeros(0, dtype=torch.int32)
        if mesh.dp_size > 1:
            dist.all_reduce(flat, group=mesh.dp_group)
        if flat.numel() and not bool((flat == 1).all()):
            raise RuntimeError("ZeRO partitions do not hold every parameter element exactly once over the data group; "
                               "the noise would be missing or doubled")


def _surrogate_backward(engine, sums: dict[nn.Parameter, torch.Tensor]) -> None:
    """``engine.backward`` of sum_p <p, g_p>, whose gradient is exactly g_p: the book-kept clipped
    sums reach ZeRO's reduction through its public entry point (writing ``p.grad`` does not, stage >= 1)."""
    surrogate = sum((p * g.detach().to(p.dtype)).sum() for p, g in sums.items())
    engine.set_gradient_accumulation_boundary(True)
    engine.backward(surrogate, scale_wrt_gas=False)


class DeepSpeedPrivateGradient(PrivateGradient):
    """``PrivateGradient`` whose reduction is DeepSpeed's and whose noise is ``PartitionNoise``'s."""

    def __init__(self, model: nn.Module, *, engine, noise: PartitionNoise, **kwargs):
        super().__init__(model, **kwargs)
        self.engine, self.noise = engine, noise
        self._reduced = False  # whether this step's boundary backward has run (two-pass)

    def _weighted_backward(self, losses: torch.Tensor, clip: torch.Tensor, last: bool) -> None:
        self.tap.defer_weight_grad = False
        try:
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward((losses * clip.detach()).sum(), scale_wrt_gas=False)
        finally:
            self.tap.defer_weight_grad = True
        self._reduced = self._reduced or last

    def release(self, release: int, step: int | None = None) -> None:
        sums = self.tap.pop_grad_sums()
        if not self._reduced:  # book-keeping, per-layer, or a step with no micro-batch on this rank
            params = list(self.names)
            _surrogate_backward(self.engine, {p: sums.get(p, torch.zeros_like(p)) for p in params})
        self._reduced = False
        self.noise.release = release


class DeepSpeedNonPrivateGradient(NonPrivateGradient):
    """The non-private baseline through DeepSpeed: its mean over the data group, undone by the factor."""

    def __init__(self, model: nn.Module, *, engine, dp_size: int, **kwargs):
        super().__init__(model, **kwargs)
        self.engine, self.dp_size = engine, dp_size
        self._reduced = False

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        self._reduced = self._reduced or last

    def release(self, release: int, step: int | None = None) -> None:
        if not self._reduced:  # no micro-batch on this rank this step: DeepSpeed still needs its boundary
            _surrogate_backward(self.engine, {p: torch.zeros_like(p) for p in self.model.parameters()
                                              if p.requires_grad})
        self._reduced = False


class DeepSpeedOptimizer:
    """What the training loop steps: DeepSpeed's step, then the check that every partition got its noise."""

    def __init__(self, engine, noise: PartitionNoise | None):
        self.engine, self.noise = engine, noise

    def step(self) -> None:
        self.engine.step()
        if self.noise is not None:
            self.noise.finish()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # engine.step() zeroes the gradients


@dataclass
class DeepSpeedRun:
    engine: object
    optimizer: DeepSpeedOptimizer
    gradient: PrivateGradient | NonPrivateGradient


def setup(cfg: RunConfig, model: nn.Module, client_optimizer: torch.optim.Optimizer, mesh: Mesh, *,
          expected_batch_size: float, private: dict | None) -> DeepSpeedRun:
    """Wrap ``model`` and ``client_optimizer`` in a DeepSpeed engine; ``private`` holds the
    ``PrivateGradient`` arguments (clip norm, noise multiplier, secret, ...), None for a non-private run."""
    deepspeed = import_deepspeed(mesh.device)
    ensure_process_group()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_optimizer, mpu=MeshMPU(mesh),
                                           config=resolve_deepspeed_config(cfg))
    common = {"expected_batch_size": expected_batch_size, "dp_group": mesh.dp_group, "tp_group": mesh.tp_group}
    if private is None:
        gradient = DeepSpeedNonPrivateGradient(model, engine=engine, dp_size=mesh.dp_size, **common)
        return DeepSpeedRun(engine, DeepSpeedOptimizer(engine, None), gradient)
    kwargs = {**private, **common}
    noise = PartitionNoise(engine, model, mesh, secret=kwargs["secret"],
                           std=kwargs.get("noise_multiplier", 0.0) * kwargs["clip_norm"],
                           expected_batch_size=expected_batch_size)
    client_optimizer.register_step_pre_hook(noise)
    gradient = DeepSpeedPrivateGradient(model, engine=engine, noise=noise, **kwargs)
    return DeepSpeedRun(engine, DeepSpeedOptimizer(engine, noise), gradient)
