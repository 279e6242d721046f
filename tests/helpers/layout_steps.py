"""Noisy DP steps of a tiny float64 model on any (data x tensor) layout, and a batch of the cases a
sharded norm rule gets wrong: what tests/dist/layout_steps.py runs on each layout and the tests run in
one process to compare with.
"""
import torch

from dpdist import ModelConfig, build_model
from dpdist.privacy.rules import linear
from dpdist.privacy.sampling import PoissonSampler
from dpdist.privacy.step import native_step
from helpers.poisson_step import noisy_sgd_run

SECRET, N, Q, STEPS, VOCAB = 1234, 40, 0.3, 6, 41  # 41 splits evenly over neither 2 nor 4 ranks
CFG = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, max_seq_len=8, dtype="float64")


def tiny_model(mesh) -> torch.nn.Module:
    return build_model(CFG, tp_group=mesh.tp_group)


def fixed_batch():
    """Repeated tokens and ignored labels: the cases a sharded norm rule gets wrong."""
    ids = torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(2))
    ids[0, 1::2] = ids[0, 0]
    labels = ids.roll(-1, 1)
    labels[1, :3] = -100
    return ids, labels


def train_tiny(mesh, clipping: str = "flat") -> torch.nn.Module:
    """STEPS noisy steps.  Per-layer clipping streams its per-example gradients one example per chunk,
    so every chunk of every layer makes its own tensor-group all-reduce of clip-factor norms."""
    model = tiny_model(mesh)
    data = torch.randint(0, VOCAB, (N, 9), generator=torch.Generator().manual_seed(1))
    sampler = PoissonSampler(N, Q, SECRET, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, micro_batch_size=3)
    engine = native_step(model, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=Q * N, secret=SECRET,
                         micro_batch_size=3, seq_len=8, dp_group=mesh.dp_group, tp_group=mesh.tp_group,
                         clipping=clipping)
    chunk_bytes = linear.STREAM_CHUNK_BYTES
    linear.STREAM_CHUNK_BYTES = 1
    try:
        noisy_sgd_run(engine, model, sampler, data, STEPS, lr=0.5)
    finally:
        linear.STREAM_CHUNK_BYTES = chunk_bytes
    return model
