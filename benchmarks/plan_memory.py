"""docs/plan.md's measured-against-predicted tables: ``dpdist bench --backend``'s memory per rank for
each case against ``dpdist plan --hardware cpu`` for the same model, batch share, backend and
activation checkpointing.

    .venv/bin/python benchmarks/plan_memory.py [--arch gpt llama] [--checkpointing none blocks]

Each (arch, checkpointing) gives one markdown table: every backend at every layout it runs at (the
data-sharding ones at 2 x 1, native and fsdp at 1 x 1 and 1 x 2 too), non-private and DP, each case a
fresh launch (``dpdist.bench.backend.run_case``).  Measured: MB from start, the largest rank's peak RSS
over its RSS before the model is built; predicted: the plan's DP peak, or its non-private peak.
"""
from __future__ import annotations

import argparse
import dataclasses

from tqdm import tqdm

from dpdist.bench.backend import run_case
from dpdist.bench.config import BenchConfig, planned_peak_mb

CASES = [((2, 1), ("native", None)), ((2, 1), ("deepspeed", 1)), ((2, 1), ("deepspeed", 2)), ((2, 1), ("fsdp", None)),
         ((1, 1), ("native", None)), ((1, 1), ("fsdp", None)), ((1, 2), ("native", None)), ((1, 2), ("fsdp", None))]


def label(backend: str, stage) -> str:
    return f"ZeRO-{stage}" if stage else backend


def table(arch: str, checkpointing: str, bar: tqdm) -> str:
    bench = BenchConfig(arch=arch, steps=2)  # the second step holds AdamW's state, as every later one does
    lines = ["| data x tensor | case | measured | predicted | predicted / measured |", "|---|---|---|---|---|"]
    for (data, tensor), (backend, stage) in CASES:
        for private in (False, True):
            bar.set_description(f"{arch} {checkpointing} {data}x{tensor} {label(backend, stage)}")
            measured = run_case(dataclasses.asdict(bench), data=data, tensor=tensor, clipping="flat",
                                backend=backend, stage=stage, private=private,
                                activation_checkpointing=checkpointing)["from_start_mb"]
            predicted = planned_peak_mb(bench, data, tensor, backend, stage, private, checkpointing=checkpointing)
            lines.append(f"| {data} x {tensor} | {label(backend, stage)} {'DP' if private else 'non-private'} | "
                         f"{measured:.0f} | {predicted:.0f} | {predicted / measured:.2f} |")
            bar.update()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["gpt", "llama"], choices=["gpt", "llama"])
    parser.add_argument("--checkpointing", nargs="+", default=["none", "blocks"], choices=["none", "blocks"])
    args = parser.parse_args()
    settings = [(arch, ckpt) for arch in args.arch for ckpt in args.checkpointing]
    tables = []
    with tqdm(total=len(settings) * len(CASES) * 2, unit="launch") as bar:
        for arch, checkpointing in settings:
            tables.append(f"{arch}, activation checkpointing {checkpointing}:\n\n{table(arch, checkpointing, bar)}")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
