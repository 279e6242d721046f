"""``python3 launcher/quickstart.py [key=value ...]``: set up ``.venv``, then the README's main job.

That job is ``dpdist train --config configs/default.yaml`` (2 data-parallel processes on CPU on the
embedded corpus); extra arguments are passed through, e.g. ``train.steps=5``.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import ROOT, bootstrap  # noqa: E402


def main() -> None:
    command = [str(bootstrap() / "dpdist"), "train", "--config", str(ROOT / "configs" / "default.yaml"), *sys.argv[1:]]
    sys.stdout.flush()
    try:
        os.execv(command[0], command)  # the job's exit status and signals are then its own
    except OSError as exc:
        sys.exit(f"[quickstart] failed to start {command[0]}: {exc}")


if __name__ == "__main__":
    main()
