"""Set up ``.venv`` in the repository root for the README's two commands; standard library only.

This runs before anything is installed, with any python3 >= 3.10.  torch goes in first, pinned to
``torch==2.13.0`` and only when the venv has none: letting pip pull torch in as a dependency (or
installing anything else first) would fetch a multi-GB CUDA build, and a GPU user's own torch is kept.
A stamp in the venv records a hash of ``pyproject.toml`` and the extras installed, so a second run
skips every install and gets to the real work at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / "dpdist-setup.json"
TORCH = "torch==2.13.0"  # the CPU wheel the project is tested with


def say(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def step(message: str, command: list[str], hint: str = "see the output above") -> None:
    say(message)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code != 0:
        sys.exit(f"[setup] failed: {message} (`{' '.join(command)}` exited {code}); {hint}")


def bootstrap(extras: tuple[str, ...] = ()) -> Path:
    """Make sure ``.venv`` holds dpdist (editable) with ``extras``; return the venv's ``bin`` folder."""
    if sys.version_info < (3, 10):
        sys.exit(f"[setup] failed: dpdist needs Python >= 3.10; this is {sys.version.split()[0]}")
    os.environ["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    os.environ["PIP_USER"] = "0"  # a user-wide pip config must not turn installs into --user ones
    os.environ.setdefault("DS_BUILD_OPS", "0")  # DeepSpeed (an extra): no C++ ops built at install; none is used
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        stamp = {}
    kept = set(stamp.get("extras", [])) if stamp.get("pyproject") == digest else set()
    if set(extras) <= kept and (BIN / "python").exists():
        return BIN
    python = str(BIN / "python")
    if not (BIN / "python").exists():
        step("creating .venv", [sys.executable, "-m", "venv", str(VENV)],
             "on Debian/Ubuntu install the python3-venv package")
        step("checking that pip can do editable installs", [python, "-m", "pip", "install", "-q", "pip>=21.3"])
    has_torch = subprocess.run([python, "-c", "import importlib.util, sys; "
                                "sys.exit(importlib.util.find_spec('torch') is None)"]).returncode == 0
    if not has_torch:
        step(f"installing {TORCH} (CPU build)", [python, "-m", "pip", "install", "-q", TORCH])
    target = f".[{','.join(sorted(extras))}]" if extras else "."
    step(f"installing dpdist (editable) from {target}", [python, "-m", "pip", "install", "-q", "-e", target])
    STAMP.write_text(json.dumps({"pyproject": digest, "extras": sorted(kept | set(extras))}))
    return BIN


def exec_dpdist(args: list[str], who: str) -> None:
    """Set up, then become ``dpdist ARGS``: the job's exit status and signals are then its own."""
    command = [str(bootstrap() / "dpdist"), *args]
    sys.stdout.flush()
    try:
        os.execv(command[0], command)
    except OSError as exc:
        sys.exit(f"[{who}] failed to start {command[0]}: {exc}")
