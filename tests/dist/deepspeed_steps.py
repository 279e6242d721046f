"""The DeepSpeed backend against the native one on one (data x tensor) layout; rank 0 writes the verdicts.

Usage (under torchrun, DS_ACCELERATOR=cpu): deepspeed_steps.py OUT.json TENSOR.  Three checks:

- ``equivalence``: STEPS noisy AdamW steps (fp32, sigma 1) of the same tiny GPT on the same Poisson
  batches, natively and through DeepSpeed at each (ZeRO stage, mode, clipping) case; the largest
  parameter difference relative to the parameter's scale.
- ``noise``: one step of an empty batch (zero gradient) under SGD at lr 1 through DeepSpeed, so the
  update is -sigma C / qN times the noise: its standardised coordinates, their variance (1 if each
  coordinate is noised once, 2 or 1/2 if per rank) and their distance to the keyed noise itself.
- ``canary``: noise off, clip norm 1e-3, a single real example in the step: the update's norm must be
  lr C / qN, so the clipped gradient (not DeepSpeed's own) reached the optimizer, once, normalised.
"""
import json
import os
import sys

import torch

from dpdist import ModelConfig, build_model
from dpdist.config import ParallelConfig, RunConfig
from dpdist.model import strip_vocab_padding
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.noise import keyed_normal
from dpdist.privacy.sampling import MicroBatch, PoissonSampler
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.privacy.step import DPStep, UniformNoise, native_step
from dpdist.train.backends.deepspeed import DeepSpeedBackend

SECRET, N, Q, STEPS, VOCAB, MICRO = 1234, 48, 0.25, 4, 41, 3
MODEL = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, max_seq_len=8, dtype="float32")
CASES = [(1, "bookkeeping", "flat"), (2, "bookkeeping", "flat"), (2, "two_pass", "flat"), (1, "bookkeeping", "per_layer")]
DATA = torch.randint(0, VOCAB, (N, 9), generator=torch.Generator().manual_seed(1))


def run_config(mesh, stage: int) -> RunConfig:
    cfg = RunConfig(model=MODEL)
    cfg.train.backend, cfg.deepspeed.zero_stage, cfg.train.micro_batch_size = "deepspeed", stage, MICRO
    cfg.parallel.data, cfg.parallel.tensor = mesh.dp_size, mesh.tp_size
    return cfg


def gradient(mesh, model, optimizer, backend: str, stage: int = 1, mode: str = "bookkeeping", clipping: str = "flat",
             clip_norm: float = 0.5, sigma: float = 1.0):
    kwargs = dict(clip_norm=clip_norm, noise_multiplier=sigma, secret=SECRET, mode=mode, clipping=clipping,
                  micro_batch_size=MICRO, seq_len=8)
    if backend == "native":
        return native_step(model, **kwargs, expected_batch_size=Q * N, dp_group=mesh.dp_group,
                           tp_group=mesh.tp_group), optimizer
    backend = DeepSpeedBackend(run_config(mesh, stage))
    optimizer = backend.prepare(model, optimizer, mesh)
    reduce, add_noise = backend.dp_seams(kwargs.pop("secret"), Q * N)
    scales = UniformNoise(kwargs.pop("noise_multiplier") * clip_norm)
    return DPStep(model, **kwargs, expected_batch_size=Q * N, tp_group=mesh.tp_group, reduce=reduce,
                  add_noise=add_noise, noise_scales=scales), optimizer


def full(model, mesh) -> dict:
    return strip_vocab_padding(full_state_dict(model, mesh.tp_group), model)


def step(grad, optimizer, micro_batches, index: int) -> None:
    for k, micro in enumerate(micro_batches):
        rows = DATA[micro.indices]
        grad.microbatch(rows[:, :-1], rows[:, 1:], micro.mask, last=k == len(micro_batches) - 1)
    grad.release(index)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trained(mesh, backend: str, *case) -> dict:
    model = build_model(MODEL, tp_group=mesh.tp_group)
    grad, optimizer = gradient(mesh, model, torch.optim.AdamW(model.parameters(), lr=0.01), backend, *case)
    sampler = PoissonSampler(N, Q, SECRET, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, micro_batch_size=MICRO)
    for index in range(STEPS):
        step(grad, optimizer, sampler.plan(index).micro_batches, index)
    grad.detach()
    return full(model, mesh)


def relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


def one_step_update(mesh, micro_batches, **kwargs) -> dict:
    """The full-shape update of one DeepSpeed SGD step at lr 1 (ZeRO-2)."""
    model = build_model(MODEL, tp_group=mesh.tp_group)
    before = full(model, mesh)
    grad, optimizer = gradient(mesh, model, torch.optim.SGD(model.parameters(), lr=1.0), "deepspeed", 2, **kwargs)
    step(grad, optimizer, micro_batches, 0)
    grad.detach()
    return {k: v - before[k] for k, v in full(model, mesh).items()}


def noise_verdict(mesh) -> dict:
    update = one_step_update(mesh, [], sigma=1.0, clip_norm=1.0)  # an empty Poisson batch: noise only
    z = {k: -v * (Q * N) for k, v in update.items()}  # std sigma C = 1
    keyed = {k: keyed_normal(SECRET, 0, k, tuple(v.shape)) for k, v in z.items()}
    flat = torch.cat([v.reshape(-1) for v in z.values()]).double()
    return {"count": flat.numel(), "mean": float(flat.mean()), "variance": float(flat.var()),
            "max_abs_from_keyed": max(float((z[k] - keyed[k]).abs().max()) for k in z)}


def canary_verdict(mesh) -> dict:
    mask = torch.zeros(MICRO, dtype=torch.bool)
    if mesh.dp_rank == 0:
        mask[0] = True
    micro = MicroBatch(torch.arange(MICRO) + 3 * mesh.dp_rank, mask)
    update = one_step_update(mesh, [micro], sigma=0.0, clip_norm=1e-3)
    norm = float(torch.cat([v.reshape(-1) for v in update.values()]).double().norm())
    return {"update_norm": norm, "bound": 1.0 * 1e-3 / (Q * N)}


if __name__ == "__main__":
    out, tensor = sys.argv[1], int(sys.argv[2])
    mesh = init_mesh(ParallelConfig(data=int(os.environ["WORLD_SIZE"]) // tensor, tensor=tensor))
    try:
        verdict = {"equivalence": {}}
        reference = {}
        for case in CASES:
            clipping = case[2]
            if clipping not in reference:
                reference[clipping] = trained(mesh, "native", 1, "bookkeeping", clipping)
            got = trained(mesh, "deepspeed", *case)
            verdict["equivalence"]["/".join(map(str, case))] = relative_difference(got, reference[clipping])
        verdict["noise"] = noise_verdict(mesh)
        verdict["canary"] = canary_verdict(mesh)
        if mesh.rank == 0:
            with open(out, "w") as handle:
                json.dump(verdict, handle, indent=2)
    finally:
        shutdown(mesh)
