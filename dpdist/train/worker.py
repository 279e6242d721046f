"""Entry point of one training process: ``python -m dpdist.train.worker RUN_DIR`` (what torchrun starts).

The parent (``dpdist train``) has already validated the config, prepared the data and resolved the
privacy plan into the run directory; every worker reads the same files, so all ranks agree.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import load_config
from ..runtime.mesh import init_mesh, shutdown
from .loop import train
from .plan import RunPlan


def run_worker(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    plan = RunPlan.load(run_dir / "plan.json")
    mesh = init_mesh(cfg.parallel)
    try:
        summary = train(cfg, plan, run_dir, mesh)
        if mesh.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        shutdown(mesh)


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]))
