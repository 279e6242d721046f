"""Entry point of one training process: ``python -m dpdist.train.worker RUN_DIR [--resume auto|none|CHECKPOINT]``.

What torchrun starts.  The parent (``dpdist train``) has already validated the config, prepared the
data and resolved the privacy plan into the run directory; every worker reads the same files, so all
ranks agree.  ``--resume auto`` (the default) starts from the run's latest complete checkpoint when
there is one, so a worker that torchrun restarts after a failure (``--max-restarts``) or a requeued
Slurm job continues where the last checkpoint left off.  A finished run leaves ``RUN_DIR/DONE``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import load_config
from ..runtime.mesh import init_mesh, shutdown
from .loop import train
from .plan import RunPlan
from .stop import StopSignal


DONE = "DONE"


def run_worker(run_dir: Path, resume: str = "auto") -> dict:
    stop = StopSignal()  # before anything slow: an early signal must not kill the process
    cfg = load_config(run_dir / "config.yaml")
    plan = RunPlan.load(run_dir / "plan.json")
    mesh = init_mesh(cfg.parallel)
    try:
        summary = train(cfg, plan, run_dir, mesh, resume=resume, stop=stop)
        if mesh.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if not summary["stopped_by_signal"]:
                (run_dir / DONE).write_text("")
        return summary
    finally:
        shutdown(mesh)
        stop.restore()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m dpdist.train.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", default="auto", help="auto (latest checkpoint, if any), none, or a checkpoint folder")
    args = parser.parse_args()
    run_worker(args.run_dir, args.resume)
