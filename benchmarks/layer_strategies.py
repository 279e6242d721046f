"""Per-layer clipping of each linear layer of one block: weight gradient, ghost and stream, layer by layer.

    .venv/bin/python benchmarks/layer_strategies.py [--rounds 15]

For the four linear layers of ``dpdist bench``'s model (B = 32, T = 128, d = 256) this times the plain
weight- and bias-gradient matmuls a non-private step computes, and ``LinearRule.clip_layer`` (what
per-layer clipping calls during the backward) with ``ghost`` and with ``stream``, interleaved round by
round; it prints the median (ms) and what each costs beyond the weight gradient.  It also prints the
rate the blocked ghost norms' extra work runs at, and the cost of a byte of a streamed chunk in flops
at that rate: the number the planner's ``CACHED_FLOPS_PER_BYTE`` stands for.  The layers, batch and
clip function are ``stream_chunks.py``'s, which times the same block's layers together by chunk size.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from dpdist.privacy.rules import linear
from stream_chunks import BATCH, SEQ, SHAPES, layer_clip  # run as a script: benchmarks/ is on sys.path


def main(rounds: int) -> None:
    rule = linear.LinearRule()
    cases = {name: (SimpleNamespace(weight=torch.empty(p, d), bias=torch.empty(p)),
                    torch.randn(BATCH, SEQ, d), torch.randn(BATCH, SEQ, p)) for name, (p, d) in SHAPES.items()}
    times: dict = {}
    for _ in range(rounds):
        for name, (layer, inputs, grads) in cases.items():
            for mode in ("weight gradient", "ghost", "stream"):
                start = time.perf_counter()
                if mode == "weight gradient":
                    grads.reshape(-1, grads.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])
                    grads.sum((0, 1))
                else:
                    recorded = {"linear": {"inputs": inputs, "grad_outputs": grads}}
                    rule.clip_layer(layer, rule.prepare(layer, recorded, mode), layer_clip)
                times.setdefault((name, mode), []).append(time.perf_counter() - start)
    print(f"ms per layer, median of {rounds} interleaved rounds (B = {BATCH}, T = {SEQ})")
    for name, (p, d) in SHAPES.items():
        base, ghost, stream = (statistics.median(times[(name, m)]) for m in ("weight gradient", "ghost", "stream"))
        choices = linear.linear_choices(BATCH, SEQ, p, d, 4, per_layer=True)
        gram_rate = choices["ghost"].flops / (ghost - base)
        per_byte = ((stream - base) * gram_rate - choices["stream"].flops) / choices["stream"].cached_bytes
        print(f"{name:10s} weight gradient {1e3 * base:6.2f}   ghost {1e3 * ghost:6.2f} (+{1e3 * (ghost - base):5.2f})   "
              f"stream {1e3 * stream:6.2f} (+{1e3 * (stream - base):5.2f})   Grams at {gram_rate / 1e9:5.1f} GFLOP/s; "
              f"a streamed byte = {per_byte:4.1f} flops")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    main(parser.parse_args().rounds)
