"""Worker script for tests/test_fsdp.py (under torchrun, or one process): each pair of arguments is an
operation on a run directory the test prepared (its config.yaml holds this launch's layout and backend).

- ``train RUN``: train every step in one go.
- ``save RUN``: train K steps, ending with a checkpoint at K.
- ``reload RUN``: resume RUN's checkpoint without training a step, keep the weights it loaded as
  ``loaded.pt``, then resume again and train to the end.
- ``noise RUN``: one release with no example in it (all sums zero), so every parameter's gradient is
  its noise over qN; the full gradients (vocabulary padding dropped) go to ``RUN/noise.pt``.
- ``sensitivity RUN``: the pre-noise clipped sums of one batch, and of the same batch without its first
  example, gathered whole, to ``RUN/sensitivity.pt``.
"""
import shutil
import sys
from pathlib import Path

import torch

from dpdist.config import load_config
from dpdist.data.dataset import prepare_data
from dpdist.model import build_model, strip_vocab_padding
from dpdist.parallel.state import gather_full
from dpdist.privacy.sampling import public_padding
from dpdist.runtime.mesh import init_mesh, shutdown
from dpdist.runtime.secret import run_secret
from dpdist.train.engine import build_gradient
from dpdist.train.loop import make_optimizer
from dpdist.train.plan import RunPlan

from helpers.runs import K
from resume_steps import run  # this script's folder is on the path


def gradient(mesh, run_dir: Path):
    cfg = load_config(run_dir / "config.yaml")
    plan = RunPlan.load(run_dir / "plan.json")
    model = build_model(cfg.model, tp_group=mesh.tp_group, device=mesh.device)
    built = build_gradient(cfg, plan, model, make_optimizer(cfg, model), mesh, run_secret(cfg.privacy.seed, run_dir, mesh))
    return cfg, model, built


def full(param, tensor, mesh) -> torch.Tensor:
    """The whole of ``tensor``, held as ``param`` is (sharded over the data group by FSDP, over the tensor
    group by its layer, or neither)."""
    local = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return gather_full(param, mesh.tp_group, local)


def noise(mesh, run_dir: Path) -> None:
    _, model, built = gradient(mesh, run_dir)
    built.step.release(7)
    grads = strip_vocab_padding({name: full(p, p.grad, mesh) for name, p in model.named_parameters()}, model)
    if mesh.is_main:
        torch.save(grads, run_dir / "noise.pt")


def sensitivity(mesh, run_dir: Path) -> None:
    cfg, model, built = gradient(mesh, run_dir)
    data = prepare_data(cfg.data)
    rows = cfg.train.micro_batch_size
    indices = torch.arange(mesh.dp_rank * rows, (mesh.dp_rank + 1) * rows)
    sums = []
    for without_first in (False, True):
        mask = torch.ones(rows, dtype=torch.bool)
        if without_first and mesh.dp_rank == 0:
            mask[0] = False  # the first example of the whole batch is gone
        input_ids, labels = public_padding(*data.train_batch(indices), mask)
        built.step.microbatch(input_ids, labels, mask)
        step = built.step
        store = step.tap.pop_grad_sums()
        released = step.parametrization.released(step.names)
        summed = step.reduce(released, [store[r.tensor] for r in released])
        sums.append({r.name: full(r.tensor, g, mesh) for r, g in zip(released, summed)})
    if mesh.is_main:
        torch.save(sums, run_dir / "sensitivity.pt")


if __name__ == "__main__":
    pairs = list(zip(sys.argv[1::2], map(Path, sys.argv[2::2])))
    mesh = init_mesh(load_config(pairs[0][1] / "config.yaml").parallel)
    try:
        for op, run_dir in pairs:
            if op == "train":
                run(mesh, run_dir)
            elif op == "save":
                run(mesh, run_dir, steps=K)
            elif op == "reload":
                run(mesh, run_dir, steps=K, resume="auto")
                if mesh.is_main:
                    shutil.copy(run_dir / "final" / "model.pt", run_dir / "loaded.pt")
                run(mesh, run_dir, resume="auto")
            elif op == "noise":
                noise(mesh, run_dir)
            elif op == "sensitivity":
                sensitivity(mesh, run_dir)
            else:
                raise SystemExit(f"unknown operation {op!r}")
    finally:
        shutdown(mesh)
