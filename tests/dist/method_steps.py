"""Noisy LSG or ANADP steps of a tiny float64 GPT at tensor degree WORLD_SIZE; rank 0 writes the full
parameters.

Usage (under torchrun): method_steps.py OUT.json lsg|anadp.  The tests compare OUT with
``helpers.method_steps.train_tiny`` run in one process.
"""
import json
import os
import sys

from dpdist.config import ParallelConfig
from dpdist.runtime.mesh import init_mesh, shutdown
from helpers.method_steps import train_tiny

if __name__ == "__main__":
    mesh = init_mesh(ParallelConfig(data=1, tensor=int(os.environ["WORLD_SIZE"])))
    try:
        params = train_tiny(mesh, sys.argv[2])
        if mesh.rank == 0:
            with open(sys.argv[1], "w") as handle:
                json.dump({k: v.tolist() for k, v in params.items()}, handle)
    finally:
        shutdown(mesh)
