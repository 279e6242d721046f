"""Sharded checkpoints: exact resume, resume at another layout, and refusals (issue 4).

- Exact resume, noise on: K steps, checkpoint, a new ``train`` call resumed from it to N, against N
  steps in one go: bit-identical parameters and the same ledger, at (data, tensor) = (2, 1) and (1, 2).
- Reshard: a checkpoint saved at (2, 2) continued at (1, 4) and at (4, 1) ends where an uninterrupted
  single-process run ends (float64, relative 1e-10), padded vocabulary included (vocab 509 pads to 510
  at tensor 2 and 512 at tensor 4).
- Refusals with a message that says what to do: a truncated or altered shard file, a checkpoint whose
  privacy-relevant config differs, a different model; a partial folder left by a crash is never taken
  for the latest checkpoint.
"""
import json
import shutil
import sys

import pytest
import torch

from dpdist.cli import main
from dpdist.config import dump_config, load_config
from dpdist.runtime.mesh import Mesh
from dpdist.train import checkpoint
from dpdist.train.backends import backend_for
from dpdist.train.loop import make_optimizer

from helpers import DIST, ROOT
from helpers.compare import assert_close_at_scale
from helpers.launch import child_env, torchrun
from helpers.runs import K, assert_launched_resume_is_exact, final_model, ledger, overrides, prepared, train_in_process
from helpers.save_loop import PLAN, model_at


@pytest.mark.slow
@pytest.mark.parametrize("data, tensor", [(2, 1), (1, 2)], ids=lambda v: str(v))
def test_exact_resume(tmp_path, cache, data, tensor):
    split = assert_launched_resume_is_exact(tmp_path, cache, data, tensor)
    summary = json.loads((split / "summary.json").read_text()) if (split / "summary.json").exists() else None
    assert [p.name for p in checkpoint.complete_checkpoints(split)] == ["step-00000003", "step-00000006"]
    assert summary is None or summary.get("resumed_from", "").endswith("step-00000003")


@pytest.mark.slow
def test_reshard_resume(tmp_path, cache):
    saved = prepared(cache, tmp_path / "saved", 2, 2, "float64")
    torchrun("resume_steps.py", 4, "save", saved, K)
    assert checkpoint.latest_checkpoint(saved).name == "step-00000003"
    reference_dir = prepared(cache, tmp_path / "reference", 1, 1, "float64")
    train_in_process(reference_dir)
    reference = final_model(reference_dir)
    for data, tensor in [(1, 4), (4, 1)]:
        moved = tmp_path / f"moved-{data}x{tensor}"
        shutil.copytree(saved, moved)
        cfg = load_config(moved / "config.yaml")
        cfg.parallel.data, cfg.parallel.tensor, cfg.train.run_dir = data, tensor, str(moved)
        dump_config(cfg, moved / "config.yaml")
        torchrun("resume_steps.py", data * tensor, "continue", moved)
        assert_close_at_scale(final_model(moved), reference, what=f"({data},{tensor}) ")
        assert ledger(moved) == ledger(reference_dir)


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, cache):
    """A single-process run with checkpoints at steps 3 and 6."""
    run_dir = prepared(cache, tmp_path_factory.mktemp("one") / "run")
    train_in_process(run_dir)
    return run_dir


def test_damaged_shards_are_refused(tmp_path, one_checkpoint):
    source = checkpoint.latest_checkpoint(one_checkpoint)
    shard = next(f.name for f in source.iterdir() if f.suffix == ".distcp")
    truncated = shutil.copytree(source, tmp_path / "truncated")
    with open(truncated / shard, "r+b") as handle:
        handle.truncate((truncated / shard).stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.read_record(truncated)
    altered = shutil.copytree(source, tmp_path / "altered")
    data = bytearray((altered / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (altered / shard).write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.read_record(altered)
    checkpoint.read_record(source)  # the original is intact


def test_partial_folder_is_not_a_checkpoint(tmp_path, one_checkpoint):
    run = shutil.copytree(one_checkpoint, tmp_path / "run")
    latest = checkpoint.latest_checkpoint(run)
    crashed = run / "checkpoints" / ("step-00000009" + checkpoint.PARTIAL)  # what a crash mid-save leaves
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"half a shard")
    assert checkpoint.latest_checkpoint(run) == latest


@pytest.mark.parametrize("change, message", [
    ("privacy.clip_norm=2.0", "clip_norm"),
    ("privacy.noise_multiplier=2.0", "noise_multiplier"),
    ("model.d_model=64", "different model"),
    ("reattention.enabled=true", "reattention.enabled: checkpoint False, run True"),
    ("lora.enabled=true", "lora.enabled: checkpoint False, run True"),
])
def test_resume_refuses_a_changed_run(tmp_path, capsys, cache, one_checkpoint, change, message):
    run = shutil.copytree(one_checkpoint, tmp_path / "run")
    before = sorted(p.name for p in checkpoint.complete_checkpoints(run))
    args = ["train", "--config", str(ROOT / "configs/default.yaml"), *overrides(cache, run), change, "--resume", "auto"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert sorted(p.name for p in checkpoint.complete_checkpoints(run)) == before  # nothing deleted


def test_resume_needs_a_run_directory_and_a_real_checkpoint(tmp_path, capsys, cache):
    args = ["train", "--config", str(ROOT / "configs/default.yaml"), f"data.cache_dir={cache}"]
    assert main([*args, "--resume", "auto"]) == 2
    assert "needs train.run_dir" in capsys.readouterr().err
    assert main([*args, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13])
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path, delay):
    """A process committing checkpoints back to back (about 30 MB each) is killed with SIGKILL at an
    arbitrary moment, almost surely inside a save or a removal: the latest complete checkpoint is
    intact and loads, with the parameters of its step."""
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(DIST / "save_loop.py"), str(run_dir)], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    try:
        for _ in range(3):
            line = proc.stdout.readline()
            assert line.startswith("committed"), line
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    latest = checkpoint.latest_checkpoint(run_dir)
    record = checkpoint.read_record(latest)  # every file present and matching its checksum
    step = record["next_step"]
    cfg, model = model_at(0)
    optimizer = make_optimizer(cfg, model)
    checkpoint.load_checkpoint(latest, model, optimizer, cfg, PLAN, Mesh(), backend_for(cfg))
    _, expected = model_at(step)
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(got, want), f"{name} is not the step-{step} value"


@pytest.mark.parametrize("damage", ["drop the last line", "change a noise multiplier"])
def test_resume_refuses_a_ledger_that_lost_or_changed_releases(tmp_path, one_checkpoint, damage):
    run = shutil.copytree(one_checkpoint, tmp_path / "run")
    lines = (run / "ledger.jsonl").read_text().splitlines()
    assert (checkpoint.latest_checkpoint(run) / checkpoint.LEDGER).read_text().splitlines() == lines
    if damage == "drop the last line":
        lines = lines[:-1]
    else:
        entry = json.loads(lines[0])
        lines[0] = json.dumps({**entry, "noise_multiplier": entry["noise_multiplier"] * 2})
    (run / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(checkpoint.CheckpointError, match="under-counted"):
        train_in_process(run, resume="auto")
