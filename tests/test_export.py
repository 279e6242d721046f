"""``dpdist export``: one safetensors file with the weights, the tokenizer and the privacy report, and no secret."""
import base64
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from dpdist.cli import main
from dpdist.commands.export import MODEL_KEY, PRIVACY_KEY, TOKENIZER_KEY, privacy_report
from dpdist.config import load_config
from dpdist.privacy.ledger import PrivacyLedger

from helpers import ROOT


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run_dir = base / "run"
    args = ["train", "--config", str(ROOT / "configs/default.yaml"), f"data.cache_dir={base / 'cache'}",
            "data.max_corpus_mb=0.5", "data.vocab_size=512", "data.seq_len=32", "model.d_model=32", "model.n_layers=1",
            "model.max_seq_len=32", "train.steps=3", "train.batch_size=16", "train.progress=false",
            "parallel.data=1", "data.packing=document", f"train.run_dir={run_dir}"]
    assert main(args) == 0
    return run_dir


def test_export_holds_weights_tokenizer_and_the_ledgers_epsilon(tmp_path, capsys, finished_run):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "epsilon =" in printed.out and "tokenizer was trained on the corpus itself" in printed.err
    final = torch.load(finished_run / "final" / "model.pt")
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(final)
        for name in final:
            assert torch.equal(f.get_tensor(name), final[name]), name
        meta = f.metadata()
    report = json.loads(meta[PRIVACY_KEY])
    plan = json.loads((finished_run / "plan.json").read_text())
    ledger = PrivacyLedger(finished_run / "ledger.jsonl")
    assert report["steps"] == 3 == len(ledger.entries())
    assert report["epsilon"] == ledger.epsilon(plan["delta"], "pld") and report["delta"] == plan["delta"]
    assert report["noise_multiplier"] == plan["noise_multiplier"] and report["fixed_seed"] is False
    assert report["tokenizer_trained_on_private_data"] is True
    assert report["unit"].startswith("one sequence of at most 33 tokens from one document")
    assert json.loads(meta[MODEL_KEY])["vocab_size"] == 512
    tokenizer = spm.SentencePieceProcessor(model_proto=base64.b64decode(meta[TOKENIZER_KEY]))
    assert tokenizer.vocab_size() == 512
    assert_holds_no_secret(out.read_bytes(), finished_run)


def assert_holds_no_secret(blob: bytes, run_dir: Path) -> None:
    """No trace of the secret in any encoding a careless copy could use: hex either case, decimal, 16 raw bytes."""
    secret = int((run_dir / "private" / "secret").read_text(), 16)
    for encoded in (f"{secret:x}", f"{secret:X}", str(secret)):
        assert encoded.encode() not in blob
    for order in ("little", "big"):
        assert secret.to_bytes(16, order) not in blob


def test_the_default_export_folder_holds_only_the_file_and_nothing_from_private(capsys, finished_run):
    assert main(["export", str(finished_run)]) == 0
    written = list((finished_run / "export").rglob("*"))
    assert written == [finished_run / "export" / "model.safetensors"]
    assert_holds_no_secret(written[0].read_bytes(), finished_run)
    assert "WARNING" not in capsys.readouterr().err  # the secret came from OS entropy: nothing to warn of


def test_export_refuses_an_unfinished_run(tmp_path, capsys, finished_run):
    (tmp_path / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    assert main(["export", str(tmp_path)]) == 2
    assert "no final model" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "not a dpdist run directory" in capsys.readouterr().err


def test_the_report_says_whether_the_tokenizer_came_from_the_private_corpus_and_what_the_unit_is(tmp_path, finished_run):
    cfg = load_config(finished_run / "config.yaml")
    public = tmp_path / "public.model"
    public.write_bytes((finished_run / "tokenizer.model").read_bytes())
    cfg.data.tokenizer_path, cfg.data.packing = str(public), "stream"
    report = privacy_report(finished_run, cfg)
    assert report["tokenizer_trained_on_private_data"] is False and report["unit"] == "one sequence of 33 tokens"
    cfg.data.source, cfg.data.tokenizer_path = "zipf_items", None  # generated items: no tokenizer at all
    assert privacy_report(finished_run, cfg)["tokenizer_trained_on_private_data"] is False
