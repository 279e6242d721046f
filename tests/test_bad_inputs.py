"""Bad input, typed as a new user would, gets exit code 2 and one ``error:`` line: never a traceback,
and nothing is written under the run directory.

Every train case is a ``--dry-run`` (so the code before this file, which accepted some of them, only
prepared a run directory instead of training); the data cache is shared by the module.
"""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dpdist.cli import main
from dpdist.privacy import accounting

from helpers import ROOT
from helpers.runs import overrides

ACCOUNT = ["account", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad corpora, a tokenizer that is not one, a config that is not a mapping, a folder that is not a checkpoint."""
    root = tmp_path_factory.mktemp("files")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(random.Random(0).randbytes(50_000))
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 stra\xdfe\n".encode("latin-1") * 500)
    (root / "not_json.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (root / "no_text.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (root / "not_a_model.model").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "list.yaml").write_text("- model\n- data\n")
    (root / "random" / "folder").mkdir(parents=True)
    (root / "random" / "folder" / "notes.txt").write_text("not a checkpoint\n")
    return root


def train(*extra):
    return lambda cache, run, files: ["train", "--dry-run", "--config", str(ROOT / "configs/default.yaml"),
                                      *overrides(cache, run), *(e.format(files=files) for e in extra)]


def command(*words):
    return lambda cache, run, files: [w.format(files=files) for w in words]


# (case id, argv, a word the error line must hold): each misbehaved before this file unless marked "also"
CASES = [
    ("lr-inf", train("train.lr=inf"), "train.lr"),
    ("lr-nan", train("train.lr=nan"), "train.lr"),
    ("weight-decay-nan", train("train.weight_decay=nan"), "train.weight_decay"),
    ("betas-nan", train("train.betas=[0.9, nan]"), "train.betas"),
    ("sigma-inf", train("privacy.noise_multiplier=inf"), "privacy.noise_multiplier"),
    ("max-epsilon-nan", train("privacy.max_epsilon=nan"), "privacy.max_epsilon"),
    ("memory-budget-nan", train("privacy.memory_budget_mb=nan"), "privacy.memory_budget_mb"),
    ("gamma-inf", train("privacy.clipping=automatic", "privacy.automatic_gamma=inf"), "privacy.automatic_gamma"),
    ("corpus-mb-inf", train("data.max_corpus_mb=inf"), "data.max_corpus_mb"),
    ("anadp-temperature-inf", train("anadp.temperature=inf"), "anadp.temperature"),
    ("target-epsilon-1e9", train("privacy.noise_multiplier=null", "privacy.target_epsilon=1e9"), "(0, 100]"),
    ("sigma-1e-9", train("privacy.noise_multiplier=1e-9"), "use at least"),
    ("frequency-noise-1e-9", train("reattention.enabled=true", "reattention.frequency_noise=1e-9"),
     "reattention.frequency_noise"),
    ("weight-decay-negative", train("train.weight_decay=-1"), "train.weight_decay"),
    ("momentum-negative", train("train.optimizer=sgd", "train.momentum=-0.5"), "train.momentum"),
    ("betas-one", train("train.betas=[0.9]"), "train.betas"),
    ("betas-above-one", train("train.betas=[2, 3]"), "train.betas"),
    ("init-seed-negative", train("model.init_seed=-1"), "model.init_seed"),
    ("items-seed-negative", train("data.source=zipf_items", "data.num_sequences=500", "data.items_seed=-1"),
     "data.items_seed"),
    ("steps-zero", train("train.steps=0"), "train.steps"),  # also
    ("data-negative", train("parallel.data=-1"), "parallel.data"),  # also
    ("clipping-dash", train("privacy.clipping=per-layer"), "did you mean per_layer"),
    ("tokenizer-not-a-model", train("data.tokenizer_path={files}/not_a_model.model"), "not a sentencepiece model"),
    ("corpus-empty", train("data.path={files}/empty.txt"), "is empty"),  # also
    ("corpus-binary", train("data.path={files}/binary.txt"), "not UTF-8"),
    ("corpus-latin1", train("data.path={files}/latin1.txt"), "not UTF-8"),
    ("jsonl-not-json", train("data.path={files}/not_json.jsonl"), "line 2"),  # also
    ("jsonl-no-text", train("data.path={files}/no_text.jsonl"), "line 2"),  # also
    ("config-not-mapping", command("train", "--config", "{files}/list.yaml"), "mapping"),  # also
    ("config-missing", command("train", "--config", "{files}/missing.yaml"), "not found"),  # also
    ("resume-missing", train("--resume", "{files}/missing"), "no such checkpoint"),  # also
    ("resume-random-folder", train("train.run_dir=null", "--resume", "{files}/random/folder"),
     "not a complete dpdist checkpoint"),  # also
    ("unknown-flag", train("--bogus"), "--bogus"),
    ("override-after-flag", train("--resume", "{files}/missing", "train.lr=nan"), "train.lr"),
    ("no-command", command(), "command"),
    ("account-sigma-1e-9", command(*ACCOUNT, "--noise-multiplier", "1e-9"), "use at least"),
    ("account-sigma-inf", command(*ACCOUNT, "--noise-multiplier", "inf"), "--noise-multiplier"),
    ("account-target-1e9", command(*ACCOUNT, "--target-epsilon", "1e9"), "(0, 100]"),
    ("account-missing-flag", command("account", "--sample-rate", "0.01"), "--steps"),
    ("bench-clipping-dash", command("bench", "--clipping", "per-layer", "--steps", "1"), "did you mean per_layer"),
    ("audit-seq-len-negative", command("audit", "privacy.noise_multiplier=1", "--seq-len", "-3"), "--seq-len"),
]


def snapshot(root: Path):
    """Every path under ``root`` with its size and modification time; None when ``root`` does not exist."""
    if not root.exists():
        return None
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def assert_one_error_line(code, err: str, word: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert word in lines[0], err


@pytest.mark.parametrize("case, argv, word", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, cache, files, capsys, case, argv, word):
    run = tmp_path / "run"
    before = snapshot(tmp_path), snapshot(files)
    try:
        code = main(argv(cache, run, files))
    except SystemExit as exc:  # argparse's usage errors leave through sys.exit
        code = exc.code
    assert_one_error_line(code, capsys.readouterr().err, word)
    assert not run.exists()
    assert (snapshot(tmp_path), snapshot(files)) == before


def python_m_dpdist(*args):
    return subprocess.run([sys.executable, "-m", "dpdist", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_python_m_dpdist_is_the_cli():
    result = python_m_dpdist(*ACCOUNT, "--target-epsilon", "1e9")
    assert_one_error_line(result.returncode, result.stderr, "(0, 100]")


def test_rdp_non_convergence_is_one_note_not_dozens_of_warnings():
    """At sample rate 0.1, RDP's series for orders 1.1-1.5 do not converge: dp_accounting logs a
    warning per order and per evaluation; the command says it once, in one line."""
    result = python_m_dpdist("account", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "200",
                             "--delta", "1e-5")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: the RDP accountant left out"), result.stderr


def test_a_pld_past_memory_is_out_of_reach_not_a_numpy_error():
    """What the screens in plan and account keep away, should anything reach it: sigma 1e-9 asks
    numpy for an array past its size limit."""
    with pytest.raises(accounting.OutOfReach, match="far past 100"):
        accounting.epsilon(1.0, 1e-9, 1, 1e-5)
