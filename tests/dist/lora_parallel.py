"""A LoRA GPT sharded over the tensor group trains as the one-process model does.

Usage (under torchrun): lora_parallel.py OUT.  Every rank builds the adapted model at tensor degree
WORLD_SIZE and at degree 1 (same base weights and adapters), takes two noisy DP steps (plain SGD) on
both with flat and with per-layer clipping, then compares the engine's per-example norms on the moved
model and the full parameters.  Rank 0 writes OUT (JSON) per clipping: the largest relative
differences over the group, and how far the adapters moved (so an update that vanished would not pass).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from dpdist import ModelConfig, build_model
from dpdist.config import ParallelConfig
from dpdist.model import strip_vocab_padding
from dpdist.model.lora import add_adapters
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.step import native_step
from dpdist.runtime.mesh import init_mesh, shutdown
from helpers.steps import noisy_sgd_steps

SEQ = 8
CFG = ModelConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=2, max_seq_len=SEQ, dtype="float64")
IDS = torch.randint(0, 37, (6, SEQ), generator=torch.Generator().manual_seed(4))
LABELS = IDS.roll(-1, 1)
LABELS[1, :3] = LABELS[4] = -100  # ignored targets, one example with none


def trained(tp_group, clipping: str) -> tuple[dict, torch.Tensor]:
    """The full parameters after two noisy SGD steps, and the per-example norms of the moved model."""
    model = build_model(CFG, tp_group=tp_group)
    add_adapters(model, rank=4, alpha=8.0, tp_group=tp_group, seed=3)
    engine = native_step(model, clip_norm=0.3, noise_multiplier=1.0, expected_batch_size=6.0, secret=9,
                         micro_batch_size=6, seq_len=SEQ, tp_group=tp_group, clipping=clipping)
    noisy_sgd_steps(engine, model, IDS, LABELS, releases=2)
    engine.loss(IDS, LABELS).sum().backward()
    norms = engine.tap.take_sq_norms().sqrt()
    engine.detach()
    return strip_vocab_padding(full_state_dict(model, tp_group), model), norms


def max_over_group(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


if __name__ == "__main__":
    mesh = init_mesh(ParallelConfig(data=1, tensor=int(os.environ["WORLD_SIZE"])))
    try:
        verdict = {}
        for clipping in ("flat", "per_layer"):
            sharded, sharded_norms = trained(mesh.tp_group, clipping)
            single, single_norms = trained(None, clipping)
            real = single_norms > 0  # an example without targets has norm 0 at both degrees
            norms = ((sharded_norms - single_norms).abs() / torch.where(real, single_norms, 1.0)).max()
            params = max(float((sharded[n] - t).abs().max() / t.abs().max().clamp(min=1e-300))
                         for n, t in single.items())
            verdict[clipping] = {
                "norms_max_rel_diff": max_over_group(float(norms)),
                "params_max_rel_diff": max_over_group(params),
                "adapters_moved": min(float(single[n].abs().max()) for n in single if ".lora_B." in n),
            }
        if mesh.rank == 0:
            with open(sys.argv[1], "w") as handle:
                json.dump(verdict, handle)
    finally:
        shutdown(mesh)
