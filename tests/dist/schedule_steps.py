"""Worker script for tests/test_schedule.py (run under torchrun, which DeepSpeed needs even for one process).

``schedule_steps.py RUN OUT``: train the prepared RUN (its backend as config.yaml says) and write to
OUT the learning rate of every optimizer step as the optimizer itself saw it: a global step pre-hook
reads the param groups of whichever torch optimizer steps, DeepSpeed's client optimizer included.
"""
import json
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_pre_hook

from dpdist.config import load_config
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.train.loop import train
from dpdist.train.plan import RunPlan

if __name__ == "__main__":
    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    seen = []
    register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([group["lr"] for group in optimizer.param_groups]))
    cfg = load_config(run_dir / "config.yaml")
    mesh = init_mesh(cfg.parallel)
    try:
        train(cfg, RunPlan.load(run_dir / "plan.json"), run_dir, mesh, resume="none")
    finally:
        shutdown(mesh)
    out.write_text(json.dumps(seen))
