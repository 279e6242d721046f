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
file.  A resume under another learning-rate schedule than the recorded one is allowed (the schedule
is public, so it does not touch the guarantee) and noted in one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from ..config import ConfigError, RunConfig
from ..privacy.ledger import PrivacyLedger
from ..runtime.mesh import Mesh
from .dcp_state import StateMismatch
from . import schedule
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
                    keep: int, backend, components: list = ()) -> Path:
    """Write the checkpoint to resume at ``next_step`` (a collective: every rank calls it at a step
    boundary) through ``backend.save``, commit it atomically, and keep the newest ``keep`` committed
    ones.  ``components``: objects with ``state_dict()``/``load_state_dict()`` saved alongside."""
    final = step_folder(run_dir, next_step)
    partial = final.with_name(final.name + PARTIAL)
    if mesh.is_main:
        if partial.exists():
            shutil.rmtree(partial)  # left by a crash during an earlier save of this same step
        partial.mkdir(parents=True)
    _barrier(mesh)
    backend.save(partial, model, optimizer, list(components), mesh)
    _barrier(mesh)
    if mesh.is_main:
        run_ledger = Path(run_dir) / LEDGER
        if run_ledger.exists():
            shutil.copyfile(run_ledger, partial / LEDGER)
        entries = len(PrivacyLedger(partial / LEDGER).entries())
        record = {"format": FORMAT, "next_step": next_step, "ledger_entries": entries,
                  "privacy": privacy_identity(cfg, plan), **model_identity(cfg),
                  "layout": {"data": mesh.dp_size, "tensor": mesh.tp_size}, "backend": backend.identity(),
                  "schedule": schedule.identity(cfg.train),
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


def check_backend(record: dict, folder: Path, backend, mesh: Mesh) -> None:
    """A checkpoint resumes only under a backend that reads what it holds (DCP shards: native and fsdp,
    either way), and only where that backend can load it (a ZeRO checkpoint at its own stage and layout)."""
    saved, mine = record.get("backend", {"name": "native"}), backend.identity()
    if saved["name"] not in backend.reads:
        raise CheckpointError(f"checkpoint {folder} was written by the {saved['name']} backend and this run uses "
                              f"train.backend={mine['name']}; resume with train.backend={saved['name']}")
    try:
        backend.check_resume(saved, folder, record["layout"], {"data": mesh.dp_size, "tensor": mesh.tp_size})
    except StateMismatch as exc:
        raise CheckpointError(str(exc)) from None


def model_identity(cfg: RunConfig) -> dict:
    """What the saved weights are the weights of: the model's shape and the methods that change what
    it computes.  A resume must match it (the compute dtype may change)."""
    def section(methods):  # an unused method's knobs do not matter
        return asdict(methods) if methods.enabled else {"enabled": False}

    return {"model": asdict(cfg.model), "reattention": section(cfg.reattention), "lora": section(cfg.lora)}


LOCAL_KEYS = ("dtype", "pretrained")  # the compute dtype may change, and the folder the start weights came from may move


def model_differences(record: dict, cfg: RunConfig) -> list[str]:
    """Where the checkpoint's ``model_identity`` differs from the run's, one "key: checkpoint x, run y" each."""
    changed = []
    for section, values in model_identity(cfg).items():
        saved = record.get(section)
        if saved is None:
            continue  # written before the record held this section
        defaults = asdict(type(getattr(cfg, section))())  # keys added since the checkpoint was written
        changed += [f"{section}.{key}: checkpoint {saved.get(key, defaults[key])!r}, run {value!r}"
                    for key, value in values.items()
                    if key not in LOCAL_KEYS and saved.get(key, defaults[key]) != value]
    return changed


def check_compatible(record: dict, folder: Path, cfg: RunConfig, plan: RunPlan) -> None:
    mine = privacy_identity(cfg, plan)
    changed = [f"{key}: checkpoint {record['privacy'].get(key)!r}, run {value!r}"
               for key, value in mine.items() if record["privacy"].get(key) != value]
    if changed:
        raise CheckpointError(f"checkpoint {folder} was made with other privacy-relevant values ({'; '.join(changed)}); "
                              "its epsilon would not hold for this run. Resume with the original config, or start a "
                              "new run directory")
    shape = model_differences(record, cfg)
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


def load_checkpoint(folder: Path, model, optimizer, cfg: RunConfig, plan: RunPlan, mesh: Mesh, backend,
                    components: list = ()) -> dict:
    """Load model, optimizer and components in place through ``backend.load``; return the record."""
    record = _read_on_main(folder, mesh)
    check_compatible(record, folder, cfg, plan)
    check_backend(record, folder, backend, mesh)
    # a checkpoint written before schedules existed holds none (its run had a constant lr)
    note = schedule.changed(record["schedule"], cfg.train) if "schedule" in record else None
    if note is not None and mesh.is_main:
        print(note, file=sys.stderr, flush=True)
    try:
        backend.load(folder, model, optimizer, list(components), mesh)
    except StateMismatch as exc:
        raise CheckpointError(str(exc)) from exc
    return record
