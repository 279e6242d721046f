"""DeepSpeed ZeRO-1/2 as the data-parallel backend, with the privacy mechanism kept in dpdist's hands.

``train.backend=deepspeed``; its settings are the ``deepspeed`` config section (``dpdist.deepspeed_config``).

What DeepSpeed does: shard the optimizer state (ZeRO-1) and the gradients (ZeRO-2) over the data
group, reduce gradients, keep fp32 master partitions under bf16.  What stays dpdist's, so that the
guarantee never rests on a DeepSpeed internal:

- **Clipping.** The per-example norms come from dpdist's norm rules in the backward (one tensor-group
  all-reduce of the B-vector), exactly as in the native path.  The clipped sum reaches DeepSpeed
  through its public ``engine.backward`` (the DP step's ``reduce`` seam): either a *linear surrogate* ``sum_p <p, g_p>`` whose gradient
  is the book-kept clipped sum g_p (modes ``bookkeeping`` and per-layer clipping), or, under
  ``mode=two_pass``, the second backward of ``sum_i c_i L_i`` itself, which ZeRO-2 reduce-scatters
  as it goes so no full gradient is ever held.  DeepSpeed never sees an unclipped gradient.
- **Noise** (the ``add_noise`` seam, which arms the hook with the release index and std).  DeepSpeed
  calls the client optimizer once per parameter group, on this data rank's flat
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

import contextlib
import importlib
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...deepspeed_config import resolve_deepspeed_config
from ...parallel.state import replica_state_dict
from ...privacy.noise import keyed_normal_slice
from ...privacy.step import Released, autograd_recording_backward, shard_box
from ...privacy.tap import LocalSums
from ...runtime.mesh import Mesh
from ..dcp_state import StateMismatch

CHECKPOINT_TAG = "deepspeed"  # the sub-folder DeepSpeed writes inside a dpdist checkpoint
SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory all-reduce op (inference only)


def import_deepspeed(device: torch.device):
    """``import deepspeed`` set up for this device, through DeepSpeed's own switches: its accelerator
    (CPU and gloo for a CPU run, even where a GPU is visible) and its table of usable ops, in which
    the shared-memory all-reduce is marked unusable.  That op serves inference only, and DeepSpeed
    would otherwise compile it with a C++ compiler on first use (35 s, or a failure where there is none)."""
    try:
        import deepspeed
    except ImportError:
        raise ImportError("train.backend=deepspeed needs DeepSpeed: pip install 'dpdist[deepspeed]' (with your "
                          "torch already installed, so that pip keeps it)") from None
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if device.type == "cpu" and get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    importlib.import_module("deepspeed.ops").__compatible_ops__[SHM_OP] = False
    return deepspeed


@contextlib.contextmanager
def _quiet():
    """DeepSpeed's ZeRO calls a torch collective torch has deprecated, which warns on every step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated", category=FutureWarning)
        yield


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

    def __init__(self, engine, model: nn.Module, mesh: Mesh, *, secret: int, expected_batch_size: float):
        self.secret, self.expected_batch_size = secret, expected_batch_size
        self.dp_size = mesh.dp_size
        self.release: int | None = None  # the release index keying this step's noise, set by ``arm``
        self.std = 0.0
        names = {p: name for name, p in model.named_parameters() if p.requires_grad}
        zero = engine.optimizer
        partitions = zero.single_partition_of_fp32_groups
        self.slices = {id(partition): partition_slices(zero, names, i, mesh.dp_rank)
                       for i, partition in enumerate(partitions)}
        self.partitions = list(partitions)
        self._noised: set[int] = set()
        verify_partitions(self.partitions, self.slices, names, mesh)

    def arm(self, release: int, std: float) -> None:
        """The next optimizer step is release ``release`` with noise std ``std``."""
        self.release, self.std = release, std

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
    with _quiet():
        engine.backward(surrogate, scale_wrt_gas=False)


class _BoundaryBackward:
    """Backwards through ``engine.backward`` (ZeRO reduces what reaches it), remembering whether this
    step's accumulation-boundary backward has run: a step whose backwards never reached the boundary
    (no micro-batch on this rank, or sums formed outside the engine) must still give ZeRO one."""

    def __init__(self, engine):
        self.engine = engine
        self._reduced = False

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        with _quiet():
            self.engine.backward(loss, scale_wrt_gas=False)
        self._reduced = self._reduced or last

    def _finish(self, sums) -> None:
        """End the step: hand ``sums()`` (parameter -> gradient) to ZeRO unless the boundary backward
        already reduced."""
        if not self._reduced:
            _surrogate_backward(self.engine, sums())
        self._reduced = False


class EngineReduce(_BoundaryBackward):
    """The reduce seam of the DP step.  Under two-pass clipping the weighted backward itself goes
    through the engine and reduce-scatters as it goes; otherwise the clipped sums reach it at the
    release through the linear surrogate."""

    def sums(self) -> LocalSums:
        return LocalSums()

    def recording_backward(self, loss: torch.Tensor, params: list[nn.Parameter], retain: bool) -> list[bool]:
        return autograd_recording_backward(loss, params, retain)

    def backward(self, loss: torch.Tensor, params: list[nn.Parameter], last: bool) -> None:
        self._backward(loss, last)
        return None  # the gradients are DeepSpeed's now

    def __call__(self, released: list[Released], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        self._finish(lambda: {r.tensor: g for r, g in zip(released, grads)})
        return grads


class PartitionNoiseSeam:
    """The add_noise seam of the DP step: arm ``PartitionNoise`` with the release index and std; the
    noise is added when DeepSpeed steps each partition (None: nothing left for the step to apply)."""

    def __init__(self, noise: PartitionNoise):
        self.noise = noise

    def __call__(self, release: int, released: list[Released], grads, stds: list[float]) -> None:
        if len(set(stds)) > 1:
            raise RuntimeError("DeepSpeed partitions are noised at one std; per-tensor noise scales need "
                               "train.backend=native")
        self.noise.arm(release, stds[0] if stds else 0.0)
        return None


class EngineBackward(_BoundaryBackward):
    """The non-private step's seam through DeepSpeed: its mean over the data group, undone by the factor."""

    def __init__(self, engine, dp_size: int):
        super().__init__(engine)
        self.dp_size = dp_size

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self._backward(loss * self.dp_size, last)

    def reduce(self, params: list[nn.Parameter]) -> None:
        self._finish(lambda: {p: torch.zeros_like(p) for p in params})


class DeepSpeedOptimizer:
    """What the training loop steps: DeepSpeed's step, then the check that every partition got its noise."""

    def __init__(self, engine, noise: PartitionNoise | None):
        self.engine, self.noise = engine, noise

    def step(self) -> None:
        with _quiet():
            self.engine.step()
        if self.noise is not None:
            self.noise.finish()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # engine.step() zeroes the gradients


class DeepSpeedBackend:
    reads = ("deepspeed",)  # its own ZeRO partitions

    def __init__(self, cfg):
        self.cfg = cfg
        self.engine = self.mesh = self.model = self.client_optimizer = None
        self.optimizer: DeepSpeedOptimizer | None = None

    def describe(self) -> str:
        return f", DeepSpeed ZeRO-{self.identity()['zero_stage']}"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh) -> DeepSpeedOptimizer:
        deepspeed = import_deepspeed(mesh.device)
        ensure_process_group()
        with _quiet():
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=MeshMPU(mesh),
                                                        config=resolve_deepspeed_config(self.cfg))
        self.mesh, self.model, self.client_optimizer = mesh, model, optimizer
        self.optimizer = DeepSpeedOptimizer(self.engine, None)
        return self.optimizer

    def dp_seams(self, secret: int, expected_batch_size: float) -> tuple[EngineReduce, PartitionNoiseSeam]:
        noise = PartitionNoise(self.engine, self.model, self.mesh, secret=secret,
                               expected_batch_size=expected_batch_size)
        self.client_optimizer.register_step_pre_hook(noise)
        self.optimizer.noise = noise
        return EngineReduce(self.engine), PartitionNoiseSeam(noise)

    def nonprivate_seam(self) -> EngineBackward:
        return EngineBackward(self.engine, self.mesh.dp_size)

    def identity(self) -> dict:
        return {"name": "deepspeed", "zero_stage": resolve_deepspeed_config(self.cfg)["zero_optimization"]["stage"]}

    def check_resume(self, saved: dict, folder, saved_layout: dict, layout: dict) -> None:
        """ZeRO partitions do not reshard here: the same stage and (data, tensor) layout only."""
        mine = self.identity()
        if saved != mine or saved_layout != layout:
            raise StateMismatch(f"checkpoint {folder} holds ZeRO stage {saved.get('zero_stage')} partitions for "
                                f"(data, tensor) = ({saved_layout['data']}, {saved_layout['tensor']}); resume "
                                f"with that stage and layout (this run: stage {mine['zero_stage']}, "
                                f"({layout['data']}, {layout['tensor']}))")

    def save(self, folder, model, optimizer, components: list, mesh: Mesh) -> None:
        if components:
            raise RuntimeError("DeepSpeed checkpoints hold no method state; methods with state need "
                               "train.backend=native")
        with _quiet():
            self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, folder, model, optimizer, components: list, mesh: Mesh) -> None:
        with _quiet():
            loaded, _ = self.engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if loaded is None:
            raise StateMismatch(f"checkpoint {folder} has no DeepSpeed state under {CHECKPOINT_TAG}/; resume from "
                                "an older checkpoint")

    def full_state_dict(self, model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor] | None:
        return replica_state_dict(model, mesh)
