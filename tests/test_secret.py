"""The run's secret (issue 13).

- A fixed ``privacy.seed`` is recorded beside the secret (``private/secret_origin.json``, mode 600),
  so a resume that no longer names the seed still warns, and ``summary.json``, the train command's
  summary, the export's metadata and ``dpdist eval`` all say ``fixed_seed``; a run without the record
  says ``"unknown"`` everywhere instead of crashing or claiming an entropy secret.
- A resume refuses, in one line and before touching the run, a ``privacy.seed`` that is not the saved
  secret (another seed, or any seed on an entropy run) and a checkpoint whose secret is missing.
- No error message echoes a secret: ``derive_key``'s, a corrupt secret file's, ``privacy.seed``'s.
"""
import contextlib
import io
import json
import shutil
import stat
from pathlib import Path

import pytest
from safetensors import safe_open

from dpdist.cli import main
from dpdist.commands.export import PRIVACY_KEY
from dpdist.config import ConfigError, load_config
from dpdist.privacy.noise import derive_key
from dpdist.runtime.secret import FIXED_SEED_WARNING, UNKNOWN_ORIGIN_WARNING, load_secret, save_secret, seed_is_fixed

from helpers import ROOT
from helpers.runs import overrides, train_in_process

SEED = 987654321987  # distinctive digits: no output may contain them


def train_args(cache, run_dir, *extra) -> list[str]:
    return ["train", "--config", str(ROOT / "configs/default.yaml"),
            *overrides(cache, run_dir, 1, 1, "float32", *extra)]


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, cache):
    """3 steps with privacy.seed=SEED, then resumed to 6 without it: (run_dir, first launch, resume)."""
    run_dir = tmp_path_factory.mktemp("seeded") / "run"
    first = run_cli(train_args(cache, run_dir, f"privacy.seed={SEED}", "train.steps=3"))
    resumed = run_cli([*train_args(cache, run_dir, "privacy.seed=null"), "--resume", "auto"])
    assert first[0] == 0 and resumed[0] == 0, first[2] + resumed[2]
    return run_dir, first, resumed


def test_a_fixed_seed_is_remembered_when_the_resume_does_not_name_it(seeded):
    run_dir, first, resumed = seeded
    assert load_config(run_dir / "config.yaml").privacy.seed is None  # the resume's config forgot the seed
    assert json.loads((run_dir / "private" / "secret_origin.json").read_text()) == {"fixed_seed": True}
    assert load_secret(run_dir) == SEED
    for name in ("secret", "secret_origin.json"):
        assert stat.S_IMODE((run_dir / "private" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "private").stat().st_mode) == 0o700
    assert not list((run_dir / "private").glob("*.partial"))
    assert FIXED_SEED_WARNING in first[2] and FIXED_SEED_WARNING in resumed[2]  # warned on the resume too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fixed_seed"] is True and summary["resumed_from"].endswith("step-00000003")
    assert f"WARNING: {FIXED_SEED_WARNING}" in resumed[1]  # the train command's final summary
    assert not any(str(SEED) in text or f"{SEED:x}" in text for text in (*first[1:], *resumed[1:]))


def test_export_and_eval_report_the_fixed_seed(tmp_path, seeded):
    run_dir = seeded[0]
    out = tmp_path / "model.safetensors"
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out)])
    assert code == 0 and f"WARNING: {FIXED_SEED_WARNING}" in err
    with safe_open(str(out), framework="pt") as f:
        report = json.loads(f.metadata()[PRIVACY_KEY])
    assert report["fixed_seed"] is True and report["warning"] == FIXED_SEED_WARNING
    code, out, err = run_cli(["eval", str(run_dir), "--no-exposure", "--max-examples", "8"])
    assert code == 0, err
    assert f"WARNING: {FIXED_SEED_WARNING}" in out


def test_a_run_without_the_origin_record_is_unknown(tmp_path, seeded, capsys):
    run_dir = shutil.copytree(seeded[0], tmp_path / "old")
    (run_dir / "private" / "secret_origin.json").unlink()  # what a run from before the record holds
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert f"WARNING: {UNKNOWN_ORIGIN_WARNING}" in capsys.readouterr().err
    with safe_open(str(out), framework="pt") as f:
        report = json.loads(f.metadata()[PRIVACY_KEY])
    assert report["fixed_seed"] == "unknown" and report["warning"] == UNKNOWN_ORIGIN_WARNING
    assert seed_is_fixed(run_dir, SEED) is True  # a config that names the seed: a resume checked it is the secret
    # no seed in its config (the resume above dropped it), at the end already
    summary = train_in_process(run_dir, resume="auto")
    assert summary["fixed_seed"] == "unknown"
    assert f"WARNING: {UNKNOWN_ORIGIN_WARNING}" in capsys.readouterr().err
    assert not (run_dir / "private" / "secret_origin.json").exists()  # an unknown origin is never guessed into a record


def refused(args, run_dir: Path) -> str:
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    code, out, err = run_cli(args)
    assert code == 2, out + err
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before  # the run is untouched
    err = err.strip()
    assert err.startswith("error:") and "\n" not in err
    return err


def test_a_resume_refuses_a_seed_that_is_not_the_runs(seeded, cache):
    run_dir = seeded[0]
    err = refused([*train_args(cache, run_dir, f"privacy.seed={SEED + 1}"), "--resume", "auto"], run_dir)
    assert "privacy.seed is not the seed this run was started with" in err and str(SEED + 1) not in err


def test_a_resume_accepts_the_runs_own_seed(tmp_path, seeded, cache):
    run_dir = shutil.copytree(seeded[0], tmp_path / "run")
    code, out, err = run_cli([*train_args(cache, run_dir, f"privacy.seed={SEED}"), "--resume", "auto", "--dry-run"])
    assert code == 0, err
    assert "resuming from" in out


def test_a_resume_refuses_a_seed_on_a_run_whose_secret_came_from_entropy(tmp_path, cache):
    run_dir = tmp_path / "run"
    save_secret(SEED, run_dir, fixed_seed=False)  # even the same value: the record says it was not a seed
    err = refused([*train_args(cache, run_dir, f"privacy.seed={SEED}"), "--resume", "auto"], run_dir)
    assert "came from OS entropy; drop privacy.seed" in err and str(SEED) not in err


def test_a_resume_refuses_a_checkpoint_whose_secret_is_missing(tmp_path, seeded, cache):
    run_dir = shutil.copytree(seeded[0], tmp_path / "run")
    shutil.rmtree(run_dir / "private")  # moved away, and not put back
    err = refused([*train_args(cache, run_dir, "privacy.seed=null"), "--resume", "auto"], run_dir)
    assert "private/secret is missing" in err and "put the run's private/ folder back" in err


@pytest.mark.parametrize("secret", [2**128 + SEED, -SEED, f"{SEED:x}", float(SEED)])
def test_derive_key_does_not_echo_an_invalid_secret(secret):
    with pytest.raises(ValueError) as error:
        derive_key(secret, 0, "noise")
    message = str(error.value)
    assert str(SEED) not in message and f"{SEED:x}" not in message and str(secret).lstrip("-") not in message


def test_a_corrupt_secret_file_is_not_echoed_and_a_corrupt_origin_is_refused(tmp_path):
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret").write_text(f"{SEED:x}-and-more\n")
    with pytest.raises(ConfigError, match="is corrupt") as error:
        load_secret(tmp_path)
    assert f"{SEED:x}" not in str(error.value)
    (tmp_path / "private" / "secret_origin.json").write_text('{"fixed_seed": "no"}')
    with pytest.raises(ConfigError, match="secret_origin.json is corrupt"):
        seed_is_fixed(tmp_path, None)


@pytest.mark.parametrize("value", [f"-{SEED}", f"{2**130 + SEED}", f"{SEED}.5", f"x{SEED}", f"[{SEED}]"])
def test_a_bad_privacy_seed_is_not_echoed(value):
    with pytest.raises(ConfigError, match="privacy.seed") as error:
        load_config(ROOT / "configs/default.yaml", [f"privacy.seed={value}"])
    assert str(SEED) not in str(error.value)
