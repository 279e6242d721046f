"""Noisy DP steps of a tiny float64 model on one (data x tensor) layout; rank 0 saves what the tests compare.

Usage (under torchrun): layout_steps.py OUT DATA TENSOR.  Writes OUT (the full-shape parameters after
the steps, vocabulary padding stripped) and OUT.json with: the per-example norms of a fixed batch as
the engine computes them on this layout, the collectives the DP machinery adds to one micro-batch,
and whether data-parallel replicas and tensor-parallel copies of replicated parameters are
bit-identical.
"""
import json
import sys

import torch
import torch.distributed as dist

from dpdist import ModelConfig, build_model
from dpdist.config import ParallelConfig
from dpdist.model.gpt import strip_vocab_padding
from dpdist.parallel.cross_entropy import per_example_loss
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.rules import linear
from dpdist.privacy.sampling import PoissonSampler
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.train.engine import PrivateGradient
from poisson_step import noisy_sgd_step

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
    engine = PrivateGradient(model, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=Q * N, secret=SECRET,
                             micro_batch_size=3, seq_len=8, dp_group=mesh.dp_group, tp_group=mesh.tp_group,
                             clipping=clipping)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    chunk_bytes = linear.STREAM_CHUNK_BYTES
    linear.STREAM_CHUNK_BYTES = 1
    try:
        for step in range(STEPS):
            noisy_sgd_step(engine, optimizer, sampler, data, step)
    finally:
        linear.STREAM_CHUNK_BYTES = chunk_bytes
    engine.detach()
    return model


def norms_and_added_collectives(mesh) -> tuple[list[float], list[tuple[int, bool]]]:
    """Per-example norms on this layout, and the all-reduces one DP micro-batch adds over a plain one."""
    model, (ids, labels) = tiny_model(mesh), fixed_batch()
    calls, real_all_reduce = [], dist.all_reduce

    def counting_all_reduce(tensor, *args, group=None, **kwargs):
        calls.append((tensor.numel(), group is mesh.tp_group))
        return real_all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        per_example_loss(model(ids), labels, vocab_start=model.vocab_start, tp_group=mesh.tp_group).sum().backward()
        plain = list(calls)
        calls.clear()
        engine = PrivateGradient(model, clip_norm=1.0, micro_batch_size=5, seq_len=8, tp_group=mesh.tp_group)
        engine.microbatch(ids, labels)
        private = list(calls)
    finally:
        dist.all_reduce = real_all_reduce
    added = list(private)
    for call in plain:
        added.remove(call)
    losses = engine.loss(ids, labels)
    losses.sum().backward()
    norms = engine.tap.take_sq_norms().sqrt()
    engine.detach()
    return norms.tolist(), added


def identical_over(tensors: list[torch.Tensor], group, size: int) -> bool:
    if size == 1 or not tensors:
        return True
    flat = torch.cat([t.reshape(-1) for t in tensors])
    copies = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(copies, flat, group=group)
    return all(torch.equal(c, flat) for c in copies)


if __name__ == "__main__":
    out, data_degree, tensor_degree = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mesh = init_mesh(ParallelConfig(data=data_degree, tensor=tensor_degree))
    norms, added = norms_and_added_collectives(mesh) if mesh.world_size > 1 else ([], [])
    model = train_tiny(mesh)
    params = list(model.parameters())
    replicated = [p.detach() for p in params if not p.tensor_model_parallel]
    verdict = {
        "norms": norms, "added_collectives": added,
        "dp_replicas_identical": identical_over([p.detach() for p in params], mesh.dp_group, mesh.dp_size),
        "tp_replicated_identical": identical_over(replicated, mesh.tp_group, mesh.tp_size),
    }
    full = strip_vocab_padding(full_state_dict(model, mesh.tp_group), CFG)
    per_layer = strip_vocab_padding(full_state_dict(train_tiny(mesh, "per_layer"), mesh.tp_group), CFG)
    if mesh.rank == 0:
        torch.save(full, out)
        torch.save(per_layer, out + ".per_layer.pt")
        json.dump(verdict, open(out + ".json", "w"))
    shutdown(mesh)
