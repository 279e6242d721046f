"""Step time against activation memory, with and without ``train.activation_checkpointing=blocks``.

    .venv/bin/python benchmarks/activation_checkpointing.py [--seq-len 512 --batch 4 --rounds 6]

The model is ``dpdist bench``'s default (a 4-layer GPT, d_model 256, vocab 8000).  The steps: the
non-private step, and the DP step (the planner's default norm strategies) with flat clipping in
book-keeping mode and with per-layer clipping.

Memory: each (step, setting) runs in a fresh process, so each peak is its own.  After a warm-up step
(first-use imports and caches, torch.utils.checkpoint's among them) the freed memory is returned to
the system and the peak restarted (``/proc/self/clear_refs``); the peak resident memory (``VmHWM``)
of the next step, less the resident memory before it (the model and the batch), is what the step's
activations and the tap's records cost.

Time: one process per step kind alternates the two settings, step by step, for ``--rounds`` rounds
after a warm-up of each, so that load from other processes falls on both alike; the ratio is that
of the medians.

The peak comes as the backward starts, when the logits and their gradient are alive beside every
block's saved activations (of which checkpointing keeps only the blocks' inputs), before the tap's
records build up; so the saving is about the same for the three steps.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("none", "blocks")
STEPS = {"non-private": None, "DP flat, book-keeping": "flat", "DP per-layer": "per_layer"}


def status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_step(step: str, setting: str, seq_len: int, batch: int):
    """A function running one step of kind ``step`` on the bench model with ``setting``; its parameter count."""
    import torch

    from dpdist.bench.config import BenchConfig, build_bench_model, make_batch
    from dpdist.privacy.step import NonPrivateStep, native_step
    from dpdist.train.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = BenchConfig(seq_len=seq_len, batch=batch)
    model = build_bench_model(cfg)
    apply_activation_checkpointing(setting, model)
    if STEPS[step] is None:
        engine = NonPrivateStep(model, expected_batch_size=float(batch))
    else:
        engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=float(batch),
                             clipping=STEPS[step], micro_batch_size=batch, seq_len=seq_len)
    input_ids, labels = make_batch(cfg)
    releases = iter(range(10**9))

    def run() -> float:
        started = time.perf_counter()
        engine.microbatch(input_ids, labels)
        engine.release(next(releases))
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - started

    return run, sum(p.numel() for p in model.parameters())


def memory(step: str, setting: str, seq_len: int, batch: int) -> dict:
    run, params = make_step(step, setting, seq_len, batch)
    run()  # warm-up
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed memory back, or the next peak would reuse it
    Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM from the current resident memory
    before = status_mib("VmRSS")
    run()
    return {"activation_mib": status_mib("VmHWM") - before, "params_m": params / 1e6}


def timing(step: str, seq_len: int, batch: int, rounds: int) -> dict:
    runs = {setting: make_step(step, setting, seq_len, batch)[0] for setting in SETTINGS}
    for run in runs.values():
        run()  # warm-up
    times = {setting: [] for setting in SETTINGS}
    for _ in range(rounds):
        for setting, run in runs.items():
            times[setting].append(run())
    return {setting: statistics.median(values) for setting, values in times.items()}


def worker(*args: str) -> dict:
    # A fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when freed, so
    # the resident memory follows the live tensors (by default the threshold rises after frees, and
    # freed tensors stay resident in the heap for later ones, which the peak would miss or count twice).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    subprocess_args = [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(subprocess_args, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # memory STEP SETTING | timing STEP
    args = parser.parse_args()
    if args.worker:
        kind, step, *setting = args.worker
        result = (memory(step, setting[0], args.seq_len, args.batch) if kind == "memory" else
                  timing(step, args.seq_len, args.batch, args.rounds))
        print(json.dumps(result))
        return
    shape = ["--seq-len", str(args.seq_len), "--batch", str(args.batch), "--rounds", str(args.rounds)]
    rows = []
    for step in STEPS:
        mib = {setting: worker("memory", step, setting, *shape) for setting in SETTINGS}
        rows.append((step, worker("timing", step, *shape), mib))
    print(f"bench model ({rows[0][2]['none']['params_m']:.2f}M params), T={args.seq_len}, batch {args.batch}; time: "
          f"median of {args.rounds} interleaved steps; activation memory: peak RSS of a step less RSS before it")
    print(f"{'step':<24}{'time none':>11}{'blocks':>9}{'ratio':>7}{'MiB none':>11}{'blocks':>9}{'ratio':>7}")
    for step, seconds, mib in rows:
        none, blocks = mib["none"]["activation_mib"], mib["blocks"]["activation_mib"]
        print(f"{step:<24}{seconds['none']:>10.2f}s{seconds['blocks']:>8.2f}s{seconds['blocks'] / seconds['none']:>7.2f}"
              f"{none:>11.0f}{blocks:>9.0f}{blocks / none:>7.2f}")


if __name__ == "__main__":
    main()
