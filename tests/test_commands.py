"""The audit command on a small model, and every shipped config loads, validates and keeps what it sets."""
import pytest
import yaml

from dpdist.cli import main
from dpdist.config import load_config

from helpers import ROOT
from helpers.hf_folders import pretrained_folder

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_keep_every_setting(path, tmp_path):
    written = yaml.safe_load(path.read_text())
    overrides = []
    if written["model"].get("pretrained"):  # a placeholder folder: the user names theirs (here a tiny one)
        written["model"]["pretrained"] = str(pretrained_folder(tmp_path / "llama"))
        written["data"]["seq_len"] = 16
        overrides += [f"model.pretrained={written['model']['pretrained']}", "data.seq_len=16"]
    loaded = load_config(path, overrides).to_dict()
    for section, values in written.items():
        for key, value in values.items():
            got = loaded[section][key]
            assert got == value, f"{path.name}: {section}.{key} = {value!r} became {got!r}"


def test_audit_passes_and_prints_a_table(capsys):
    code = main(["audit", "model.d_model=16", "model.n_heads=2", "model.vocab_size=53", "model.max_seq_len=16",
                 "data.seq_len=8", "privacy.target_epsilon=1", "--batch", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sensitivity per_layer" in out and "norms two_pass/ghost" in out and "FAIL" not in out
    assert "sensitivity flat in float32, 512 near-duplicates" in out  # the training precision, checked too
    assert out.strip().endswith("14 passed, 0 failed")


def test_audit_refuses_bad_sizes(capsys):
    assert main(["audit", "privacy.target_epsilon=1", "--seq-len", "100000"]) == 2
    assert "error:" in capsys.readouterr().err
