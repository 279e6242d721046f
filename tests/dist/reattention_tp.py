"""A Re-Attention model sharded over the tensor group computes what one process computes.

Usage (under torchrun): reattention_tp.py OUT TENSOR.  Every rank builds the sharded model and the
single-process model (same initial weights), gives both the same noise level and token frequencies,
and compares its own vocabulary slice of the logits, then the per-example norms of the engine on the
sharded model with those of the single-process audit.  Rank 0 writes OUT (JSON): the largest
differences over the group, and how far Re-Attention moves the logits from plain attention (so a
correction that vanished would not pass unnoticed).
"""
import json
import sys

import torch
import torch.distributed as dist

from dpdist import ModelConfig, build_model
from dpdist.audit import per_example_norms
from dpdist.config import ParallelConfig
from dpdist.model.reattention import Reattention, weight_noise
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.privacy.step import native_step

VOCAB, SEQ = 41, 8  # 41 splits evenly over no tensor degree: the padded vocabulary is exercised too
CFG = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, max_seq_len=SEQ, dtype="float64")
NOISE_STD, EXPECTED_BATCH = 1.0, 4.0


def frequencies() -> torch.Tensor:
    p = torch.linspace(0.01, 1.0, VOCAB, dtype=torch.float64)
    return p[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(4))
    return ids, ids.roll(-1, 1)


def reattentive(tp_group=None):
    noise = weight_noise(NOISE_STD, EXPECTED_BATCH, frequencies(), variance_scale=1.0)
    return build_model(ModelConfig(**CFG), tp_group=tp_group, reattention=Reattention(noise, frozenset({0, 1})))


def max_over_group(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


if __name__ == "__main__":
    out, tensor = sys.argv[1], int(sys.argv[2])
    mesh = init_mesh(ParallelConfig(data=1, tensor=tensor))
    ids, labels = batch()
    sharded, single = reattentive(mesh.tp_group), reattentive()
    with torch.no_grad():
        local = sharded(ids)
        start, width = sharded.vocab_start, local.shape[-1]
        real = min(width, VOCAB - start)  # columns past the vocabulary pad it (masked to -inf)
        expected = single(ids)[..., start:start + real]
        plain = build_model(ModelConfig(**CFG))(ids)[..., start:start + real]
    engine = native_step(sharded, clip_norm=1.0, micro_batch_size=4, seq_len=SEQ, tp_group=mesh.tp_group)
    engine.loss(ids, labels).sum().backward()
    norms = engine.tap.take_sq_norms().sqrt()
    engine.detach()
    reference = per_example_norms(single, ids, labels)
    verdict = {
        "logits_max_abs_diff": max_over_group(float((local[..., :real] - expected).abs().max())),
        "correction_moves_logits": max_over_group(float((expected - plain).abs().max())),
        "norms_max_rel_diff": max_over_group(float(((norms - reference).abs() / reference).max())),
    }
    if mesh.rank == 0:
        json.dump(verdict, open(out, "w"))
    shutdown(mesh)
