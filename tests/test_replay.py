"""A step computed twice is two releases: fresh sample and noise, charged twice, within the budget.

- The rewind attack (issue 13): rewind to ``step-1`` with only ``train.lr`` changed.  Keyed by the
  step, both releases of a replayed step carried the same noise and their difference was the
  noise-free difference of two clipped sums; keyed by the release index it is the difference of two
  independent noise draws, of norm about sigma C sqrt(2d).
- A rewind is explicit: refused (exit 2, one line, nothing on disk changed) while newer checkpoints
  exist; ``--rewind`` moves them to ``abandoned/``, so ``--resume auto`` never takes one of them.
- A crash between two checkpoints, then ``--resume auto``: the ledger holds every release made.
- ``privacy.max_epsilon`` holds against the ledger after rewinds, not only against the planned steps.
(Exact resume from the latest checkpoint after a clean stop: ``runs.assert_resume_is_exact``, below.)
"""
import json
import math
import shutil
from pathlib import Path

import torch

from dpdist.cli import main
from dpdist.config import load_config
from dpdist.eval.weights import load_model
from dpdist.privacy import accounting
from dpdist.privacy.ledger import PrivacyLedger
from dpdist.train import checkpoint
from dpdist.train.plan import RunPlan

from helpers.runs import assert_resume_is_exact, prepared, train_in_process

SGD = ("train.optimizer=sgd", "train.checkpoint_every=1", "train.keep_checkpoints=20")


def _run(cache, run_dir, steps, *extra) -> Path:
    run_dir = prepared(cache, run_dir, 1, 1, "float64", *SGD, f"train.steps={steps}", *extra)
    train_in_process(run_dir)
    return run_dir


def _weights(run_dir: Path, folder: Path) -> torch.Tensor:
    model = load_model(load_config(run_dir / "config.yaml"), folder, torch.device("cpu"))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _cli(*args) -> int:
    return main(["train", *map(str, args)])


def _releases(run_dir: Path) -> list[tuple[int, int]]:
    return [(e["step"], e["release"]) for e in PrivacyLedger(run_dir / "ledger.jsonl").entries()]


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_a_rewound_step_draws_fresh_noise(tmp_path, cache, capsys):
    run = _run(cache, tmp_path / "run", 3, "train.lr=0.5")
    plan = RunPlan.load(run / "plan.json")
    steps = {k: checkpoint.step_folder(run, k) for k in (1, 2, 3)}
    first = {k: _weights(run, folder) for k, folder in steps.items()}

    before, _ = _tree(run), capsys.readouterr()
    assert _cli("--config", run / "config.yaml", "--resume", steps[1], "train.lr=0.25") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rewind" in err and "step-00000003" in err
    assert _tree(run) == before  # refused before anything on disk changed

    assert _cli("--config", run / "config.yaml", "--resume", steps[1], "--rewind", "train.lr=0.25") == 0
    abandoned = list((run / checkpoint.ABANDONED).glob("*/step-00000003"))
    assert len(abandoned) == 1 and (abandoned[0].parent / "step-00000002").is_dir()
    second = {k: _weights(run, steps[k]) for k in (1, 2, 3)}
    assert torch.equal(first[1], second[1])

    # SGD without momentum: the release of step k is (w_k - w_{k+1}) qN / lr
    noise_scale = plan.noise_multiplier * 1.0 * math.sqrt(2 * first[1].numel())  # clip_norm 1.0
    for k in (1, 2):
        released_a = (first[k] - first[k + 1]) * plan.expected_batch_size / 0.5
        released_b = (second[k] - second[k + 1]) * plan.expected_batch_size / 0.25
        ratio = float((released_a - released_b).norm()) / noise_scale
        assert 0.8 < ratio < 1.2, f"step {k}: the two releases differ by {ratio:.3g} sigma C sqrt(2d)"
    assert _releases(run) == [(0, 0), (1, 1), (2, 2), (1, 3), (2, 4)]
    assert checkpoint.latest_checkpoint(run) == steps[3]
    assert json.loads((steps[3] / checkpoint.PRIVACY_FILE).read_text())["ledger_entries"] == 5


def test_rewind_needs_an_older_checkpoint(tmp_path, cache, capsys):
    run = _run(cache, tmp_path / "run", 2)
    before, _ = _tree(run), capsys.readouterr()
    assert _cli("--config", run / "config.yaml", "--resume", "auto", "--rewind") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to rewind" in err
    assert _tree(run) == before


def test_crash_between_checkpoints_charges_every_release(tmp_path, cache, capsys):
    run = _run(cache, tmp_path / "run", 4, "train.steps=4")
    # a crash after step 3's release and before its checkpoint was committed
    shutil.rmtree(checkpoint.step_folder(run, 4))
    shutil.rmtree(checkpoint.step_folder(run, 3))
    assert _cli("--config", run / "config.yaml", "--resume", "auto") == 0
    assert _releases(run) == [(0, 0), (1, 1), (2, 2), (3, 3), (2, 4), (3, 5)]
    plan = RunPlan.load(run / "plan.json")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon"] == accounting.epsilon(plan.sample_rate, plan.noise_multiplier, 6, plan.delta)
    assert summary["epsilon"] > accounting.epsilon(plan.sample_rate, plan.noise_multiplier, 4, plan.delta)


def test_max_epsilon_holds_against_the_ledger_after_rewinds(tmp_path, cache, capsys):
    probe = prepared(cache, tmp_path / "probe", 1, 1, "float64")
    plan = RunPlan.load(probe / "plan.json")
    budget = accounting.epsilon(plan.sample_rate, plan.noise_multiplier, 6, plan.delta) * (1 + 1e-9)
    run = _run(cache, tmp_path / "run", 4, f"privacy.max_epsilon={budget}")
    assert RunPlan.load(run / "plan.json").max_steps == 4  # the budget does not bind a run without replays
    assert _cli("--config", run / "config.yaml", "--resume", checkpoint.step_folder(run, 2), "--rewind") == 0
    assert [r for _, r in _releases(run)] == list(range(6))
    assert _cli("--config", run / "config.yaml", "--resume", checkpoint.step_folder(run, 1), "--rewind") == 0
    captured = capsys.readouterr()
    assert "privacy budget reached" in captured.err and "stopped: privacy budget reached" in captured.out
    ledger = PrivacyLedger(run / "ledger.jsonl")
    assert ledger.num_steps == 6 and ledger.epsilon(plan.delta) <= budget
    summary = json.loads((run / "summary.json").read_text())
    assert summary["budget_stopped"] and summary["steps"] == 1


def test_resume_from_the_latest_checkpoint_is_exact(tmp_path, cache):
    assert_resume_is_exact(tmp_path, cache)
