"""The secret seed of the noise and of the Poisson sampling.

Whoever knows it can subtract the noise, so it comes from the OS's entropy on rank 0, is broadcast
over the (trusted) process group, is kept only in the run's private state, and is never logged or
exported.  A fixed seed is allowed for tests and reproducibility, and the run says so loudly.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import torch
import torch.distributed as dist

SECRET_BITS = 124  # two non-negative int64 halves of 62 bits


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


def warn_fixed_seed(seed: int) -> None:
    print(f"WARNING: privacy.seed={seed} is fixed: the noise and the sampling are reproducible by anyone who "
          "knows the seed, so this run gives NO privacy guarantee. Leave privacy.seed unset for real runs.",
          file=sys.stderr)


def load_secret(run_dir: Path) -> int | None:
    """The secret a run saved earlier (a resume must reuse it: fresh noise on a replayed step would
    release the same gradient twice with independent noise), or None when there is none."""
    path = Path(run_dir) / "private" / "secret"
    if not path.is_file():
        return None
    try:
        return int(path.read_text().strip(), 16)
    except ValueError:
        raise ValueError(f"{path} is corrupt; it must hold the run's secret as one hexadecimal number") from None


def save_secret(value: int, run_dir: Path) -> Path:
    """Write the secret where a resume can find it: ``<run>/private/secret``, readable by the owner only."""
    private = Path(run_dir) / "private"
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    path = private / "secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{value:x}\n")
    return path
