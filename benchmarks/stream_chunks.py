"""Per-layer clipping of one Transformer block's linear layers: ghost against streamed, by chunk size.

    .venv/bin/python benchmarks/stream_chunks.py [--rounds 15]

Runs ``LinearRule.clip_layer`` (what per-layer clipping calls during the backward) on recorded tensors
of the four linear layers of one block of ``dpdist bench``'s model (B = 32, T = 128, d = 256), with
``ghost`` and with ``stream`` at several chunk sizes (``LinearRule(chunk_bytes=...)``, and with the
chunk summed by one matrix-vector product instead of example by example), next to the plain
weight-gradient matmuls that a non-private step computes instead.  The modes alternate round by
round so that a slow patch of the machine hits all of them; the median and the fastest round are
printed (ms per block).
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from dpdist.privacy.rules import linear

BATCH, SEQ, D_MODEL = 32, 128, 256
SHAPES = {"attn.qkv": (3 * D_MODEL, D_MODEL), "attn.proj": (D_MODEL, D_MODEL),
          "mlp.fc": (4 * D_MODEL, D_MODEL), "mlp.proj": (D_MODEL, 4 * D_MODEL)}
CHUNKS_KIB = (256, 512, 1024, 2048, 4096)


def layer_clip(sq_norms: dict) -> torch.Tensor:
    """Per-layer clip factors at threshold 1 from the layer's squared-norm contributions."""
    return (1.0 / (sum(sq_norms.values()).sqrt() + 1e-6)).clamp(max=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    recorded = {name: (torch.randn(BATCH, SEQ, p), torch.randn(BATCH, SEQ, d)) for name, (p, d) in SHAPES.items()}

    def weight_gradients():
        for grad_outputs, inputs in recorded.values():
            grad_outputs.reshape(-1, grad_outputs.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])

    def matrix_vector_sum(total, per_example, weights):  # the alternative accumulate_examples replaced
        total += linear.weighted_example_sum(per_example, weights)

    def clip_all(strategy: str, chunk_bytes: int | None = None, accumulate=linear.accumulate_examples):
        rule = linear.LinearRule(chunk_bytes, accumulate)

        def run():
            for (p, d), (grad_outputs, inputs) in zip(SHAPES.values(), recorded.values()):
                layer = SimpleNamespace(weight=torch.empty(p, d), bias=None)
                state = {"grad_outputs": grad_outputs, "inputs": inputs, "bias": None, "strategy": strategy}
                rule.clip_layer(layer, state, layer_clip)
        return run

    modes = {"weight gradients only (non-private)": weight_gradients, "ghost": clip_all("ghost"),
             **{f"stream, {kib} KiB chunks": clip_all("stream", kib * 1024) for kib in CHUNKS_KIB},
             "stream, default chunks, matrix-vector sum": clip_all("stream", accumulate=matrix_vector_sum)}
    times = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"one block's linear layers {dict(SHAPES)}, B = {BATCH}, T = {SEQ}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; default chunk {linear.STREAM_CHUNK_BYTES // 1024} KiB")
    for name, ts in times.items():
        print(f"{name:42s} median {statistics.median(ts) * 1e3:7.1f} ms   fastest {min(ts) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
