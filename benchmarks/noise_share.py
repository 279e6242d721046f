"""Noise time per data-parallel rank, at data degree D = 1, 2, 4, in one process.

A rank of D draws 1/D of the model's noise: natively its share of the released coordinates
(``KeyedNoise(secret, rank, D)``, added before the all-reduce), under FSDP the coordinates of the
shard it owns (``ShardNoise`` over FSDP's pieces).  This times what rank 0 of D draws, for the
benchmark GPT (``dpdist bench``'s model with the sizes given), so the 1/D fall is read without the
contention of D processes on a small machine.  Prints seconds per release and the ratio to D = 1.

    python benchmarks/noise_share.py [--layers 8 --d-model 512 --heads 8 --vocab 8000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from dpdist.bench.config import BenchConfig, model_config
from dpdist.model import build_model
from dpdist.privacy.step import KeyedNoise, Released
from dpdist.train.backends.fsdp import Piece, ShardNoise


def rank0_pieces(model, data: int) -> dict:
    """Rank 0's FSDP pieces at data degree ``data``: the first chunk of ceil(n / D) rows of each tensor."""
    pieces = {}
    for p in model.parameters():
        chunk = math.ceil(p.shape[0] / data)
        pieces[p] = Piece(0, 0, min(chunk, p.shape[0]), chunk)
    return pieces


def seconds(draw, rounds: int) -> float:
    times = []
    for release in range(rounds):
        start = time.perf_counter()
        draw(release)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = BenchConfig(layers=args.layers, d_model=args.d_model, heads=args.heads, vocab=args.vocab)
    model = build_model(model_config(cfg))
    params = dict(model.named_parameters())
    released = [Released(name, p) for name, p in params.items()]
    stds = [1.0] * len(released)
    count = sum(p.numel() for p in params.values())
    print(f"benchmark GPT {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}: {count / 1e6:.2f}M "
          f"parameters; torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.rounds}")
    print(f"{'D':>2}  {'native share s':>14}  {'x D=1':>6}  {'fsdp shard s':>12}  {'x D=1':>6}")
    base = None
    for data in (1, 2, 4):
        native = KeyedNoise(1, 0, data)
        sharded = ShardNoise(1, rank0_pieces(model, data))
        whole = [torch.zeros_like(p) for p in params.values()]  # the noise is added in place
        shards = [torch.zeros((sharded.pieces[p].length, *p.shape[1:])) for p in params.values()]

        def native_draw(release):
            native(release, released, whole, stds)

        def sharded_draw(release):
            sharded(release, released, shards, stds)

        times = (seconds(native_draw, args.rounds), seconds(sharded_draw, args.rounds))
        base = base or times
        print(f"{data:>2}  {times[0]:>14.3f}  {times[0] / base[0]:>6.2f}  {times[1]:>12.3f}  {times[1] / base[1]:>6.2f}")


if __name__ == "__main__":
    main()
