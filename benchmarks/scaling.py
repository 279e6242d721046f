"""The scaling tables of docs/scaling.md: for each model shape in configs/shapes/, each device count
and clipping, the fastest layout that fits as ``dpdist plan --fastest`` finds it, and the epsilon of
the stated schedule.  Everything printed is the plan's model (no run).

    python benchmarks/scaling.py [--hardware h100-80gb] [--devices 8 64] [--seq-lens 2048 4096]

Prints markdown: one table per sequence length, one row per (model, devices, clipping), each with
the ``dpdist plan`` command that gives it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from dpdist.commands.plan import plan
from dpdist.config import load_config
from dpdist.privacy.accounting import epsilon

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("gpt2-124m", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b")
DATASET = 2**20  # sequences: the stated dataset behind q (about 2 billion tokens at 2048 per sequence)
STEPS = 10_000
DELTA = 1e-6
# Rows beyond full training, where its rows say "does not fit": (label, shape, devices, clipping, overrides).
EXTRA = (("llama-3.1-70b + LoRA r16", "llama-3.1-70b", 8, "flat", ["lora.enabled=true", "lora.rank=16"]),)


def row_text(model: str, devices: int, clipping: str, seq: int, command: str, out: dict) -> str:
    best = out["fastest"]
    if best is None:
        return f"| {model} | {devices} | {clipping} | does not fit | | | | | | | `{command}` |"
    t, comm = best["time_s"], best["collective_bytes"]
    tokens = out["batch_size"] * seq
    layout = (f"{best['layout']}, mb {best['micro_batch_size']}"
              + (", ckpt" if best["activation_checkpointing"] == "blocks" else "")
              + (", budget 0" if best["memory_budget_mb"] == 0 else ""))
    return (f"| {model} | {devices} | {clipping} | {layout} | {best['memory_bytes']['peak'] / 2**30:.1f} | "
            f"{t['step']:.3g} | {t['step'] / t['nonprivate_step']:.2f} | {comm['tensor'] / 1e9:.3g} / "
            f"{comm['data'] / 1e9:.3g} | {t['noise']:.2f} | {tokens / t['step']:,.0f} | `{command}` |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", default="h100-80gb")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    args = parser.parse_args()
    cases = [(seq, shape, shape, devices, clipping, []) for seq in args.seq_lens for shape in SHAPES
             for devices in args.devices for clipping in ("flat", "per_layer")]
    cases += [(seq, *extra) for seq in args.seq_lens for extra in EXTRA if extra[2] in args.devices]
    tables: dict[int, list[str]] = {seq: [] for seq in args.seq_lens}
    for seq, label, shape, devices, clipping, extra in tqdm(cases, desc="planning", file=sys.stderr):
        config = f"configs/shapes/{shape}.yaml"
        overrides = [f"parallel.data={devices}", "parallel.tensor=1", f"privacy.clipping={clipping}",
                     f"data.seq_len={seq}", f"model.max_seq_len={seq}", *extra]
        out = plan(str(ROOT / config), overrides, args.hardware, fastest=True)
        out["batch_size"] = load_config(str(ROOT / config), overrides).train.batch_size
        command = f"dpdist plan --config {config} {' '.join(overrides)} --hardware {args.hardware} --fastest"
        tables[seq].append(row_text(label, devices, clipping, seq, command, out))
    batch = load_config(str(ROOT / f"configs/shapes/{SHAPES[0]}.yaml"), []).train.batch_size
    sigma = load_config(str(ROOT / f"configs/shapes/{SHAPES[0]}.yaml"), []).privacy.noise_multiplier
    q = batch / DATASET
    print(f"Privacy of the stated schedule (every row): q = {batch} / {DATASET:,} = {q:.3g}, sigma = {sigma}, "
          f"{STEPS:,} steps, delta = {DELTA:g}: epsilon = {epsilon(q, sigma, STEPS, DELTA):.3f} (PLD accountant).\n")
    for seq, rows in tables.items():
        print(f"### {seq} tokens per sequence, {batch} sequences per step ({batch * seq / 1e6:.1f}M tokens)\n")
        print("| model | H100s | clipping | fastest layout that fits | peak GiB per rank | DP step s | DP / non-private "
              "| tensor / data GB per rank and step | noise s per rank | DP tokens/s | command |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
