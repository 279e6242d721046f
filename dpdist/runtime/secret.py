"""The secret seed of the noise and of the Poisson sampling.

Whoever knows it can subtract the noise, so it comes from the OS's entropy on rank 0, is broadcast
over the (trusted) process group, is kept only in the run's private state, and is never logged,
exported or echoed in an error.  A fixed seed is allowed for tests and reproducibility; the run
records that beside the secret, so every later start, resume and report says the run gives no
guarantee even when the resume's config no longer names the seed.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError
from .mesh import Mesh

SECRET_BITS = 124  # two non-negative int64 halves of 62 bits
UNKNOWN = "unknown"  # no record of where the secret came from (an older run, or private/ moved away)
FIXED_SEED_WARNING = ("the secret is a fixed privacy.seed: the noise and the sampling are reproducible by anyone who "
                      "knows the seed, so this run gives NO privacy guarantee (leave privacy.seed unset for real runs)")
UNKNOWN_ORIGIN_WARNING = ("this run does not record whether its secret is a fixed privacy.seed (no "
                          "private/secret_origin.json: a run from before the record, or private/ moved away); if it "
                          "was started with privacy.seed, it gives NO privacy guarantee")


def shared_secret(fixed_seed: int | None, group=None, saved: int | None = None) -> int:
    """The run's secret on every rank: ``saved`` (a resumed run's) if given, else the fixed seed,
    else fresh OS entropy; always rank 0's value, broadcast, so no rank can end up with another."""
    if saved is not None:
        value = saved
    elif fixed_seed is not None:
        value = fixed_seed
    else:
        value = secrets.randbits(SECRET_BITS)
    if group is not None:
        if not 0 <= value < 2**SECRET_BITS:
            raise ValueError(f"the secret must be a non-negative integer below 2**{SECRET_BITS}")
        halves = torch.tensor([value >> 62, value & ((1 << 62) - 1)], dtype=torch.int64)
        dist.broadcast(halves, src=0, group=group)
        value = (int(halves[0]) << 62) | int(halves[1])
    return value


def run_secret(fixed_seed: int | None, run_dir: Path, mesh: Mesh) -> int:
    """The run's secret: the saved one when the run directory has it (a restart or resume), else new;
    rank 0 reads or draws it (and saves a new one with its origin), every rank receives rank 0's, and
    rank 0 warns on every start of a run whose secret is, or may be, a fixed seed."""
    saved = load_secret(run_dir) if mesh.is_main else None
    secret = shared_secret(fixed_seed, mesh.world_group, saved=saved)
    if mesh.is_main:
        if saved is None:
            save_secret(secret, run_dir, fixed_seed=fixed_seed is not None)
        warning = origin_warning(seed_is_fixed(run_dir, fixed_seed))
        if warning is not None:
            print(f"WARNING: {warning}", file=sys.stderr)
    return secret


def seed_is_fixed(run_dir: Path, configured_seed: int | None) -> bool | str:
    """Whether the run's secret is a fixed seed, for the reports: the record beside the secret; without
    one (an older run, or ``private/`` moved away), True when the config names a seed (a resume refuses
    one that is not the saved secret), else ``UNKNOWN``."""
    recorded = _recorded_origin(run_dir)
    if recorded is not None:
        return recorded
    return True if configured_seed is not None else UNKNOWN


def origin_warning(fixed: bool | str) -> str | None:
    """What to tell whoever reads a run's output about its secret's origin (None: nothing to warn of)."""
    if fixed is True:
        return FIXED_SEED_WARNING
    return UNKNOWN_ORIGIN_WARNING if fixed == UNKNOWN else None


def check_resumed_secret(configured_seed: int | None, run_dir: Path, checkpoint: Path | None) -> None:
    """Refuse, before any process starts, a resume that would not use the run's one secret: a resume
    always takes the saved secret, so a ``privacy.seed`` that is not it would be silently ignored, and
    a checkpoint without its secret would continue with another (and forget a fixed seed's origin)."""
    saved = load_secret(run_dir)
    if saved is None:
        if checkpoint is not None:
            raise ConfigError(f"{Path(run_dir) / 'private' / 'secret'} is missing, but resuming {checkpoint} needs the "
                              "secret the run started with; put the run's private/ folder back")
        return
    if configured_seed is None:
        return
    if _recorded_origin(run_dir) is False:
        raise ConfigError("privacy.seed is set, but this run's secret came from OS entropy; drop privacy.seed (a "
                          "resume always uses the run's saved secret)")
    if saved != configured_seed:
        raise ConfigError("privacy.seed is not the seed this run was started with; drop privacy.seed (a resume "
                          "always uses the run's saved secret)")


def load_secret(run_dir: Path) -> int | None:
    """The secret a run saved earlier (a resume must reuse it: fresh noise on a replayed step would
    release the same gradient twice with independent noise), or None when there is none."""
    path = Path(run_dir) / "private" / "secret"
    if not path.is_file():
        return None
    try:
        return int(path.read_text().strip(), 16)
    except ValueError:
        raise ConfigError(f"{path} is corrupt; it must hold the run's secret as one hexadecimal number") from None


def _recorded_origin(run_dir: Path) -> bool | None:
    """True: the secret is a fixed privacy.seed; False: OS entropy; None: no record."""
    path = Path(run_dir) / "private" / "secret_origin.json"
    if not path.is_file():
        return None
    try:
        fixed = json.loads(path.read_text())["fixed_seed"]
    except (ValueError, TypeError, KeyError):
        fixed = None
    if not isinstance(fixed, bool):
        raise ConfigError(f'{path} is corrupt; it must hold {{"fixed_seed": true}} or {{"fixed_seed": false}}')
    return fixed


def save_secret(value: int, run_dir: Path, fixed_seed: bool) -> Path:
    """Write the secret where a resume can find it, ``<run>/private/secret``, and how it was made,
    ``secret_origin.json``, both readable by the owner only.  Each file appears whole (written aside,
    then renamed) and the origin first, so a secret on disk always has its origin beside it."""
    private = Path(run_dir) / "private"
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    _write_private(private / "secret_origin.json", json.dumps({"fixed_seed": fixed_seed}) + "\n")
    return _write_private(private / "secret", f"{value:x}\n")


def _write_private(path: Path, text: str) -> Path:
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(partial, path)
    return path
