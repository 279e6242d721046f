"""Commit checkpoints of one model in a loop until killed (tests/test_checkpoint.py kills it with SIGKILL).

``save_loop.py RUN_DIR``: prints ``committed <step>`` after every commit; the parameters at step k are
the initial ones with 1 added k times, so a loaded checkpoint can be checked against its step.
"""
import sys
from pathlib import Path

import torch

from dpdist.config import load_config
from dpdist.model.gpt import build_model
from dpdist.runtime.mesh import Mesh
from dpdist.train.checkpoint import save_checkpoint
from dpdist.train.loop import make_optimizer
from dpdist.train.plan import RunPlan

CONFIG = ["model.vocab_size=4000", "model.d_model=256", "model.n_layers=4", "privacy.noise_multiplier=1.0",
          "privacy.target_epsilon=null"]
PLAN = RunPlan(num_examples=1000, num_val=0, vocab_size=4000, sample_rate=0.01, delta=1e-5, noise_multiplier=1.0,
               epsilon_budget=None, max_steps=10**6)


def model_at(step: int):
    torch.manual_seed(0)
    cfg = load_config(None, CONFIG)
    model = build_model(cfg.model)
    with torch.no_grad():
        for _ in range(step):  # the same additions as the loop, so the values match bit for bit
            for p in model.parameters():
                p.add_(1)
    return cfg, model


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
        save_checkpoint(run_dir, step, model, optimizer, cfg, PLAN, Mesh(), keep=2)
        print(f"committed {step}", flush=True)
