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

from dpdist.config import ParallelConfig
from dpdist.model import strip_vocab_padding
from dpdist.parallel.cross_entropy import per_example_loss
from dpdist.parallel.state import full_state_dict
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.privacy.step import native_step
from helpers.layout_steps import fixed_batch, tiny_model, train_tiny


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
        engine = native_step(model, clip_norm=1.0, micro_batch_size=5, seq_len=8, tp_group=mesh.tp_group)
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
    full = strip_vocab_padding(full_state_dict(model, mesh.tp_group), model)
    per_layer_model = train_tiny(mesh, "per_layer")
    per_layer = strip_vocab_padding(full_state_dict(per_layer_model, mesh.tp_group), per_layer_model)
    if mesh.rank == 0:
        torch.save(full, out)
        torch.save(per_layer, out + ".per_layer.pt")
        json.dump(verdict, open(out + ".json", "w"))
    shutdown(mesh)
