"""Sharded checkpoints of a training run: model and optimizer through DCP, plus the privacy state.

Layout: ``<run>/checkpoints/step-<k>/`` holds DCP's files (each rank writes its own shards) and
``privacy.json`` (the step to resume at, the values the guarantee depends on, the ledger length, the
layout, and a manifest of every file with its size and SHA-256) and ``ledger.jsonl``, a copy of the
run's ledger at that step.  The run's own ledger stays authoritative and is never rolled back; a
resume checks that it still begins with the copy.  Tensor-parallel shards are exposed
to DCP as DTensor views of the *unpadded* full parameters, so a checkpoint written at one
(data, tensor) layout loads at another and DCP reshards.  Replicated tensors are saved under one key
(DCP writes them once).  Nothing here holds per-rank RNG state: the sampling and the noise are
functions of (secret, release index), and the secret stays in ``<run>/private``.

Commit is atomic: every rank writes into ``step-<k>.partial``, and only after a barrier does rank 0
write ``privacy.json`` and rename the folder; a crash at any point leaves the previous checkpoint the
latest complete one.  Loading refuses, with a message that says what to do, a checkpoint whose
privacy-relevant values or model shape differ from the run's, and any missing, truncated or altered
file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..config import ConfigError, RunConfig
from ..parallel.state import unpadded_local_rows
from ..privacy.ledger import PrivacyLedger
from ..runtime.mesh import Mesh
from .plan import RunPlan

CHECKPOINTS = "checkpoints"
ABANDONED = "abandoned"  # checkpoints of a branch given up by a rewind (``abandon``)
PRIVACY_FILE, LEDGER = "privacy.json", "ledger.jsonl"
PREFIX, PARTIAL = "step-", ".partial"
FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def privacy_identity(cfg: RunConfig, plan: RunPlan) -> dict:
    """The values a checkpoint's privacy spend is tied to: resuming with others would make the
    ledger's epsilon meaningless, so they must match exactly."""
    p = cfg.privacy
    return {"enabled": p.enabled, "clip_norm": p.clip_norm, "clipping": p.clipping, "sample_rate": plan.sample_rate,
            "num_examples": plan.num_examples, "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
            "seq_len": cfg.data.seq_len, "vocab_size": cfg.model.vocab_size}


@functools.lru_cache(maxsize=None)
def _device_mesh_of(device_type: str, dp_size: int, tp_size: int):
    """One DeviceMesh per process and layout (creating one makes process groups: never per save)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp_size, tp_size), mesh_dim_names=("data", "tensor"))


def _device_mesh(mesh: Mesh):
    if mesh.world_size == 1:
        return None
    return _device_mesh_of(mesh.device.type, mesh.dp_size, mesh.tp_size)


def _view(tensor: torch.Tensor, param: torch.nn.Parameter, device_mesh):
    """What DCP sees for ``tensor`` (the parameter itself or state sharded like it): a DTensor of the
    unpadded full shape for a tensor-parallel shard, the tensor itself otherwise.  A vocabulary
    table drops its padding rows, so the saved table is the same at every tensor degree."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    from torch.distributed.tensor import DTensor, Replicate, Shard

    full = list(param.full_shape)
    local = tensor
    if getattr(param, "unpadded_rows", None) is not None:
        full[0] = param.unpadded_rows
        local = tensor.narrow(0, 0, unpadded_local_rows(param))
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(local, device_mesh, [Replicate(), Shard(param.partition_dim)], run_check=False,
                              shape=torch.Size(full), stride=stride)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (values are overwritten by the load): one step at lr 0
    with zero gradients, which leaves every parameter as it is."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _state(model, optimizer, device_mesh, extra: dict | None = None) -> dict:
    """What DCP saves: parameters, optimizer slots, and ``extra`` (key -> (tensor, the parameter whose
    sharding it shares, or None)), e.g. ANADP's importance state."""
    params = dict(model.named_parameters())
    state = {f"model/{name}": _view(p.detach(), p, device_mesh) for name, p in params.items()}
    by_param = {p: name for name, p in params.items()}
    for key, (tensor, param) in (extra or {}).items():
        state[key] = tensor if param is None else _view(tensor, param, device_mesh)
    for p, slots in optimizer.state.items():
        name = by_param[p]
        for key, value in slots.items():
            if torch.is_tensor(value) and value.shape == p.shape:
                state[f"optim/{name}/{key}"] = _view(value, p, device_mesh)
            else:  # a scalar such as Adam's step count: the same on every rank
                state[f"optim/{name}/{key}"] = value
    return state


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process even when told so (no_dist); that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    """Every file under ``folder`` (DeepSpeed writes a sub-folder) but the record, with size and hash."""
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != PRIVACY_FILE}


def backend_identity(cfg: RunConfig) -> dict:
    """Which engine wrote the state: a DeepSpeed checkpoint holds ZeRO partitions of one layout."""
    if cfg.train.backend != "deepspeed":
        return {"name": "native"}
    from ..deepspeed_config import resolve_deepspeed_config

    return {"name": "deepspeed", "zero_stage": resolve_deepspeed_config(cfg)["zero_optimization"]["stage"]}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(mesh: Mesh) -> None:
    if mesh.world_size > 1:
        dist.barrier()


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first (partial folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and not d.name.endswith(PARTIAL)
             and (d / PRIVACY_FILE).is_file()]
    return sorted(found, key=lambda d: d.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def newer_checkpoints(checkpoint: Path) -> list[Path]:
    """The committed checkpoints of ``checkpoint``'s run at later steps: resuming from ``checkpoint``
    while they exist is a rewind, and they belong to the branch it abandons."""
    checkpoint = Path(checkpoint)
    return [d for d in complete_checkpoints(checkpoint.parent.parent) if d.name > checkpoint.name]


def abandon(checkpoints: list[Path], run_dir: Path) -> Path:
    """Move an abandoned branch's checkpoints to ``<run>/abandoned/<time>/``, out of ``checkpoints/``, so
    that no later ``--resume auto`` takes one of them for the latest; they stay readable there."""
    target = Path(run_dir) / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for folder in checkpoints:
        os.replace(folder, target / folder.name)
    _fsync_dir(Path(run_dir) / CHECKPOINTS)
    return target


def save_checkpoint(run_dir: Path, next_step: int, model, optimizer, cfg: RunConfig, plan: RunPlan, mesh: Mesh,
                    keep: int, deepspeed_engine=None, extra: dict | None = None) -> Path:
    """Write the checkpoint to resume at ``next_step`` (a collective: every rank calls it at a step
    boundary), commit it atomically, and keep the newest ``keep`` committed ones.  With a DeepSpeed
    engine its own checkpoint (model, ZeRO partitions, optimizer state) replaces the DCP files."""
    final = step_folder(run_dir, next_step)
    partial = final.with_name(final.name + PARTIAL)
    if mesh.is_main:
        if partial.exists():
            shutil.rmtree(partial)  # left by a crash during an earlier save of this same step
        partial.mkdir(parents=True)
    _barrier(mesh)
    if deepspeed_engine is not None:
        from .deepspeed_backend import CHECKPOINT_TAG

        deepspeed_engine.save_checkpoint(str(partial), tag=CHECKPOINT_TAG, save_latest=False)
    else:
        with _quiet_single_process():
            dcp.save(_state(model, optimizer, _device_mesh(mesh), extra), checkpoint_id=str(partial),
                     no_dist=mesh.world_size == 1)
    _barrier(mesh)
    if mesh.is_main:
        run_ledger = Path(run_dir) / LEDGER
        if run_ledger.exists():
            shutil.copyfile(run_ledger, partial / LEDGER)
        entries = len(PrivacyLedger(partial / LEDGER).entries())
        record = {"format": FORMAT, "next_step": next_step, "ledger_entries": entries,
                  "privacy": privacy_identity(cfg, plan), "model": asdict(cfg.model),
                  "layout": {"data": mesh.dp_size, "tensor": mesh.tp_size}, "backend": backend_identity(cfg),
                  "files": _manifest(partial)}
        with open(partial / PRIVACY_FILE, "w") as handle:
            json.dump(record, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # an older commit of the same step (a replayed step): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        for old in complete_checkpoints(run_dir)[:-keep]:
            (old / PRIVACY_FILE).unlink()  # first: a removal cut short never leaves a "complete" husk
            shutil.rmtree(old)
    _barrier(mesh)
    return final


def read_record(folder: Path) -> dict:
    """The checkpoint's privacy record, after checking that every file it lists is intact."""
    folder = Path(folder)
    if not (folder / PRIVACY_FILE).is_file():
        raise CheckpointError(f"{folder} is not a complete dpdist checkpoint (no {PRIVACY_FILE}); point --resume at a "
                              f"step-* folder under {CHECKPOINTS}/ or use --resume auto")
    try:
        record = json.loads((folder / PRIVACY_FILE).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{folder / PRIVACY_FILE} is corrupt ({exc}); resume from an older checkpoint") from None
    for name, expected in record.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}; resume from an older checkpoint")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {folder}: {name} has {size} bytes, {expected['bytes']} were written "
                                  "(truncated?); resume from an older checkpoint")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} does not match its checksum (corrupt); resume from an "
                                  "older checkpoint")
    return record


def _read_on_main(folder: Path, mesh: Mesh) -> dict:
    """``read_record`` on rank 0 only (it hashes every file: once per job, not once per rank), its
    record or its refusal then shared with every rank so that all of them stop or none does."""
    record, error = None, None
    if mesh.is_main:
        try:
            record = read_record(folder)
        except CheckpointError as exc:
            error = str(exc)
    if mesh.world_size > 1:
        shared = [record, error]
        dist.broadcast_object_list(shared, src=0)
        record, error = shared
    if error is not None:
        raise CheckpointError(error)
    return record


def check_backend(record: dict, folder: Path, cfg: RunConfig, mesh: Mesh) -> None:
    """A DeepSpeed checkpoint resumes only under DeepSpeed at its own stage and layout (ZeRO
    partitions do not reshard here); a native one only natively."""
    saved, mine = record.get("backend", {"name": "native"}), backend_identity(cfg)
    if saved["name"] != mine["name"]:
        raise CheckpointError(f"checkpoint {folder} was written by the {saved['name']} backend and this run uses "
                              f"train.backend={mine['name']}; resume with train.backend={saved['name']}")
    layout = {"data": mesh.dp_size, "tensor": mesh.tp_size}
    if mine["name"] == "deepspeed" and (saved != mine or record["layout"] != layout):
        raise CheckpointError(f"checkpoint {folder} holds ZeRO stage {saved.get('zero_stage')} partitions for "
                              f"(data, tensor) = ({record['layout']['data']}, {record['layout']['tensor']}); resume "
                              f"with that stage and layout (this run: stage {mine['zero_stage']}, "
                              f"({mesh.dp_size}, {mesh.tp_size}))")


def check_compatible(record: dict, folder: Path, cfg: RunConfig, plan: RunPlan) -> None:
    mine = privacy_identity(cfg, plan)
    changed = [f"{key}: checkpoint {record['privacy'].get(key)!r}, run {value!r}"
               for key, value in mine.items() if record["privacy"].get(key) != value]
    if changed:
        raise CheckpointError(f"checkpoint {folder} was made with other privacy-relevant values ({'; '.join(changed)}); "
                              "its epsilon would not hold for this run. Resume with the original config, or start a "
                              "new run directory")
    model = asdict(cfg.model)
    shape = [f"{key}: checkpoint {record['model'].get(key)!r}, run {value!r}"
             for key, value in model.items() if key != "dtype" and record["model"].get(key) != value]
    if shape:
        raise CheckpointError(f"checkpoint {folder} holds a different model ({'; '.join(shape)}); resume with the "
                              "model config it was saved with")


def check_ledger(folder: Path, run_ledger: Path) -> None:
    """The run's ledger must still hold every release the checkpoint's copy holds, in order: a
    shorter or rewritten ledger would under-count epsilon, so the run may not continue on it."""
    saved = PrivacyLedger(Path(folder) / LEDGER).entries()
    current = PrivacyLedger(run_ledger).entries()
    if current[:len(saved)] != saved:
        raise CheckpointError(f"{run_ledger} has {len(current)} releases and does not begin with the {len(saved)} "
                              f"recorded in {folder / LEDGER}: the ledger lost or changed entries, so epsilon would "
                              f"be under-counted. Restore it (the checkpoint's copy is a lower bound); dpdist will not "
                              "resume on it")


def load_checkpoint(folder: Path, model, optimizer, cfg: RunConfig, plan: RunPlan, mesh: Mesh,
                    deepspeed_engine=None, extra: dict | None = None) -> dict:
    """Load model and optimizer (resharded to this run's layout) in place; return the record."""
    record = _read_on_main(folder, mesh)
    check_compatible(record, folder, cfg, plan)
    check_backend(record, folder, cfg, mesh)
    if deepspeed_engine is not None:
        from .deepspeed_backend import CHECKPOINT_TAG

        loaded, _ = deepspeed_engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"checkpoint {folder} has no DeepSpeed state under {CHECKPOINT_TAG}/; resume from "
                                  "an older checkpoint")
        return record
    _init_optimizer_state(optimizer)
    device_mesh = _device_mesh(mesh)
    state = _state(model, optimizer, device_mesh, extra)
    saved = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    missing = sorted(set(state) - saved)
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
                              + f": it was saved with another optimizer or model (train.optimizer is "
                              f"{cfg.train.optimizer!r}); resume with the config it was saved with")
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(folder), no_dist=mesh.world_size == 1)
    except Exception as exc:  # DCP's own errors name tensors and offsets, not what the user should do
        raise CheckpointError(f"checkpoint {folder} could not be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}); resume from an older checkpoint") from exc
    params = dict(model.named_parameters())
    by_param = {p: name for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            _copy_back(p, state[f"model/{name}"])
        for p, slots in optimizer.state.items():
            for key in slots:
                value = state[f"optim/{by_param[p]}/{key}"]
                if torch.is_tensor(slots[key]) and slots[key].shape == p.shape:
                    _copy_back(slots[key], value)
                else:
                    slots[key] = value
        for key, (tensor, _) in (extra or {}).items():
            _copy_back(tensor, state[key])
    return record


def _copy_back(target: torch.Tensor, loaded) -> None:
    """Put a loaded view's values into ``target`` (the padded rows of a vocabulary table keep theirs)."""
    local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
    if local.data_ptr() != target.data_ptr():
        target.narrow(0, 0, local.shape[0]).copy_(local)
