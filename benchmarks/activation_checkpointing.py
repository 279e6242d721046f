"""Step time against activation memory, with and without ``train.activation_checkpointing=blocks``.

    .venv/bin/python benchmarks/activation_checkpointing.py [--seq-len 512 --batch 4 --steps 3]

The model is ``dpdist bench``'s default (a 4-layer GPT, d_model 256, vocab 8000).  The steps: the
non-private step, and the DP step (the planner's default norm strategies) with flat clipping in
book-keeping mode and with per-layer clipping.  Each (step, setting) runs in a fresh process, so each
peak is its own: the peak resident memory (``VmHWM``) over the steps, less the resident memory before
the first one (the model and the batch), is what the step's activations and the tap's records cost.
The first step is a warm-up, after which freed memory is returned to the system and the peak
restarted (``/proc/self/clear_refs``); the time is the median of the other steps.  Prints each one's numbers and
the ratios blocks / none.

Book-keeping keeps every layer's recorded input and output gradient until the backward ends, and
those are most of the blocks' activations, so checkpointing saves little there; per-layer clipping
frees a layer's records as soon as it is clipped, as the non-private backward frees activations.
"""
from __future__ import annotations

import argparse
import ctypes
import json
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


def measure(step: str, setting: str, seq_len: int, batch: int, steps: int) -> dict:
    """One step kind's median step time and activation peak with ``setting``, in this process."""
    import torch

    from dpdist.bench.config import BenchConfig, build_bench_model, make_batch
    from dpdist.privacy.step import NonPrivateStep, native_step
    from dpdist.train.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = BenchConfig(seq_len=seq_len, batch=batch, steps=steps)
    model = build_bench_model(cfg)
    apply_activation_checkpointing(setting, model)
    if STEPS[step] is None:
        engine = NonPrivateStep(model, expected_batch_size=float(batch))
    else:
        engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=float(batch),
                             clipping=STEPS[step], micro_batch_size=batch, seq_len=seq_len)
    input_ids, labels = make_batch(cfg)

    def step(release: int) -> float:
        started = time.perf_counter()
        engine.microbatch(input_ids, labels)
        engine.release(release)
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - started

    step(0)  # warm-up: first-use imports and caches (torch.utils.checkpoint's among them) are not activations
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed memory back, or later peaks would reuse it
    Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM from the current resident memory
    before = status_mib("VmRSS")
    times = [step(release) for release in range(1, steps)]
    return {"step_s": statistics.median(times), "activation_mib": status_mib("VmHWM") - before,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("STEP", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args.seq_len, args.batch, args.steps)))
        return
    root = Path(__file__).resolve().parents[1]
    rows = []
    for step in STEPS:
        results = {}
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--worker", step, setting, "--seq-len", str(args.seq_len),
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True, cwd=root)
            results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((step, results["none"], results["blocks"]))
    print(f"bench model ({rows[0][1]['params_m']:.2f}M params), T={args.seq_len}, batch {args.batch}, median of "
          f"{args.steps - 1} steps; activation memory = peak RSS over the steps less RSS before them")
    print(f"{'step':<24}{'time none':>11}{'blocks':>9}{'ratio':>7}{'MiB none':>11}{'blocks':>9}{'ratio':>7}")
    for step, none, blocks in rows:
        print(f"{step:<24}{none['step_s']:>10.2f}s{blocks['step_s']:>8.2f}s{blocks['step_s'] / none['step_s']:>7.2f}"
              f"{none['activation_mib']:>11.0f}{blocks['activation_mib']:>9.0f}"
              f"{blocks['activation_mib'] / none['activation_mib']:>7.2f}")


if __name__ == "__main__":
    main()
