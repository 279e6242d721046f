"""``python3 launcher/quickstart.py [key=value ...]``: set up ``.venv``, then the README's main job.

That job is ``dpdist train --config configs/default.yaml`` (2 data-parallel processes on CPU on the
embedded corpus); extra arguments are passed through, e.g. ``train.steps=5``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import ROOT, exec_dpdist  # noqa: E402

if __name__ == "__main__":
    exec_dpdist(["train", "--config", str(ROOT / "configs" / "default.yaml"), *sys.argv[1:]], "quickstart")
