"""A few noisy DP steps of a tiny float64 model on a (data x tensor) layout; rank 0 saves the parameters.

Usage (under torchrun): dp_steps.py OUT DATA TENSOR.  Also checks, on every rank, that data-parallel
replicas hold bit-identical parameters, and writes that verdict next to the parameters.
"""
import json
import sys

import torch
import torch.distributed as dist

from dpdist import ModelConfig, build_model
from dpdist.config import ParallelConfig
from dpdist.privacy.sampling import PoissonSampler
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.train.engine import PrivateGradient

SECRET, N, Q, STEPS = 1234, 40, 0.3, 3


def tiny_model(mesh) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, dtype="float64")
    return build_model(cfg, tp_group=mesh.tp_group)


def train_tiny(mesh) -> torch.nn.Module:
    model = tiny_model(mesh)
    data = torch.randint(0, 41, (N, 9), generator=torch.Generator().manual_seed(1))
    sampler = PoissonSampler(N, Q, SECRET, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, micro_batch_size=3)
    engine = PrivateGradient(model, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=Q * N, secret=SECRET,
                             micro_batch_size=3, seq_len=8, dp_group=mesh.dp_group, tp_group=mesh.tp_group)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        for micro in sampler.plan(step).micro_batches:
            rows = data[micro.indices]
            engine.microbatch(rows[:, :-1], rows[:, 1:], micro.mask)
        engine.release(step)
        optimizer.step()
        optimizer.zero_grad()
    return model


def replicas_identical(model, mesh) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(mesh.dp_size)]
    dist.all_gather(copies, flat, group=mesh.dp_group)
    return all(torch.equal(c, flat) for c in copies)


if __name__ == "__main__":
    out, data_degree, tensor_degree = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mesh = init_mesh(ParallelConfig(data=data_degree, tensor=tensor_degree))
    model = train_tiny(mesh)
    identical = replicas_identical(model, mesh) if mesh.dp_size > 1 else True
    if mesh.rank == 0:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)
        json.dump({"replicas_identical": identical}, open(out + ".json", "w"))
    shutdown(mesh)
