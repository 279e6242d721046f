"""``dpdist bench --backend deepspeed``: ZeRO-1/2 against the native backend, DP against non-private.

Every (backend, private) case runs in its own ``torchrun`` launch of data x tensor processes, because
peak RSS (``ru_maxrss``) is per process and only grows.  Each rank builds the benchmark GPT sharded over
its tensor group, takes its share of one fixed batch, and runs AdamW steps through the same seams as
``dpdist train``: the backend object (``dpdist.train.backends``) and its seams in the DP step or the
non-private step; under DeepSpeed (ZeRO shards AdamW's two state tensors over the data group, and ZeRO-2 the gradients).

Reported per case: step time (the slowest rank's, mean and min over the steps after the first) and per
rank memory: the peak RSS, and the peak minus the RSS once the model is built and DeepSpeed imported
(so: optimizer state, gradients, activations, DeepSpeed's flat buffers), the largest over the ranks.
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
CASES = [("native", None), ("deepspeed", 1), ("deepspeed", 2)]


def _gradient(spec: dict, cfg, mesh, model, optimizer, local_batch: int):
    from ..config import RunConfig
    from ..privacy.step import DPStep, NonPrivateStep, UniformNoise
    from ..train.backends import backend_for

    run_cfg = RunConfig()
    run_cfg.train.backend, run_cfg.train.micro_batch_size = spec["backend"], local_batch
    run_cfg.deepspeed.zero_stage = spec["zero_stage"]
    run_cfg.parallel.data, run_cfg.parallel.tensor = mesh.dp_size, mesh.tp_size
    backend = backend_for(run_cfg)
    optimizer = backend.prepare(model, optimizer, mesh)
    if not spec["private"]:
        return NonPrivateStep(model, expected_batch_size=cfg.batch, dp_group=mesh.dp_group, tp_group=mesh.tp_group,
                              backend=backend.nonprivate_seam()), optimizer
    reduce, add_noise = backend.dp_seams(1, cfg.batch)
    return DPStep(model, clip_norm=1.0, expected_batch_size=cfg.batch, clipping=spec["clipping"],
                  micro_batch_size=local_batch, seq_len=cfg.seq_len, tp_group=mesh.tp_group, reduce=reduce,
                  add_noise=add_noise, noise_scales=UniformNoise(1.0)), optimizer


def run_worker(spec: dict) -> dict | None:
    """Every rank: the steps of one case; rank 0 returns the slowest rank's times and the largest memory."""
    from ..config import ParallelConfig
    from ..model import build_model
    from ..runtime.mesh import init_mesh, shutdown
    from .config import BenchConfig, make_batch, model_config
    from .machine import current_rss_mb, peak_rss_mb

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_mesh(ParallelConfig(data=spec["data"], tensor=spec["tensor"]))
    try:
        cfg = BenchConfig(**spec["config"])
        ids, labels = make_batch(cfg)
        rows = slice(mesh.dp_rank * cfg.batch // mesh.dp_size, (mesh.dp_rank + 1) * cfg.batch // mesh.dp_size)
        ids, labels = ids[rows], labels[rows]
        if spec["backend"] == "deepspeed":  # its modules are not the model's memory: load them first
            from ..train.backends.deepspeed import import_deepspeed

            import_deepspeed(mesh.device)
        torch.manual_seed(cfg.seed)
        model = build_model(model_config(cfg), tp_group=mesh.tp_group)
        baseline = current_rss_mb()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gradient, optimizer = _gradient(spec, cfg, mesh, model, optimizer, ids.shape[0])
        times = []
        for index in range(cfg.steps):
            dist.barrier()
            start = time.perf_counter()
            gradient.microbatch(ids, labels)
            gradient.release(index)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        peak = peak_rss_mb()
        stats = torch.tensor(times + [peak - baseline, peak], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        times, (peak_mb, peak_rss_mb) = stats[:-2].tolist()[1:], stats[-2:].tolist()  # first step: warm-up
        if not mesh.is_main:
            return None
        return {"step_s": statistics.fmean(times), "step_min_s": min(times), "peak_mb": peak_mb,
                "peak_rss_mb": peak_rss_mb, "params_per_rank": sum(p.numel() for p in model.parameters())}
    finally:
        shutdown(mesh)


def _launch(spec: dict) -> dict:
    import subprocess

    world = spec["data"] * spec["tensor"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "dpdist.bench.backend", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), DS_ACCELERATOR="cpu")
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"backend bench failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def run_benchmark(config: dict, *, data: int, tensor: int, clipping: str, stages=(1, 2), log=None) -> dict:
    """Every case in a fresh launch; each backend's DP/non-private ratio, and each case against native."""
    cases = [case for case in CASES if case[0] == "native" or case[1] in stages]
    rows = []
    for backend, stage in cases:
        for private in (False, True):
            label = f"{backend}" + (f" ZeRO-{stage}" if stage else "") + (" DP" if private else " non-private")
            if log:
                log(f"running {label} on {data} x {tensor} processes ...")
            spec = {"config": config, "data": data, "tensor": tensor, "clipping": clipping, "backend": backend,
                    "zero_stage": stage, "private": private}
            rows.append({"backend": backend, "zero_stage": stage, "private": private, **_launch(spec)})
    for row in rows:
        twin = next(r for r in rows if r["backend"] == row["backend"] and r["zero_stage"] == row["zero_stage"]
                    and not r["private"])
        native = next(r for r in rows if r["backend"] == "native" and r["private"] == row["private"])
        row["dp_over_nonprivate"] = row["step_s"] / twin["step_s"]
        row["time_over_native"] = row["step_s"] / native["step_s"]
        row["memory_over_native"] = row["peak_mb"] / native["peak_mb"]
    return {"config": config, "data": data, "tensor": tensor, "clipping": clipping, "optimizer": "adamw",
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": rows}


def format_report(out: dict) -> str:
    c = out["config"]
    lines = [f"dpdist bench --backend deepspeed: data {out['data']} x tensor {out['tensor']}, GPT {c['layers']} layers, "
             f"d_model {c['d_model']}, {c['heads']} heads, vocab {c['vocab']}, batch {c['batch']} x {c['seq_len']} "
             f"tokens, {out['clipping']} clipping, AdamW, torch {out['torch']}, {c['steps']} steps per case (first "
             "excluded), each case a fresh launch",
             "memory per rank = peak RSS minus RSS after building the model (largest rank); total peak RSS in brackets"]
    header = ("case", "step s mean/min", "DP / non-private", "x native time", "MB per rank", "x native memory")
    table = [header]
    for r in out["rows"]:
        case = r["backend"] + (f" ZeRO-{r['zero_stage']}" if r["zero_stage"] else "") + (" DP" if r["private"] else
                                                                                          " non-private")
        table.append((case, f"{r['step_s']:.3f} / {r['step_min_s']:.3f}", f"{r['dp_over_nonprivate']:.2f}",
                      f"{r['time_over_native']:.2f}", f"{r['peak_mb']:.0f} ({r['peak_rss_mb']:.0f})",
                      f"{r['memory_over_native']:.2f}"))
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


if __name__ == "__main__":
    measured = run_worker(json.loads(sys.argv[1]))
    if measured is not None:
        print(RESULT_TAG + json.dumps(measured), flush=True)
