"""Peak memory of loading a Hugging Face folder with ``dpdist.load_pretrained`` at tensor 1 and tensor 2.

    .venv/bin/python benchmarks/load_memory.py [--folder DIR] [--d-model 512 --layers 8]

Writes a random Llama (about 58M parameters, float32, grouped-query, untied; dpdist's own export) to
DIR (default: a temporary folder), then loads it in fresh processes: one at tensor 1, two gloo
processes at tensor 2.  Each process prints its peak resident memory (``VmHWM``) and how much of
it the load added over the process after its imports and process-group start.  Building on the meta
device (no weight drawn), reading only this rank's slices, at most ``dpdist.model.hf.READ_BYTES`` at a
time, should make a load add this rank's parameters and a small fixed overhead, so about half as much
at tensor 2 as at tensor 1 for a model much larger than the overhead.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHAPE = dict(arch="llama", vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, mlp_hidden=1536,
             max_seq_len=1024, tie_embeddings=False, norm="rmsnorm", bias=False, dtype="float32")


def status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process.  Not ``ru_maxrss``: Linux carries
    that over from the parent through fork and exec, so a worker would report the writer's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_folder(folder: Path, d_model: int, layers: int) -> int:
    from dpdist import ModelConfig, build_model
    from dpdist.model.hf import save_pretrained

    cfg = ModelConfig(**{**SHAPE, "d_model": d_model, "n_layers": layers, "mlp_hidden": 3 * d_model})
    model = build_model(cfg)
    save_pretrained({n: p.detach() for n, p in model.named_parameters()}, cfg, folder)
    return sum(p.numel() for p in model.parameters())


def worker(folder: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    from dpdist import load_pretrained

    group = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.new_group(list(range(world)))
    before = status_mib("VmRSS")
    model = load_pretrained(folder, dtype=torch.float32, tp_group=group)
    local = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak = status_mib("VmHWM")
    print(f"tensor {world} rank {rank}: peak RSS {peak:.0f} MiB, load added {peak - before:.0f} MiB "
          f"(after imports {before:.0f} MiB; this rank's parameters {local:.0f} MiB)", flush=True)
    if world > 1:
        dist.destroy_process_group()


def launch(folder: Path, world: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(folder), str(rank), str(world)], env=env)
             for rank in range(world)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a tensor-{world} worker failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where to write the random model (default: a temporary folder)")
    parser.add_argument("--d-model", type=int, default=SHAPE["d_model"], help="width (MLP 3x); default %(default)s")
    parser.add_argument("--layers", type=int, default=SHAPE["n_layers"], help="blocks; default %(default)s")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        count = write_folder(folder, args.d_model, args.layers)
        size = (folder / "model.safetensors").stat().st_size / 2**20
        print(f"random Llama: {count / 1e6:.1f}M parameters, model.safetensors {size:.0f} MiB")
        for world in (1, 2):
            launch(folder, world)


if __name__ == "__main__":
    main()
