"""Launching: the torchrun command for one machine, several nodes and a Slurm job; a stop signal
checkpoints and a resume finishes the run; a killed worker is restarted and resumes (issue 4)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpdist.cli import main
from dpdist.config import ConfigError, load_config
from dpdist.privacy.ledger import PrivacyLedger
from dpdist.runtime.launch import torchrun_command
from dpdist.train import checkpoint

from helpers import ROOT


def config(*overrides):
    return load_config(ROOT / "configs/default.yaml", list(overrides))


def test_one_machine_uses_a_standalone_rendezvous():
    command = torchrun_command(config(), Path("run"), "auto", env={})
    assert "--standalone" in command and "--nproc_per_node=2" in command
    assert command[-3:] == ["run", "--resume", "auto"]
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2" in command and "--max-restarts=0" in command


def test_several_nodes_share_a_c10d_rendezvous():
    cfg = config("parallel.data=4", "launch.nnodes=2", "launch.rdzv_endpoint=head:29400", "launch.max_restarts=3")
    command = torchrun_command(cfg, Path("run"), "auto", env={})
    for arg in ("--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=head:29400", "--nproc_per_node=2",
                "--max-restarts=3"):
        assert arg in command
    assert "--standalone" not in command


def test_inside_slurm_the_allocation_decides():
    env = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29600"}
    command = torchrun_command(config("parallel.data=4"), Path("run"), "auto", env=env)
    for arg in ("--nnodes=2", "--rdzv_endpoint=127.0.0.1:29600", "--rdzv_id=77", "--nproc_per_node=2"):
        assert arg in command
    with pytest.raises(ConfigError, match="do not split evenly over 2 nodes"):
        torchrun_command(config("parallel.data=3"), Path("run"), "auto", env=env)


def test_a_taken_rendezvous_port_is_refused():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config("launch.nnodes=2", f"launch.rdzv_endpoint=127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            torchrun_command(cfg, Path("run"), "auto", env={})
    torchrun_command(cfg, Path("run"), "auto", env={})  # free again


@pytest.mark.parametrize("overrides, message", [
    (["launch.nnodes=2"], "launch.rdzv_endpoint"),
    (["launch.nnodes=2", "launch.rdzv_endpoint=head"], "HOST:PORT"),
    (["launch.nnodes=3", "launch.rdzv_endpoint=head:1"], "split evenly"),
    (["launch.max_restarts=-1"], "max_restarts"),
])
def test_bad_launch_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_a_multi_node_job_must_be_prepared_with_dry_run(tmp_path, capsys):
    args = ["train", "--config", str(ROOT / "configs/default.yaml"), "launch.nnodes=2", "launch.rdzv_endpoint=head:1",
            f"train.run_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def train_args(cache, run_dir, *extra):
    return [sys.executable, "-m", "dpdist.cli", "train", "--config", str(ROOT / "configs/default.yaml"),
            f"data.cache_dir={cache}", "data.max_corpus_mb=0.5", "data.vocab_size=512", "data.seq_len=32",
            "model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "train.batch_size=16",
            "train.micro_batch_size=8", "train.checkpoint_every=2", "train.progress=false",
            "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "privacy.allow_large_delta=true",
            f"train.run_dir={run_dir}", *extra]


def wait_for(predicate, timeout: float, what: str, process=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def steps_in_ledger(run_dir: Path) -> list[int]:
    return [e["step"] for e in PrivacyLedger(run_dir / "ledger.jsonl").entries()]


@pytest.mark.slow
def test_stop_signal_checkpoints_and_resume_finishes(tmp_path, cache):
    run_dir, steps = tmp_path / "run", 40
    proc = subprocess.Popen(train_args(cache, run_dir, f"train.steps={steps}"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: checkpoint.latest_checkpoint(run_dir) is not None, 180, "the first checkpoint", proc)
        proc.send_signal(signal.SIGTERM)  # what a scheduler sends the process it started
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by a signal after step" in out, out[-4000:]
    stopped = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert 2 <= stopped < steps and not (run_dir / "DONE").exists()
    assert checkpoint.latest_checkpoint(run_dir).name == f"step-{stopped:08d}"
    assert steps_in_ledger(run_dir) == list(range(stopped))  # every computed step, none twice
    resumed = subprocess.run(train_args(cache, run_dir, f"train.steps={steps}") + ["--resume", "auto"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {checkpoint.step_folder(run_dir, stopped)}" in resumed.stdout
    assert steps_in_ledger(run_dir) == list(range(steps)) and (run_dir / "DONE").exists()

    # The secret came from OS entropy; the resumed workers must all have used the saved one.  An
    # uninterrupted run handed the same secret (a run directory that holds only it) ends identically.
    reference = tmp_path / "reference"
    (reference / "private").mkdir(parents=True)
    shutil.copy(run_dir / "private" / "secret", reference / "private" / "secret")
    whole = subprocess.run(train_args(cache, reference, f"train.steps={steps}") + ["--resume", "auto"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    a, b = torch.load(reference / "final" / "model.pt"), torch.load(run_dir / "final" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def worker_pids(run_dir: Path) -> list[int]:
    """Training processes of this run (torchrun's workers, not the agent, whose arguments name them too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if "dpdist.train.worker" in text and str(run_dir) in text and "torch.distributed.run" not in text:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_killed_worker_is_restarted_and_every_step_is_counted(tmp_path, cache):
    run_dir, steps = tmp_path / "run", 30
    proc = subprocess.Popen(train_args(cache, run_dir, f"train.steps={steps}", "launch.max_restarts=1"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: checkpoint.latest_checkpoint(run_dir) is not None and len(worker_pids(run_dir)) == 2, 180,
                 "the first checkpoint", proc)
        os.kill(worker_pids(run_dir)[0], signal.SIGKILL)
        before_restart = steps_in_ledger(run_dir)  # what had been released when the rank died
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert (run_dir / "DONE").exists()
    ledger = steps_in_ledger(run_dir)
    assert ledger[:len(before_restart)] == before_restart  # nothing released before the failure was dropped
    assert sorted(set(ledger)) == list(range(steps))  # every step, the replayed ones (if any) counted again
    restarts = [i for i in range(1, len(ledger)) if ledger[i] <= ledger[i - 1]]
    assert len(restarts) <= 1 and all(ledger[i] % 2 == 0 for i in restarts)  # resumed at a checkpoint (every 2 steps)
