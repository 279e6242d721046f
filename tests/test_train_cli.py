"""``dpdist train`` from the outside: the quick start end to end, and bad input refused before any process starts."""
import json
import subprocess
import sys

import pytest

from dpdist.cli import main

from helpers import ROOT


@pytest.fixture
def small(tmp_path, cache):
    def args(*extra):
        return ["train", "--config", str(ROOT / "configs/default.yaml"), f"data.cache_dir={cache}",
                "data.max_corpus_mb=0.5", "data.vocab_size=512", f"train.run_dir={tmp_path / 'run'}", *extra]
    return args


@pytest.mark.slow
def test_quickstart_command_runs_end_to_end(tmp_path, small):
    """The README's first command (set up, then 2 processes on CPU), shortened to a few steps."""
    result = subprocess.run([sys.executable, str(ROOT / "launcher/quickstart.py"), *small()[3:],
                             "train.steps=4", "train.log_every=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 < summary["epsilon"] < 4.0
    assert "epsilon =" in result.stdout and "validation loss" in result.stdout
    ledger = (run / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 4
    assert (run / "config.yaml").exists() and (run / "final/model.pt").exists()
    assert oct((run / "private/secret").stat().st_mode)[-3:] == "600"
    secret = (run / "private/secret").read_text().strip()
    for public in ("config.yaml", "plan.json", "summary.json", "metrics.jsonl", "ledger.jsonl"):
        assert secret not in (run / public).read_text()


@pytest.mark.slow
def test_tensor_parallel_main_job_saves_the_full_model(tmp_path, small):
    """``parallel.tensor=2``: the main job on a 1 x 2 mesh, and its saved model is full-shape (the
    vocabulary padding stripped), loadable into a single-process model of the same config."""
    import torch
    import yaml

    from dpdist import ModelConfig, build_model

    result = subprocess.run([sys.executable, "-m", "dpdist.cli", *small("parallel.data=1", "parallel.tensor=2",
                                                                       "train.steps=2", "train.log_every=1")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert "1 data x 2 tensor" in result.stdout
    model_cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    single = build_model(ModelConfig(**model_cfg))
    state = torch.load(run / "final/model.pt")
    single.load_state_dict(state)  # strict: every name, every full shape
    assert state["tok_emb.weight"].shape[0] == 512


@pytest.mark.parametrize("extra, message", [
    (["data.path=/nonexistent/corpus.txt"], "data.path"),
    (["privacy.delta=0.5"], "privacy.delta"),
    (["privacy.delta=0.01", "train.batch_size=8"], "allow_large_delta"),
    (["train.batch_size=10000000"], "exceeds the"),
    (["data.seq_len=100"], "max_seq_len"),
    (["privacy.clip_norm=-1"], "clip_norm"),
    (["parallel.tensor=3"], "n_heads"),
])
def test_bad_input_is_refused_before_training(tmp_path, capsys, small, extra, message):
    assert main(small(*extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


def test_empty_corpus_is_refused(tmp_path, capsys, small):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(small(f"data.path={empty}")) == 2
    assert "error:" in capsys.readouterr().err


def test_existing_run_directory_is_never_reused(tmp_path, capsys, small):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ledger.jsonl").write_text("{}\n")
    assert main(small()) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "ledger.jsonl").read_text() == "{}\n"


def test_dry_run_prints_the_torchrun_command(tmp_path, capsys, small):
    assert main(small("--dry-run")) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run --standalone --nproc_per_node=2" in out and "sigma" in out
