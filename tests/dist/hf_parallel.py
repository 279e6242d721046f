"""Imported Hugging Face models at one tensor degree; rank 0 saves what tests/test_hf_parallel.py compares.

Usage (under torchrun): hf_parallel.py OUT TENSOR FOLDER...  Writes OUT: {folder: (logits, parameters
after one noisy step)}, at full shape without vocabulary padding; fails if reading each rank's slices a
few rows at a time gives another shard than reading them whole.
"""
import sys
from pathlib import Path

import torch

from dpdist import load_pretrained
from dpdist.config import ParallelConfig
from dpdist.model import hf
from dpdist.runtime.mesh import init_mesh, shutdown
from helpers.hf_steps import logits_and_noisy_step

if __name__ == "__main__":
    out, tensor_degree, folders = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    mesh = init_mesh(ParallelConfig(tensor=tensor_degree))
    results = {folder: logits_and_noisy_step(Path(folder), mesh.tp_group) for folder in folders}
    for folder in folders:  # this rank's slices read a few rows at a time: the same shard as in one read
        whole = load_pretrained(folder, tp_group=mesh.tp_group)
        default, hf.READ_BYTES = hf.READ_BYTES, 3 * 8 * 32
        pieces = load_pretrained(folder, tp_group=mesh.tp_group)
        hf.READ_BYTES = default
        for (name, a), (_, b) in zip(whole.named_parameters(), pieces.named_parameters(), strict=True):
            assert torch.equal(a, b), f"{folder}: {name} differs when read in pieces"
    if mesh.rank == 0:
        torch.save(results, out)
    shutdown(mesh)
