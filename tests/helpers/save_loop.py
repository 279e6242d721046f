"""The model and run of tests/dist/save_loop.py, whose parameters at step k are the initial ones with 1
added k times, so that a loaded checkpoint can be checked against its step."""
import torch

from dpdist.config import load_config
from dpdist.model import build_model
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

