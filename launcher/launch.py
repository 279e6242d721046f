"""``python3 launcher/launch.py --config FILE [key=value ...] [--resume auto] [--dry-run]``: set up ``.venv``,
then launch a run the right way for where it is started.

- on one machine: ``torchrun --standalone`` with ``parallel.data x parallel.tensor`` processes;
- on several nodes (``launch.nnodes=N launch.rdzv_endpoint=HOST:PORT``): ``--dry-run`` prepares the run
  once and prints the c10d torchrun command to start on every node;
- inside a Slurm allocation of several nodes: the same, with nodes and rendezvous read from ``SLURM_*``
  (``slurm/dpdist.sbatch`` runs it and ``srun``s the printed command).

The command itself is built by ``dpdist.runtime.launch``; this script is ``dpdist train`` behind the
set-up step, for a machine where nothing is installed yet.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import exec_dpdist  # noqa: E402

if __name__ == "__main__":
    exec_dpdist(["train", *sys.argv[1:]], "launch")
