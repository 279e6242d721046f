"""Batch-script patterns of docs/distributed.md 4.2 on a real loopback Slurm (fixture in slurm_cluster.py).

A 2-node step really runs on both emulated nodes, and the preemption cycle works end to end: the time-limit
warning signal reaches the step, which checkpoints and exits 0; the batch shell requeues the job itself;
the job comes back under the same id with SLURM_RESTART_COUNT=1, finishes and ends COMPLETED.  Then the
project's own template, slurm/dpdist.sbatch, goes through the same cycle with a real dpdist run.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import DIST, ROOT
from helpers.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

STEP = DIST / "preempt_step.py"

# slurmctld checks time limits every 30 s and sends --signal=SIG@T at the first check with at most T + 30 s
# left (measured on 22.05), i.e. 10-40 s into a 1-minute job at T=20: late enough that the step has started
# and installed its handler (a signal to the steps reaches only steps that exist), early enough to leave
# 20 s before the limit.  In this module the first check comes about 26 s into the job.
PREEMPT_JOB = f"""#!/bin/bash
#SBATCH --time=1
#SBATCH --signal=USR2@20
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=job.out
echo "batch run ${{SLURM_RESTART_COUNT:-0}} of job $SLURM_JOB_ID"
srun --ntasks=1 {sys.executable} {STEP} "$PWD"
rc=$?
[ -f DONE ] || scontrol requeue "$SLURM_JOB_ID"
exit $rc
"""

TWO_NODE_JOB = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1
#SBATCH --time=1
#SBATCH --output=job.out
srun bash -c 'echo "node=$SLURM_NODEID name=$SLURMD_NODENAME host=$(hostname) rank=$SLURM_PROCID"'
"""


def write_job(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    return script


@pytest.mark.slow
def test_step_runs_on_both_nodes(slurm_cluster, tmp_path):
    start = time.monotonic()
    job = slurm_cluster.sbatch(write_job(tmp_path, TWO_NODE_JOB))
    info = slurm_cluster.wait_for(job, "COMPLETED", timeout=60)
    lines = sorted((tmp_path / "job.out").read_text().split("\n"))
    ran = {dict(field.split("=") for field in line.split())["node"]: line for line in lines if line}
    assert sorted(ran) == ["0", "1"], lines
    assert "name=n1" in ran["0"] and "name=n2" in ran["1"], lines
    assert info["NumNodes"] == "2" and info["ExitCode"] == "0:0", info
    print(f"\n[slurm] 2-node job {job}: {time.monotonic() - start:.1f} s")


@pytest.mark.slow
def test_signal_checkpoint_requeue_resume(slurm_cluster, tmp_path):
    start = time.monotonic()
    job = slurm_cluster.sbatch(write_job(tmp_path, PREEMPT_JOB))
    slurm_cluster.wait_for(job, "RUNNING", timeout=30)
    pending = slurm_cluster.wait_for(job, "PENDING", timeout=100)  # signalled, checkpointed, requeued
    requeued_at = time.monotonic()
    assert pending["Restarts"] == "1", pending
    final = slurm_cluster.wait_for(job, "COMPLETED", timeout=60)
    resumed_at = time.monotonic()

    log = (tmp_path / "steps.log").read_text()
    first = [line.split(" ", 1)[1] for line in log.splitlines() if "restart=0" in line]
    second = [line.split(" ", 1)[1] for line in log.splitlines() if "restart=1" in line]
    assert len(first) == 2 and len(second) == 1, log
    assert first[0] == f"job={job} restart=0 started", log
    assert first[1].startswith(f"job={job} restart=0 checkpoint at "), log
    assert second[0] == f"job={job} restart=1 resumed from {first[1].rsplit(' ', 1)[1]}; done", log
    assert (tmp_path / "DONE").exists()
    out = (tmp_path / "job.out").read_text()
    assert f"batch run 0 of job {job}" in out and f"batch run 1 of job {job}" in out, out
    assert final["JobId"] == job and final["Restarts"] == "1" and final["ExitCode"] == "0:0", final

    stamps = [float(line.split(" ", 1)[0]) for line in log.splitlines()]
    print(f"\n[slurm] preemption job {job}: signal {stamps[1] - stamps[0]:.1f} s after the step started; "
          f"requeued with EligibleTime={pending['EligibleTime']}; run 2 {stamps[2] - stamps[1]:.1f} s after the "
          f"checkpoint; COMPLETED {resumed_at - requeued_at:.1f} s after requeue; "
          f"total {time.monotonic() - start:.1f} s")


TEMPLATE = ROOT / "slurm" / "dpdist.sbatch"
DPDIST = Path(sys.executable).parent / "dpdist"


def run_overrides(cache: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"data.cache_dir={cache}", "data.max_corpus_mb=0.5", "data.vocab_size=512", "data.seq_len=32",
            "model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "train.batch_size=16",
            "train.micro_batch_size=8", "train.checkpoint_every=5", "train.progress=false", "privacy.seed=3",
            "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "privacy.allow_large_delta=true",
            f"train.steps={steps}", "parallel.data=2", f"train.run_dir={run_dir}"]


@pytest.mark.slow
def test_template_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """``slurm/dpdist.sbatch`` on two emulated nodes (one torchrun agent each, c10d rendezvous): the
    stop signal Slurm delivers to the job steps makes the run checkpoint, the script requeues the job,
    the requeued job resumes by itself and finishes with the parameters and ledger of an uninterrupted
    2-process run.  (``scancel --signal`` delivers the signal at a known moment; the time-limit
    ``--signal`` delivery itself is tested above.)"""
    import socket

    import torch

    from dpdist.privacy.ledger import PrivacyLedger
    from dpdist.train.checkpoint import latest_checkpoint

    config, cache, steps = ROOT / "configs" / "default.yaml", tmp_path / "cache", 60
    reference = tmp_path / "reference"
    done = subprocess.run([str(DPDIST), "train", "--config", str(config), *run_overrides(cache, reference, steps)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    run_dir = tmp_path / "slurm-run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(slurm_cluster.env, CONFIG=str(config), RUN_DIR=str(run_dir), DPDIST=str(DPDIST),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    overrides = [o for o in run_overrides(cache, run_dir, steps) if not o.startswith("train.run_dir")]
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--time=30", f"--chdir={tmp_path}",
                                f"--output={tmp_path / 'job.out'}", str(TEMPLATE), *overrides],
                               env=env, capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while latest_checkpoint(run_dir) is None:
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
        assert slurm_cluster.job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (tmp_path / "job.out").read_text()
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    final = slurm_cluster.wait_for(job, "COMPLETED", timeout=300)
    out = (tmp_path / "job.out").read_text()
    assert int(final["Restarts"]) >= 1 and "requeueing job" in out and "resuming from" in out, out
    assert (run_dir / "DONE").exists()
    steps_logged = [e["step"] for e in PrivacyLedger(run_dir / "ledger.jsonl").entries()]
    assert steps_logged == list(range(steps)), steps_logged  # a clean stop: every step once
    a, b = torch.load(reference / "final" / "model.pt"), torch.load(run_dir / "final" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
