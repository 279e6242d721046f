"""Run a script of tests/dist in a subprocess, under ``torchrun --standalone`` or plain Python (a
torchrun launch costs 5-10 s here: group checks)."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import DIST, ROOT, TESTS


def child_env() -> dict[str, str]:
    """The environment of a script in tests/dist: it imports ``helpers`` (tests/) and this checkout's
    ``dpdist`` (the repository root) ahead of anything installed."""
    paths = [str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(DIST / script), *map(str, args)]
    env = dict(child_env(), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def python(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The script in one plain process (a single-process run of the same worker as a launch)."""
    result = subprocess.run([sys.executable, str(DIST / script), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=child_env())
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
