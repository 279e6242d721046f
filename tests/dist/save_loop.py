"""Commit checkpoints of one model in a loop until killed (tests/test_checkpoint.py kills it with SIGKILL).

``save_loop.py RUN_DIR``: prints ``committed <step>`` after every commit; the parameters at step k are
``helpers.save_loop.model_at(k)``.
"""
import sys
from pathlib import Path

import torch

from dpdist.runtime.mesh import Mesh
from dpdist.train.backends import backend_for
from dpdist.train.checkpoint import save_checkpoint
from dpdist.train.loop import make_optimizer
from helpers.save_loop import PLAN, model_at

if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    cfg, model = model_at(0)
    optimizer = make_optimizer(cfg, model)
    for p in model.parameters():  # one AdamW step with zero gradients: state exists, parameters unchanged
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for step in range(1, 10**6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
        save_checkpoint(run_dir, step, model, optimizer, cfg, PLAN, Mesh(), keep=2, backend=backend_for(cfg))
        print(f"committed {step}", flush=True)
