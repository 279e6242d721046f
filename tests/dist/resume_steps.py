"""Worker script for the checkpoint tests (run under torchrun by tests/test_checkpoint.py).

``resume_steps.py exact RUN_A RUN_B K``: in RUN_A train all steps at once; in RUN_B train K steps
(the run ends with a checkpoint at K), then a second ``train`` call resumes from it to the end.
``resume_steps.py save RUN K``: train K steps, ending with a checkpoint.
``resume_steps.py continue RUN``: resume RUN's latest checkpoint and train to the end.
Every run directory was prepared by the test (config.yaml with this launch's layout, plan.json).
"""
import dataclasses
import sys
from pathlib import Path

from dpdist.config import load_config
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.train.loop import train
from dpdist.train.plan import RunPlan


def run(mesh, run_dir: str, steps: int | None = None, resume: str = "none") -> dict:
    cfg = load_config(f"{run_dir}/config.yaml")
    plan = RunPlan.load(f"{run_dir}/plan.json")
    if steps is not None:
        plan = dataclasses.replace(plan, max_steps=steps)
    return train(cfg, plan, Path(run_dir), mesh, resume=resume)


if __name__ == "__main__":
    mode, first = sys.argv[1], sys.argv[2]
    mesh = init_mesh(load_config(f"{first}/config.yaml").parallel)
    try:
        if mode == "exact":
            run_b, k = sys.argv[3], int(sys.argv[4])
            run(mesh, first)
            run(mesh, run_b, steps=k)
            run(mesh, run_b, resume="auto")
        elif mode == "save":
            run(mesh, first, steps=int(sys.argv[3]))
        elif mode == "continue":
            run(mesh, first, resume="auto")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        shutdown(mesh)
