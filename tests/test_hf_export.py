"""``dpdist export --hf`` / ``--adapter``: a finished run as transformers and peft load it, in float64.

- Full fine-tuning of a tiny pretrained Llama (3 noisy steps through ``dpdist train``), then ``--hf``:
  transformers' logits equal the run's model as ``dpdist eval`` loads it (relative 1e-10), its tokenizer
  encodes as the run's, the model card holds the ledger's epsilon.
- DP-LoRA on the same model at tensor degree 2: ``--adapter`` loaded by peft onto the pretrained folder,
  and ``--hf`` (merged), both give the run's logits.
- GPT-2 adapters (fused, permuted ``c_attn``; Conv1D layers) through peft, in process, also merged by peft.
- One-line refusals, and the single-file export of a run whose tokenizer is a Hugging Face folder.

transformers' RMSNorm computes in float32 whatever the model's dtype; the reference models get the same
formula kept in float64 (as in tests/test_hf_models.py), so the comparisons test the export, not float32
rounding.
"""
import base64
import json
import shutil
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from dpdist import load_pretrained
from dpdist import load_pretrained
from dpdist.cli import main
from dpdist.commands.export import CARD, TOKENIZER_FILES_KEY
from dpdist.config import load_config
from dpdist.data.text_tokenizer import load_text_tokenizer
from dpdist.eval.weights import load_model
from dpdist.model.hf import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from dpdist.model.lora import add_adapters
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.ledger import PrivacyLedger
from helpers import ROOT
from helpers.runs import prepared, train_in_process
from helpers.hf_folders import SENTENCES, float64_reference, pairs_file, pretrained_folder

TEXT = "the patient asked for a refund; def add(a, b): return a + b"
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8",
        "lora.targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)


def ids(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(1))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def run_logits(run_dir, vocab: int = 300) -> torch.Tensor:
    """The run's final model as ``dpdist eval`` loads it (LoRA adapters unmerged)."""
    cfg = load_config(run_dir / "config.yaml")
    with torch.no_grad():
        return load_model(cfg, run_dir / "final" / "model.pt", torch.device("cpu"))(ids(vocab))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return float64_reference(model)(ids()).logits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return pretrained_folder(tmp_path_factory.mktemp("llama") / "tiny-llama")


def train(base, folder, name, *extra, config=None):
    run_dir = base / name
    args = ["train", *(["--config", str(config)] if config else []), f"model.pretrained={folder}", "model.dtype=float64", f"data.path={pairs_file(base / 'pairs.jsonl')}",
            "data.seq_len=16", "data.packing=document", f"data.cache_dir={base / 'cache'}", "train.steps=3",
            "train.batch_size=8", "train.micro_batch_size=4", "train.lr=0.01", "train.progress=false",
            "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "parallel.data=1",
            f"train.run_dir={run_dir}", *extra]
    assert main(args) == 0
    return run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, folder):
    return train(tmp_path_factory.mktemp("full"), folder, "run")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, folder):
    """The shipped DP-LoRA config (tensor 2) on a tiny folder, shortened to 3 steps."""
    run_dir = train(tmp_path_factory.mktemp("lora"), folder, "run", "lora.rank=4", "lora.alpha=8",
                    "train.warmup_steps=1", config=ROOT / "configs" / "finetune-llama-lora.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epsilon"] > 0 and summary["steps"] == 3
    assert load_config(run_dir / "config.yaml").lora.targets == LORA[-1].split("=")[1]
    return run_dir


def card_front_matter(folder) -> dict:
    text = (folder / CARD).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def assert_card_holds_the_ledgers_epsilon(out, run_dir):
    report = card_front_matter(out)["dpdist"]["privacy"]
    plan = json.loads((run_dir / "plan.json").read_text())
    ledger = PrivacyLedger(run_dir / "ledger.jsonl")
    assert report["epsilon"] == ledger.epsilon(plan["delta"], "pld") and report["delta"] == plan["delta"]
    assert report["epsilon_rdp"] == ledger.epsilon(plan["delta"], "rdp") and report["steps"] == 3
    assert report["tokenizer_trained_on_private_data"] is False
    assert f"| epsilon (PLD) | {report['epsilon']:.4f} |" in (out / CARD).read_text()


@pytest.mark.slow
def test_full_fine_tuning_exports_a_folder_transformers_loads_with_the_runs_logits(full_run, folder, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    (tmp_path / "hf.partial").mkdir()  # the remains of a crashed export are replaced, never completed
    (tmp_path / "hf.partial" / "stale").write_text("x")
    assert main(["export", str(full_run), "--hf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: README.md, config.json, model.safetensors, tokenizer.json, tokenizer_config.json" in printed
    assert "epsilon =" in printed and not (tmp_path / "hf.partial").exists()
    exported, pretrained = load_file(out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert exported.keys() == pretrained.keys()
    assert all(not torch.equal(exported[k], pretrained[k]) for k in exported)  # every weight trained
    assert relative_error(hf_logits(hf_model(out)), run_logits(full_run)) < 1e-10
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    ours, theirs = load_text_tokenizer(full_run / "tokenizer"), AutoTokenizer.from_pretrained(out)
    for text in (TEXT, *SENTENCES):
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text
    assert_card_holds_the_ledgers_epsilon(out, full_run)
    assert card_front_matter(out)["dpdist"]["training"] == {"base_model": "tiny-llama", "fine_tuning": "full"}


@pytest.mark.slow
def test_lora_at_tensor_two_exports_a_peft_adapter_and_the_merged_model(lora_run, folder, tmp_path, capsys):
    from peft import PeftModel

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["export", str(lora_run), "--adapter", str(adapter)]) == 0
    assert f"for the base model {folder}" in capsys.readouterr().out
    weights = load_file(adapter / ADAPTER_WEIGHTS)
    assert len(weights) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in weights
    assert all(weights[k].abs().max() > 1e-4 for k in weights)  # B moved off 0: the comparison is not vacuous
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == sorted(LORA[-1].split("=")[1].split(","))
    assert config["base_model_name_or_path"] == str(folder) and config["fan_in_fan_out"] is False
    want = run_logits(lora_run)
    assert relative_error(hf_logits(PeftModel.from_pretrained(hf_model(folder), adapter)), want) < 1e-10
    assert relative_error(hf_logits(hf_model(folder)), want) > 1e-6  # without the adapters it differs
    assert main(["export", str(lora_run), "--hf", str(merged)]) == 0
    assert relative_error(hf_logits(hf_model(merged)), want) < 1e-10
    assert_card_holds_the_ledgers_epsilon(adapter, lora_run)
    assert card_front_matter(merged)["dpdist"]["training"]["lora_rank"] == 4


def test_gpt2_adapters_load_in_peft_through_the_fused_qkv(tmp_path):
    from peft import PeftModel

    folder = pretrained_folder(tmp_path / "gpt2", kind="gpt2")
    ours = load_pretrained(folder)
    add_adapters(ours, rank=4, alpha=8.0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # A and B both off their init: a wrong row order or transpose shows
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    out = save_adapter(full_state_dict(ours, None), ours.cfg, tmp_path / "adapter", rank=4, alpha=8.0, dropout=0.0,
                       base=str(folder))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"] and config["fan_in_fan_out"] is True
    with torch.no_grad():
        want = ours(ids())
    peft_model = PeftModel.from_pretrained(hf_model(folder), out)
    assert relative_error(hf_logits(peft_model), want) < 1e-10
    assert relative_error(hf_logits(peft_model.merge_and_unload()), want) < 1e-10  # peft's Conv1D merge agrees
    assert relative_error(hf_logits(hf_model(folder)), want) > 1e-3


def fake_run(tmp_path, *overrides, vocabulary="tokenizer.model"):
    """A run directory that looks finished, for refusals decided before any weight is read."""
    from dpdist.config import dump_config

    run_dir = tmp_path / "fake"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "model.pt").write_bytes(b"")
    (run_dir / vocabulary).write_text("{}")
    dump_config(load_config(None, ["privacy.noise_multiplier=1", *overrides]), run_dir / "config.yaml")
    return run_dir


@pytest.mark.parametrize("args, message", [
    (["--adapter", "{out}"], "no adapters"),
    (["--hf", "{taken}"], "already exists and is not an empty folder"),
])
@pytest.mark.slow
def test_refusals_on_a_full_run_are_one_line(full_run, tmp_path, capsys, args, message):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    args = [a.format(out=tmp_path / "out", taken=tmp_path / "taken") for a in args]
    assert main(["export", str(full_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "file").read_text() == "mine"


@pytest.mark.parametrize("flag", ["--hf", "--adapter"])
def test_unfinished_runs_and_lora_from_scratch_are_refused(tmp_path, capsys, flag):
    out = str(tmp_path / "out")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("model: {}\n")
    assert main(["export", str(tmp_path / "unfinished"), flag, out]) == 2
    assert "no final model" in capsys.readouterr().err
    scratch = fake_run(tmp_path / "scratch", "lora.enabled=true")
    assert main(["export", str(scratch), "--adapter", out]) == 2
    assert "from scratch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_output_forms_are_mutually_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--hf", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_the_single_file_keeps_a_hugging_face_tokenizer_folder(full_run, tmp_path):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(full_run), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        files = json.loads(f.metadata()[TOKENIZER_FILES_KEY])
    kept = sorted(p.name for p in (full_run / "tokenizer").iterdir())
    assert sorted(files) == kept and "tokenizer.json" in kept
    restored = tmp_path / "tokenizer"
    restored.mkdir()
    for name, blob in files.items():
        (restored / name).write_bytes(base64.b64decode(blob))
    ours, theirs = load_text_tokenizer(full_run / "tokenizer"), load_text_tokenizer(restored)
    assert theirs.encode(TEXT) == ours.encode(TEXT) and (theirs.bos_id, theirs.eos_id) == (ours.bos_id, ours.eos_id)


@pytest.mark.slow
def test_a_run_with_its_own_sentencepiece_tokenizer_exports_one_transformers_reads(tmp_path, cache, capsys):
    from transformers import AutoTokenizer

    run_dir = prepared(cache, tmp_path / "run", 1, 1, "float64", "train.steps=2", "train.checkpoint_every=0")
    train_in_process(run_dir)
    assert main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
    ours, theirs = load_text_tokenizer(run_dir / "tokenizer.model"), AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (TEXT, *SENTENCES, "  two  spaces\n\ttab", "Ünïcode ✓ bytes"):
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
    assert relative_error(hf_logits(hf_model(tmp_path / "hf")), run_logits(run_dir)) < 1e-10
    # the export is a pretrained model to fine-tune, whose canary exposure reads the folder's tokenizer
    tuned = prepared(cache, tmp_path / "tuned", 1, 1, "float64", "train.steps=2", "train.checkpoint_every=0",
                     f"model.pretrained={tmp_path / 'hf'}")
    assert load_config(tuned / "config.yaml").data.tokenizer_path == str(tmp_path / "hf")
    train_in_process(tuned)
    capsys.readouterr()
    assert main(["eval", str(tuned), "--candidates", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["canaries"]) == 8 and all(0 <= c["exposure"] <= math.log2(21) for c in result["canaries"])


@pytest.mark.slow
def test_an_item_run_exports_with_its_catalogue_and_imports_back(tmp_path, cache):
    run_dir = prepared(cache, tmp_path / "run", 1, 1, "float64", "data.source=zipf_items", "data.max_corpus_mb=4",
                       "data.vocab_size=4096", "data.num_items=200", "data.num_sequences=400", "train.steps=2",
                       "train.checkpoint_every=0")
    train_in_process(run_dir)
    assert main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "items.json").read_text() == (run_dir / "items.json").read_text()
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    with torch.no_grad():
        assert relative_error(load_pretrained(tmp_path / "hf")(ids(200)), run_logits(run_dir, 200)) < 1e-10


@pytest.mark.slow
def test_the_source_models_stop_and_pad_ids_are_kept(full_run, tmp_path):
    run_dir = shutil.copytree(full_run, tmp_path / "run")
    source = json.loads((run_dir / "tokenizer" / "config.json").read_text())
    source.update(eos_token_id=[2, 1], pad_token_id=0)  # as Llama 3 lists several stop ids
    (run_dir / "tokenizer" / "config.json").write_text(json.dumps(source))
    assert main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, [2, 1], 0)
