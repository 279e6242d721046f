"""Where a DP step's time goes: non-private and DP steps alternating in one process, phases and rules.

    .venv/bin/python benchmarks/profile_step.py [flat|per_layer|automatic] [ghost|materialise|stream] [--steps N]

Complements ``dpdist bench`` (fresh process per mode, peak memory): here both models live in one
process and their steps alternate, so a slow patch of the machine hits both and the ratio is paired
step by step.  Prints the fastest time of each phase over the steps after two warm-up steps, the
paired median ratio, and the time spent in each norm rule method (summed over layers, fastest step).
The model and batch are ``dpdist bench``'s defaults.
"""
from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time

import torch

from dpdist.model.gpt import build_model
from dpdist.parallel.cross_entropy import per_example_loss
from dpdist.privacy import rules
from dpdist.privacy.clipping import clip_factors
from dpdist.bench.config import BenchConfig, make_batch, model_config
from dpdist.train.engine import PrivateGradient

STEPS, WARMUP = 8, 2


def timed_rules(timers: dict) -> None:
    """Wrap every rule method so that its time is added to ``timers`` under 'Rule.method'."""
    for cls in {type(rule) for rule in rules._RULES.values()}:
        for name in ("prepare", "sq_norms", "clipped_sums", "clip_layer"):
            method = getattr(cls, name)

            def wrapped(self, *args, _method=method, _key=f"{cls.__name__}.{name}"):
                start = time.perf_counter()
                result = _method(self, *args)
                timers[_key] += time.perf_counter() - start
                return result

            setattr(cls, name, wrapped)


def main(clipping: str = "flat", strategy: str | None = None, steps: int = STEPS) -> None:
    cfg = BenchConfig()
    ids, labels = make_batch(cfg)
    plain = build_model(model_config(cfg))
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3)
    model = build_model(model_config(cfg))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = PrivateGradient(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=cfg.batch, secret=1,
                             clipping=clipping, micro_batch_size=cfg.batch, seq_len=cfg.seq_len, strategy=strategy)
    timers: dict = collections.defaultdict(float)
    timed_rules(timers)

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
        losses = engine.loss(ids, labels)
        t1 = time.perf_counter()
        losses.sum().backward()  # per-layer clipping clips here
        t2 = time.perf_counter()
        norms = engine.tap.take_sq_norms().sqrt()
        if clipping != "per_layer":
            engine.tap.accumulate_clipped(clip_factors(norms, engine.clip_norm, clipping))
        t3 = time.perf_counter()
        engine.release(step)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"forward": t1 - t0, "backward": t2 - t1, "clipped sums": t3 - t2, "noise": t4 - t3,
                "total": time.perf_counter() - t0, "faults": minor_faults() - faults}

    plain_rows, dp_rows, rule_rows = [], [], []
    for step in range(steps):
        plain_rows.append(nonprivate_step())
        timers.clear()
        dp_rows.append(dp_step(step))
        rule_rows.append(dict(timers))
    plain_rows, dp_rows, rule_rows = plain_rows[WARMUP:], dp_rows[WARMUP:], rule_rows[WARMUP:]

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
    for key in sorted(rule_rows[0]):
        print(f"  {key}: {min(row[key] for row in rule_rows):.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clipping", nargs="?", default="flat", choices=["flat", "per_layer", "automatic"])
    parser.add_argument("strategy", nargs="?", default=None, choices=["ghost", "materialise", "stream"])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of each kind, the first {WARMUP} excluded")
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    main(args.clipping, args.strategy, args.steps)
