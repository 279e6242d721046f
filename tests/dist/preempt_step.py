"""Stand-in for a training step under ``srun`` (stdlib only): checkpoints on SIGUSR2, finishes when restarted.

Usage: preempt_step.py RUN_DIR.  Appends to RUN_DIR/steps.log.  A first run (SLURM_RESTART_COUNT unset or 0)
takes 0.1 s steps until SIGUSR2 arrives, then, at the step boundary as the trainer does, writes
"checkpoint at N" and exits 0; a restarted run reads the checkpoint, finishes at once and writes RUN_DIR/DONE.
"""
import os
import signal
import sys
import time
from pathlib import Path

MAX_STEPS = 900  # 90 s: past the job's 1-minute limit, so a lost signal ends the job in TIMEOUT

run_dir = Path(sys.argv[1])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def log(message: str) -> None:
    with open(run_dir / "steps.log", "a") as out:
        out.write(f"{time.time():.3f} job={os.environ['SLURM_JOB_ID']} restart={restart} {message}\n")


if restart:
    checkpoints = [line for line in (run_dir / "steps.log").read_text().splitlines() if "checkpoint at" in line]
    log(f"resumed from {checkpoints[-1].rsplit(' ', 1)[-1]}; done")
    (run_dir / "DONE").touch()
    sys.exit(0)

stop = False


def request_stop(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGUSR2, request_stop)
log("started")
step = 0
while not stop and step < MAX_STEPS:
    time.sleep(0.1)
    step += 1
log(f"checkpoint at {step}" if stop else f"no signal after {step} steps")
sys.exit(0 if stop else 1)
