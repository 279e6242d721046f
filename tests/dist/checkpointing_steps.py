"""Worker script for tests/test_activation_checkpointing.py (run under torchrun): train every run
directory given, in order, from scratch.  Every directory was prepared by the test with this launch's
layout; the test compares their final weights.

Usage: checkpointing_steps.py RUN_DIR [RUN_DIR ...]
"""
import sys
from pathlib import Path

from dpdist.config import load_config
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.train.loop import train
from dpdist.train.plan import RunPlan

if __name__ == "__main__":
    runs = sys.argv[1:]
    mesh = init_mesh(load_config(f"{runs[0]}/config.yaml").parallel)
    try:
        for run in runs:
            train(load_config(f"{run}/config.yaml"), RunPlan.load(f"{run}/plan.json"), Path(run), mesh, resume="none")
    finally:
        shutdown(mesh)
