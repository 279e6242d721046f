"""Imported Hugging Face models at one tensor degree; rank 0 saves what tests/test_hf_parallel.py compares.

Usage (under torchrun): hf_parallel.py OUT TENSOR FOLDER...  Writes OUT: {folder: (logits, parameters
after one noisy step)}, at full shape without vocabulary padding.
"""
import sys
from pathlib import Path

import torch

from dpdist.config import ParallelConfig
from dpdist.runtime.mesh import init_mesh, shutdown
from helpers.hf_steps import logits_and_noisy_step

if __name__ == "__main__":
    out, tensor_degree, folders = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    mesh = init_mesh(ParallelConfig(tensor=tensor_degree))
    results = {folder: logits_and_noisy_step(Path(folder), mesh.tp_group) for folder in folders}
    if mesh.rank == 0:
        torch.save(results, out)
    shutdown(mesh)
