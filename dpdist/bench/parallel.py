"""``dpdist bench --data D --tensor T``: the DP step against the non-private step on a data x tensor
mesh, and what the DP machinery adds to communication.

Launched under ``torchrun`` by the command (``python -m dpdist.bench.parallel SPEC`` on every
rank).  Each rank builds the benchmark GPT sharded over its tensor group and runs non-private and DP
steps *alternately in the same processes*, so both see the same machine load and the ratio is paired
step by step.  (Peak memory is not reported here: one process holds both models; the single-process
``dpdist bench`` measures memory per fresh process.)

- Non-private step: forward, ``per_example_loss(...).mean().backward()``, the gradient all-reduce over
  the data group (what DDP does), SGD.
- DP step: ``DPStep.microbatch`` (norm contributions all-reduced over the tensor group) and
  ``release`` (the clipped sums all-reduced over the data group, keyed noise), SGD.

The warm-up step of each kind (not timed) counts its collectives' calls and bytes per group (tensor,
data, other; ``collectives.CollectiveCounter``).  The DP machinery's addition is the difference;
it is compared with the bytes of one gradient all-reduce of this rank's parameters, what a
data-parallel step moves whether or not it is private.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

RESULT_TAG = "DPDIST_BENCH_PARALLEL_RESULT "


def _setup(spec: dict, mesh):
    from ..model import build_model
    from ..parallel.cross_entropy import per_example_loss
    from .config import BenchConfig, make_batch, model_config
    from ..privacy.step import native_step

    cfg = BenchConfig(**spec["config"])
    ids, labels = make_batch(cfg)  # the same batch on every rank; each data replica takes its share
    rows = slice(mesh.dp_rank * cfg.batch // mesh.dp_size, (mesh.dp_rank + 1) * cfg.batch // mesh.dp_size)
    ids, labels = ids[rows], labels[rows]
    local_batch = ids.shape[0]

    torch.manual_seed(cfg.seed)
    plain = build_model(model_config(cfg), tp_group=mesh.tp_group)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3)

    def nonprivate_step(_: int) -> None:
        per_example_loss(plain(ids), labels, vocab_start=plain.vocab_start, tp_group=mesh.tp_group).mean().backward()
        if mesh.dp_size > 1:
            grads = [p.grad for p in plain.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=mesh.dp_group)
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    model = build_model(model_config(cfg), tp_group=mesh.tp_group)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=cfg.batch, secret=1,
                         clipping=spec["clipping"], micro_batch_size=local_batch, seq_len=cfg.seq_len,
                         dp_group=mesh.dp_group, tp_group=mesh.tp_group)

    def dp_step(index: int) -> None:
        engine.microbatch(ids, labels)
        engine.release(index)
        opt.step()
        opt.zero_grad(set_to_none=True)

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return cfg, local_batch, nonprivate_step, dp_step, param_bytes


def run_worker(spec: dict) -> dict | None:
    """Every rank: alternate non-private and DP steps; rank 0 returns the measurements."""
    from ..config import ParallelConfig
    from ..runtime.mesh import init_mesh, shutdown
    from .collectives import CollectiveCounter

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_mesh(ParallelConfig(data=spec["data"], tensor=spec["tensor"]))
    try:
        cfg, local_batch, nonprivate_step, dp_step, param_bytes = _setup(spec, mesh)
        steps = (("nonprivate", nonprivate_step), ("dp", dp_step))
        comm = {}
        for mode, step in steps:  # the warm-up step: counted, not timed
            dist.barrier()
            with CollectiveCounter({"tensor": mesh.tp_group, "data": mesh.dp_group}) as counter:
                step(0)
            comm[mode] = {"calls": counter.calls, "bytes": counter.bytes}
        times = {"nonprivate": [], "dp": []}
        for index in range(1, cfg.steps):
            for mode, step in steps:
                dist.barrier()
                start = time.perf_counter()
                step(index)
                times[mode].append(time.perf_counter() - start)
        slowest = torch.tensor([times["nonprivate"], times["dp"]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        result = None
        if mesh.is_main:
            result = _summarise(spec, cfg, mesh, local_batch, slowest.tolist(), comm, param_bytes)
        return result
    finally:
        shutdown(mesh)


def _summarise(spec, cfg, mesh, local_batch, slowest, comm, param_bytes) -> dict:
    nonprivate, dp = slowest
    added_calls = {kind: dp_calls - comm["nonprivate"]["calls"].get(kind, 0)
                   for kind, dp_calls in comm["dp"]["calls"].items()}
    added_bytes = {kind: dp_bytes - comm["nonprivate"]["bytes"].get(kind, 0)
                   for kind, dp_bytes in comm["dp"]["bytes"].items()}
    return {
        "config": spec["config"], "data": mesh.dp_size, "tensor": mesh.tp_size, "clipping": spec["clipping"],
        "threads_per_rank": torch.get_num_threads(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "local_batch": local_batch,
        "nonprivate_step_s": statistics.fmean(nonprivate), "nonprivate_step_min_s": min(nonprivate),
        "dp_step_s": statistics.fmean(dp), "dp_step_min_s": min(dp),
        "ratio": statistics.fmean(dp) / statistics.fmean(nonprivate),
        "ratio_paired_median": statistics.median(d / n for d, n in zip(dp, nonprivate)),
        "nonprivate_comm": comm["nonprivate"], "dp_comm": comm["dp"],
        "dp_added_calls": {k: v for k, v in added_calls.items() if v}, "dp_added_bytes": {k: v for k, v in added_bytes.items() if v},
        "gradient_allreduce_bytes": param_bytes,
    }


def launch(spec: dict, log=None) -> dict:
    """Run the benchmark under ``torchrun --standalone`` with data x tensor processes; rank 0's result."""
    import subprocess

    world = spec["data"] * spec["tensor"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "dpdist.bench.parallel", json.dumps(spec)]
    if log:
        log(f"launching {world} processes (data {spec['data']} x tensor {spec['tensor']}) ...")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"parallel bench failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def format_report(out: dict) -> str:
    c = out["config"]
    kinds = sorted(set(out["nonprivate_comm"]["bytes"]) | set(out["dp_comm"]["bytes"]))

    def traffic(comm: dict) -> str:
        return ", ".join(f"{k}: {comm['calls'].get(k, 0)} calls {comm['bytes'].get(k, 0) / 1e6:.3f} MB" for k in kinds) or "none"

    added = ", ".join(f"{k}: {out['dp_added_calls'].get(k, 0)} calls, {out['dp_added_bytes'].get(k, 0)} bytes"
                      for k in sorted(set(out["dp_added_calls"]) | set(out["dp_added_bytes"]))) or "nothing"
    share = sum(out["dp_added_bytes"].values()) / out["gradient_allreduce_bytes"]
    return "\n".join([
        f"dpdist bench (parallel): data {out['data']} x tensor {out['tensor']}, GPT {c['layers']} layers, d_model "
        f"{c['d_model']}, {c['heads']} heads, vocab {c['vocab']}, batch {c['batch']} x {c['seq_len']} tokens "
        f"({out['local_batch']} per data replica), {out['clipping']} clipping, {out['threads_per_rank']} thread(s) per "
        f"rank, torch {out['torch']}, {c['steps']} steps each (first excluded), non-private and DP steps alternating",
        f"non-private step  {out['nonprivate_step_s']:.3f} s mean, {out['nonprivate_step_min_s']:.3f} s min",
        f"DP step           {out['dp_step_s']:.3f} s mean, {out['dp_step_min_s']:.3f} s min",
        f"DP / non-private  {out['ratio']:.3f} (means), {out['ratio_paired_median']:.3f} (median of paired steps)",
        f"communication per step, non-private: {traffic(out['nonprivate_comm'])}",
        f"communication per step, DP:          {traffic(out['dp_comm'])}",
        f"added by DP: {added}; {share:.2e} of one gradient all-reduce of a rank's parameters "
        f"({out['gradient_allreduce_bytes'] / 1e6:.1f} MB)",
    ])


if __name__ == "__main__":
    measured = run_worker(json.loads(sys.argv[1]))
    if measured is not None:
        print(RESULT_TAG + json.dumps(measured), flush=True)
