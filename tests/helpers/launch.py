"""Run a script under ``torchrun --standalone`` from a test (a launch costs 5-10 s here: group checks)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DIST = Path(__file__).parent / "dist"


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(DIST / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
