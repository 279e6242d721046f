"""Where a DP step's time goes: non-private and DP steps alternating in one process, phases, norm rules and ops.

    .venv/bin/python benchmarks/profile_step.py [flat|per_layer|automatic] [ghost|materialise|stream] [--steps N]

Complements ``dpdist bench`` (fresh process per mode, peak memory): here both models live in one
process and their steps alternate, so a slow patch of the machine hits both and the ratio is paired
step by step.  Prints the fastest time of each phase over the steps after two warm-up steps and the
paired median ratio.  Then one more DP micro-batch (``DPStep.microbatch``, the real step) runs
under torch.profiler: the time in each norm rule method (the rules' Python functions, summed over
layers, inclusive: ``clip_layer`` includes the ``sq_norms`` / ``clipped_sums`` it calls) and the ops
that take the most time.  The profiler's Python tracing slows that micro-batch: read its numbers as
shares.  The model and batch are ``dpdist bench``'s defaults.
"""
from __future__ import annotations

import argparse
import re
import resource
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dpdist.bench.config import BenchConfig, make_batch, model_config
from dpdist.model import build_model
from dpdist.parallel.cross_entropy import per_example_loss
from dpdist.privacy.step import DPStep, native_step

STEPS, WARMUP = 8, 2
TOP_OPS = 12
# a norm rule method as the profiler's Python tracer names it: "dpdist/privacy/rules/linear.py(193): sq_norms"
RULE_METHOD = re.compile(r"dpdist/privacy/rules/(\w+)\.py\(\d+\): (prepare|sq_norms|clipped_sums|clip_layer)$")


def profile_microbatch(engine: DPStep, ids: torch.Tensor, labels: torch.Tensor) -> None:
    """Run one DP micro-batch under torch.profiler; print its norm rule methods and its heaviest ops."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        start = time.perf_counter()
        engine.microbatch(ids, labels)
        total_ms = 1e3 * (time.perf_counter() - start)
    rules: dict[str, float] = {}
    ops: dict[str, float] = {}
    for event in prof.events():
        match = RULE_METHOD.search(event.name)
        if match:
            key = f"{'NormRule' if match[1] == '__init__' else match[1]}.{match[2]}"  # the base class's clip_layer
            rules[key] = rules.get(key, 0.0) + event.cpu_time_total / 1e3
        elif event.name.startswith("aten::"):
            ops[event.name] = ops.get(event.name, 0.0) + event.self_cpu_time_total / 1e3
    print(f"one DP micro-batch under torch.profiler: {total_ms:.0f} ms")
    print("norm rule methods (rules/FILE.py's method, ms, inclusive):")
    for key in sorted(rules):
        print(f"  {key}: {rules[key]:.1f}")
    print(f"ops by self CPU time (ms, share of the micro-batch), top {TOP_OPS}:")
    for name, ms in sorted(ops.items(), key=lambda item: -item[1])[:TOP_OPS]:
        print(f"  {name:56s} {ms:8.1f}  {ms / total_ms:5.1%}")


def main(clipping: str = "flat", strategy: str | None = None, steps: int = STEPS) -> None:
    cfg = BenchConfig()
    ids, labels = make_batch(cfg)
    plain = build_model(model_config(cfg))
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3)
    model = build_model(model_config(cfg))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=cfg.batch, secret=1,
                         clipping=clipping, micro_batch_size=cfg.batch, seq_len=cfg.seq_len, strategy=strategy)

    def minor_faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def nonprivate_step() -> dict:
        faults = minor_faults()
        t0 = time.perf_counter()
        loss = per_example_loss(plain(ids), labels).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return {"forward": t1 - t0, "backward": t2 - t1, "total": time.perf_counter() - t0,
                "faults": minor_faults() - faults}

    def dp_step(step: int) -> dict:
        faults = minor_faults()
        t0 = time.perf_counter()
        engine.microbatch(ids, labels)  # forward, backward, norms, clipped sums
        t1 = time.perf_counter()
        engine.release(step)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"micro-batch": t1 - t0, "noise": t2 - t1, "total": time.perf_counter() - t0,
                "faults": minor_faults() - faults}

    plain_rows, dp_rows = [], []
    for step in range(steps):
        plain_rows.append(nonprivate_step())
        dp_rows.append(dp_step(step))
    plain_rows, dp_rows = plain_rows[WARMUP:], dp_rows[WARMUP:]

    def fastest(rows):
        return {key: min(row[key] for row in rows) for key in rows[0] if key != "faults"}

    print(f"threads {torch.get_num_threads()}, {clipping} clipping, strategy {strategy or 'planner default'}, "
          f"fastest of {steps - WARMUP} steps (s)")
    print("non-private  " + "  ".join(f"{k} {v:.3f}" for k, v in fastest(plain_rows).items()))
    print("DP           " + "  ".join(f"{k} {v:.3f}" for k, v in fastest(dp_rows).items()))
    paired = statistics.median(d["total"] / p["total"] for d, p in zip(dp_rows, plain_rows))
    print(f"DP / non-private: {fastest(dp_rows)['total'] / fastest(plain_rows)['total']:.3f} (fastest), "
          f"{paired:.3f} (median of paired steps)")
    print("minor page faults per step (median): " + "  ".join(
        f"{name} {statistics.median(row['faults'] for row in rows):.0f}" for name, rows in
        (("non-private", plain_rows), ("DP", dp_rows))))
    profile_microbatch(engine, ids, labels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clipping", nargs="?", default="flat", choices=["flat", "per_layer", "automatic"])
    parser.add_argument("strategy", nargs="?", default=None, choices=["ghost", "materialise", "stream"])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of each kind, the first {WARMUP} excluded")
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    main(args.clipping, args.strategy, args.steps)
