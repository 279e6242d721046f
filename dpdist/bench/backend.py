"""``dpdist bench --backend deepspeed|fsdp|all``: DeepSpeed ZeRO-1/2 and FSDP against the native backend,
DP against non-private.

Every (backend, private) case runs in its own ``torchrun`` launch of data x tensor processes, because
peak RSS (``ru_maxrss``) is per process and only grows.  Each rank builds the benchmark GPT sharded over
its tensor group, takes its share of one fixed batch, and runs AdamW steps through the same seams as
``dpdist train``: the backend object (``dpdist.train.backends``) and its seams in the DP step or the
non-private step.  DeepSpeed's ZeRO shards AdamW's two state tensors over the data group (ZeRO-2 the
gradients too); FSDP shards the weights, gradients and AdamW state.

``activation_checkpointing`` (``none`` or ``blocks``) has every rank recompute the model's blocks in the
backward as ``dpdist train`` does for ``train.activation_checkpointing`` (the same switch).

Reported per case: step time (the slowest rank's, mean and min over the steps after the first); the
time spent adding noise per step (the slowest rank's, ``dpdist.bench.noise``); and per rank memory, the
largest over the ranks: the peak RSS minus the RSS before the model is built (weights, gradients,
optimizer state, activations: what sharding divides), the peak minus the RSS once the model is built
(what the step adds to a replica), and the peak RSS itself.  The backend's modules are imported before
either baseline, since they are not the model's memory, and glibc returns every large tensor's memory
when it is freed (``_launch``), so the peak is of live memory, not of what the allocator kept.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

RESULT_TAG = "DPDIST_BENCH_BACKEND_RESULT "
BACKENDS = ("deepspeed", "fsdp")  # compared with native; ``--backend all`` runs both
THREADS_PER_RANK = 1  # per-rank times (the noise's 1/D) compare across data degrees only at equal threads per rank


def cases(backends, stages) -> list[tuple[str, int | None]]:
    """native first, then each asked-for backend (DeepSpeed once per ZeRO stage)."""
    chosen = [("native", None)]
    if "deepspeed" in backends:
        chosen += [("deepspeed", stage) for stage in stages]
    if "fsdp" in backends:
        chosen.append(("fsdp", None))
    return chosen


def _gradient(spec: dict, cfg, mesh, model, optimizer, local_batch: int, clock):
    from ..config import RunConfig
    from ..privacy.step import DPStep, NonPrivateStep, UniformNoise
    from ..train.backends import backend_for

    run_cfg = RunConfig()
    run_cfg.train.backend, run_cfg.train.micro_batch_size = spec["backend"], local_batch
    run_cfg.deepspeed.zero_stage = spec["zero_stage"]
    run_cfg.parallel.data, run_cfg.parallel.tensor = mesh.dp_size, mesh.tp_size
    backend = backend_for(run_cfg)
    optimizer = backend.prepare(model, optimizer, mesh)  # FSDP points the param groups at its shards
    if not spec["private"]:
        return NonPrivateStep(model, expected_batch_size=cfg.batch, dp_group=mesh.dp_group, tp_group=mesh.tp_group,
                              backend=backend.nonprivate_seam()), optimizer
    reduce, add_noise = backend.dp_seams(1, cfg.batch)
    if spec["backend"] == "deepspeed":  # its seam arms the noise; the client optimizer's pre-hook draws it
        clock.around_pre_hooks(backend.client_optimizer)
    return DPStep(model, clip_norm=1.0, expected_batch_size=cfg.batch, clipping=spec["clipping"],
                  micro_batch_size=local_batch, seq_len=cfg.seq_len, tp_group=mesh.tp_group, reduce=reduce,
                  add_noise=clock.seam(add_noise), noise_scales=UniformNoise(1.0)), optimizer


def _import_backend(backend: str, device) -> None:
    """Load the backend's modules before the memory baselines: they are not the model's memory."""
    if backend == "deepspeed":
        from ..train.backends.deepspeed import import_deepspeed

        import_deepspeed(device)
    elif backend == "fsdp":
        import torch.distributed.fsdp  # noqa: F401
        import torch.distributed.tensor  # noqa: F401


def run_worker(spec: dict) -> dict | None:
    """Every rank: the steps of one case; rank 0 returns the slowest rank's times and the largest memory."""
    from ..config import ParallelConfig
    from ..model import build_model
    from ..runtime.mesh import init_mesh, shutdown
    from ..train.activation_checkpointing import apply_activation_checkpointing
    from .config import BenchConfig, make_batch, model_config
    from .machine import current_rss_mb, peak_rss_mb
    from .noise import NoiseClock

    torch.set_num_threads(THREADS_PER_RANK)
    mesh = init_mesh(ParallelConfig(data=spec["data"], tensor=spec["tensor"]))
    clock = NoiseClock()
    try:
        cfg = BenchConfig(**spec["config"])
        ids, labels = make_batch(cfg)
        rows = slice(mesh.dp_rank * cfg.batch // mesh.dp_size, (mesh.dp_rank + 1) * cfg.batch // mesh.dp_size)
        ids, labels = ids[rows], labels[rows]
        _import_backend(spec["backend"], mesh.device)
        start_rss = current_rss_mb()
        torch.manual_seed(cfg.seed)
        model = build_model(model_config(cfg), tp_group=mesh.tp_group)
        apply_activation_checkpointing(spec["activation_checkpointing"], model)
        built_rss = current_rss_mb()
        params = sum(p.numel() for p in model.parameters())  # this rank's tensor shard, before any data sharding
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gradient, optimizer = _gradient(spec, cfg, mesh, model, optimizer, ids.shape[0], clock)
        times, noise = [], []
        for index in range(cfg.steps):
            if mesh.world_size > 1:  # one process (--data 1) has no process group, or FSDP's own of one
                dist.barrier()
            start = time.perf_counter()
            gradient.microbatch(ids, labels)
            gradient.release(index)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            noise.append(clock.take())
        peak = peak_rss_mb()
        stats = torch.tensor(times + noise + [peak - start_rss, peak - built_rss, peak], dtype=torch.float64)
        if mesh.world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        steps = cfg.steps
        times, noise = stats[1:steps].tolist(), stats[steps + 1:2 * steps].tolist()  # first step: warm-up
        from_start_mb, peak_mb, peak_rss = stats[-3:].tolist()
        if not mesh.is_main:
            return None
        return {"step_s": statistics.fmean(times), "step_min_s": min(times),
                "noise_s": statistics.fmean(noise) if spec["private"] else None, "from_start_mb": from_start_mb,
                "peak_mb": peak_mb, "peak_rss_mb": peak_rss, "params_per_rank": params}
    finally:
        clock.close()
        shutdown(mesh)


def _launch(spec: dict) -> dict:
    import subprocess

    world = spec["data"] * spec["tensor"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "dpdist.bench.backend", json.dumps(spec)]
    # glibc keeps freed heap memory mapped and raises its mmap threshold as large blocks are freed, so peak
    # RSS would count memory a backend has already given back (FSDP's full weights once sharded, a block it
    # gathered); a fixed 1 MiB threshold gives every large tensor (weights, gradients, optimizer state, the
    # large activations) its own mapping, returned on free, so RSS follows live tensors; smaller ones stay
    # on the heap, where mapping each would slow the step.
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS_PER_RANK), DS_ACCELERATOR="cpu",
               MALLOC_MMAP_THRESHOLD_=str(2**20))
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"backend bench failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _label(row: dict) -> str:
    return row["backend"] + (f" ZeRO-{row['zero_stage']}" if row["zero_stage"] else "")


def run_case(config: dict, *, data: int, tensor: int, clipping: str, backend: str, stage: int | None, private: bool,
             activation_checkpointing: str = "none") -> dict:
    """One (backend, private) case in a fresh launch of data x tensor processes: rank 0's report."""
    return _launch({"config": config, "data": data, "tensor": tensor, "clipping": clipping, "backend": backend,
                    "zero_stage": stage, "private": private, "activation_checkpointing": activation_checkpointing})


def run_benchmark(config: dict, *, data: int, tensor: int, clipping: str, backends=BACKENDS, stages=(1, 2),
                  activation_checkpointing: str = "none", log=None) -> dict:
    """Every case in a fresh launch; each backend's DP/non-private ratio, and each case against native."""
    rows = []
    for backend, stage in cases(backends, stages):
        for private in (False, True):
            row = {"backend": backend, "zero_stage": stage, "private": private}
            if log:
                log(f"running {_label(row)} {'DP' if private else 'non-private'} on {data} x {tensor} processes ...")
            rows.append({**row, **run_case(config, data=data, tensor=tensor, clipping=clipping, backend=backend,
                                            stage=stage, private=private,
                                            activation_checkpointing=activation_checkpointing)})
    for row in rows:
        twin = next(r for r in rows if r["backend"] == row["backend"] and r["zero_stage"] == row["zero_stage"]
                    and not r["private"])
        native = next(r for r in rows if r["backend"] == "native" and r["private"] == row["private"])
        row["dp_over_nonprivate"] = row["step_s"] / twin["step_s"]
        row["time_over_native"] = row["step_s"] / native["step_s"]
        row["from_start_over_native"] = row["from_start_mb"] / native["from_start_mb"]
        row["memory_over_native"] = row["peak_mb"] / native["peak_mb"]
    return {"config": config, "data": data, "tensor": tensor, "clipping": clipping, "backends": list(backends),
            "activation_checkpointing": activation_checkpointing, "optimizer": "adamw", "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads_per_rank": THREADS_PER_RANK, "rows": rows}


def format_report(out: dict) -> str:
    c = out["config"]
    which = "all" if set(out["backends"]) == set(BACKENDS) else out["backends"][0]
    model = "GPT" if c["arch"] == "gpt" else "Llama"
    checkpointing = ("blocks recomputed in the backward" if out["activation_checkpointing"] == "blocks"
                     else "no activation checkpointing")
    lines = [f"dpdist bench --backend {which}: data {out['data']} x tensor {out['tensor']}, {model} {c['layers']} "
             f"layers, d_model {c['d_model']}, {c['heads']} heads, vocab {c['vocab']}, batch {c['batch']} x "
             f"{c['seq_len']} tokens, {out['clipping']} clipping, {checkpointing}, AdamW, torch {out['torch']}, "
             f"{c['steps']} steps per case (first excluded), each case a fresh launch, {out['threads_per_rank']} thread per rank on "
             f"{out['cpu_count']} CPUs",
             "per rank, largest rank: noise = time in the add-noise seam per step; MB from start = peak RSS minus "
             "RSS before building the model; MB after build = peak minus RSS once built (peak RSS in brackets)"]
    header = ("case", "step s mean/min", "DP / non-private", "x native time", "noise s/step", "MB from start",
              "x native", "MB after build", "x native")
    table = [header]
    for r in out["rows"]:
        table.append((_label(r) + (" DP" if r["private"] else " non-private"),
                      f"{r['step_s']:.3f} / {r['step_min_s']:.3f}", f"{r['dp_over_nonprivate']:.2f}",
                      f"{r['time_over_native']:.2f}", "-" if r["noise_s"] is None else f"{r['noise_s']:.4f}",
                      f"{r['from_start_mb']:.0f}", f"{r['from_start_over_native']:.2f}",
                      f"{r['peak_mb']:.0f} ({r['peak_rss_mb']:.0f})", f"{r['memory_over_native']:.2f}"))
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


if __name__ == "__main__":
    measured = run_worker(json.loads(sys.argv[1]))
    if measured is not None:
        print(RESULT_TAG + json.dumps(measured), flush=True)
    # The groups are destroyed and the result is out.  Finalising the interpreter after a DeepSpeed or
    # FSDP case still aborts now and then under load ("terminate called without an active exception",
    # a C++ thread torn down at exit: seen in full test runs, not in 20 launches of the same case
    # alone), which would fail a launch whose measurement is complete; nothing is left to clean up.
    sys.stderr.flush()
    os._exit(0)
