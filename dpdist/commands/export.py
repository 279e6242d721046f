"""``dpdist export RUN_DIR [--out FILE | --hf OUT_DIR | --adapter OUT_DIR]``: a finished run's model to publish.

Three forms, each with the run's privacy report (epsilon from the run's own ledger with PLD and RDP,
delta, steps, sample rate, noise multiplier, clip, clipping, the privacy unit, whether the secret was
a fixed seed, whether the tokenizer was trained on the private corpus), so the guarantee travels with
the model:

- ``--out FILE`` (default ``RUN_DIR/export/model.safetensors``): one safetensors file with the final
  full-shape weights under dpdist's names (LoRA merged) and, in its metadata, the model config, the
  report and the tokenizer (the sentencepiece model in base64, the files of a Hugging Face tokenizer
  folder as a JSON of name -> base64, or the item task's public catalogue);
- ``--hf OUT_DIR``: a Hugging Face model folder (config.json, model.safetensors with LoRA merged, the
  tokenizer's files, a README.md model card with the report) that transformers loads as it is;
- ``--adapter OUT_DIR`` (LoRA runs on a pretrained model): peft's adapter folder (adapter_config.json,
  adapter_model.safetensors) and the same model card; peft applies it to the base model folder.

A folder is written under ``OUT_DIR.partial`` and renamed when complete, so a crash never leaves a
folder that looks whole.  Nothing from ``RUN_DIR/private`` (the secret) or the checkpoints is read:
with the secret, anyone could subtract the noise.
"""
from __future__ import annotations

import base64
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from ..config import ConfigError, load_config

TOKENIZER_KEY, PRIVACY_KEY, MODEL_KEY = "dpdist.tokenizer_model_base64", "dpdist.privacy", "dpdist.model_config"
TOKENIZER_FILES_KEY = "dpdist.tokenizer_files_base64"  # a Hugging Face tokenizer folder: {file name: base64}
ITEMS_KEY = "dpdist.items_json"  # the generated item task's public catalogue, in place of a tokenizer
CARD = "README.md"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a finished run's model, tokenizer and privacy report as one "
                                                  "safetensors file, a Hugging Face folder or a PEFT adapter (no secrets)")
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds final/model.pt and ledger.jsonl)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, help="one safetensors file (default: RUN_DIR/export/model.safetensors)")
    target.add_argument("--hf", type=Path, metavar="OUT_DIR",
                        help="a Hugging Face model folder: config.json, model.safetensors (LoRA merged), the "
                             "tokenizer, README.md with the privacy report")
    target.add_argument("--adapter", type=Path, metavar="OUT_DIR",
                        help="LoRA runs: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, "
                             "README.md) for the pretrained base model")
    parser.set_defaults(func=run)


def privacy_unit(data) -> str:
    if data.source == "text" and data.packing == "document":
        return (f"one sequence of at most {data.seq_len + 1} tokens from one document (data.packing=document; a "
                f"document longer than {data.seq_len} tokens spans several units)")
    return f"one sequence of {data.seq_len + 1} tokens"


def privacy_report(run_dir: Path, cfg) -> dict:
    from ..privacy.ledger import PrivacyLedger
    from ..runtime.secret import origin_warning, seed_is_fixed
    from ..train.plan import RunPlan

    plan = RunPlan.load(run_dir / "plan.json")
    report = {"enabled": cfg.privacy.enabled, "unit": privacy_unit(cfg.data),
              "delta": plan.delta, "sample_rate": plan.sample_rate, "noise_multiplier": plan.noise_multiplier,
              "clip_norm": cfg.privacy.clip_norm, "clipping": cfg.privacy.clipping, "num_examples": plan.num_examples,
              "fixed_seed": seed_is_fixed(run_dir, cfg.privacy.seed)}
    # Such a vocabulary is a non-private function of the corpus: the guarantee does not cover it.
    report["tokenizer_trained_on_private_data"] = cfg.data.source == "text" and cfg.data.tokenizer_path is None
    if cfg.privacy.enabled:
        ledger = PrivacyLedger(run_dir / "ledger.jsonl")
        report.update(steps=sum(1 for e in ledger.entries() if "kind" not in e), epsilon=ledger.epsilon(plan.delta, "pld"),
                      epsilon_rdp=ledger.epsilon(plan.delta, "rdp"), accountant="PLD (RDP alongside), dp_accounting")
    warning = origin_warning(report["fixed_seed"])
    if warning is not None:
        report["warning"] = warning
    return report


def finished_run(run_dir: Path, checkpoint: Path | None = None, instead: str | None = None):
    """``(cfg, weights, vocabulary)`` of a run: its config, the weights to read (``checkpoint``, else the
    final model) and its own copy of the tokenizer, or a ConfigError that says what is missing.
    ``instead``: how the command takes a checkpoint, offered when the run has no final model yet."""
    from .train import vocabulary_file

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a dpdist run directory (no config.yaml)")
    weights = checkpoint or run_dir / "final" / "model.pt"
    if checkpoint is None and not weights.is_file():
        raise ConfigError(f"{run_dir} has no final model yet; finish the run first (dpdist train --config "
                          f"{run_dir}/config.yaml --resume auto)"
                          + (f" or {instead} {run_dir}/checkpoints/step-*" if instead else ""))
    if not weights.exists():
        raise ConfigError(f"--checkpoint {weights}: no such file or folder")
    cfg = load_config(run_dir / "config.yaml")
    vocabulary = run_dir / vocabulary_file(cfg)
    if not vocabulary.exists():
        raise ConfigError(f"{vocabulary} is missing; it is written when the run starts")
    return cfg, weights, vocabulary


def final_state(run_dir: Path, cfg, merged: bool = True) -> dict:
    """The run's final full-shape state dict; a LoRA run's adapters folded in unless ``merged`` is False."""
    import torch

    from ..model.lora import merged_state_dict

    state = torch.load(run_dir / "final" / "model.pt", map_location="cpu")
    if cfg.lora.enabled and merged:  # the file then holds the plain model under its own names
        state = merged_state_dict(state, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    return {name: t.contiguous() for name, t in state.items()}


def export(run_dir: Path, out: Path) -> dict:
    """Write the run as one safetensors file ``out``; the privacy report."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    cfg, _, vocabulary = finished_run(run_dir)
    report = privacy_report(run_dir, cfg)
    if cfg.data.source == "zipf_items":
        tokenizer = {ITEMS_KEY: vocabulary.read_text()}
    elif vocabulary.is_dir():
        files = {f.name: base64.b64encode(f.read_bytes()).decode() for f in sorted(vocabulary.iterdir()) if f.is_file()}
        tokenizer = {TOKENIZER_FILES_KEY: json.dumps(files)}
    else:
        tokenizer = {TOKENIZER_KEY: base64.b64encode(vocabulary.read_bytes()).decode()}
    metadata = {"format": "pt", PRIVACY_KEY: json.dumps(report), MODEL_KEY: json.dumps(asdict(cfg.model)), **tokenizer}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(final_state(run_dir, cfg), str(partial), metadata=metadata)
    partial.replace(out)
    return report


def export_hf(run_dir: Path, out_dir: Path) -> dict:
    """Write the run as a Hugging Face model folder ``out_dir``; the privacy report."""
    from ..data.text_tokenizer import SentencePieceTokenizer, load_text_tokenizer, tokenizer_files
    from ..model.hf import SPECIAL_TOKENS, save_pretrained

    run_dir = Path(run_dir)
    cfg, _, vocabulary = finished_run(run_dir)
    _check_free(out_dir)
    report = privacy_report(run_dir, cfg)
    items = cfg.data.source == "zipf_items"  # token t is item t: the public catalogue travels instead of a tokenizer
    tokenizer = None if items else load_text_tokenizer(vocabulary)
    # The ids the run framed its examples with, from its own copy of the tokenizer: the pretrained
    # folder it came from may have moved or changed since.
    token_ids = {} if items else {key: value for key, value in (("bos_token_id", tokenizer.bos_id),
                                                                 ("eos_token_id", tokenizer.eos_id)) if value is not None}
    source = vocabulary / "config.json"  # the imported model's, copied with its tokenizer: keeps a list of
    if source.is_file():                 # stop ids (Llama 3) and a pad id as the model's users know them
        token_ids.update({key: value for key, value in json.loads(source.read_text()).items()
                          if key in SPECIAL_TOKENS and value is not None})

    def fill(folder: Path) -> None:
        save_pretrained(final_state(run_dir, cfg), cfg.model, folder, token_ids=token_ids)
        for file in [vocabulary] if items else tokenizer_files(vocabulary):  # not a folder's config.json: ours is written
            shutil.copyfile(file, folder / file.name)
        if isinstance(tokenizer, SentencePieceTokenizer) and not (folder / "tokenizer_config.json").exists():
            (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer.hugging_face_config(), indent=2) + "\n")
        (folder / CARD).write_text(model_card(report, cfg, "transformers"))

    _write_folder(out_dir, fill)
    return report


def export_adapter(run_dir: Path, out_dir: Path) -> dict:
    """Write a LoRA run's adapters as a PEFT adapter folder ``out_dir``; the privacy report."""
    from ..model.hf import save_adapter

    run_dir = Path(run_dir)
    cfg, _, _ = finished_run(run_dir)
    if not cfg.lora.enabled:
        raise ConfigError(f"{run_dir} trained the whole model (lora.enabled=false), so it has no adapters; export it "
                          "with --hf OUT_DIR")
    # An adapter is usable only on the weights it was trained against; a from-scratch base is a random
    # initialisation no other library can rebuild, so the adapters alone would be a folder nobody can load.
    if cfg.model.pretrained is None:
        raise ConfigError(f"{run_dir} trained LoRA on a model initialised from scratch (model.pretrained unset), a base "
                          "peft cannot load; export the merged model with --hf OUT_DIR")
    _check_free(out_dir)
    report = privacy_report(run_dir, cfg)

    def fill(folder: Path) -> None:
        save_adapter(final_state(run_dir, cfg, merged=False), cfg.model, folder, rank=cfg.lora.rank,
                     alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, base=cfg.model.pretrained)
        (folder / CARD).write_text(model_card(report, cfg, "peft"))

    _write_folder(out_dir, fill)
    return report


def _check_free(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} already exists and is not an empty folder; choose a new output folder")


def _write_folder(out_dir: Path, fill) -> None:
    """``fill(folder)`` into ``OUT_DIR.partial``, renamed to ``out_dir`` once every file is written."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():  # the remains of an export that crashed
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    fill(partial)
    partial.replace(out_dir)  # an empty out_dir is replaced as a whole


def model_card(report: dict, cfg, library: str) -> str:
    """A README.md: front matter with the privacy report and the training set-up for machines, a
    table for people."""
    import yaml

    base = Path(cfg.model.pretrained).name if cfg.model.pretrained is not None else None
    training = {"base_model": base, "fine_tuning": "lora" if cfg.lora.enabled else "full"}
    if cfg.lora.enabled:
        training.update(lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_targets=cfg.lora.targets)
    front = {"library_name": library, "tags": ["dpdist", "differential-privacy", *(["lora"] if cfg.lora.enabled else [])],
             "dpdist": {"privacy": report, "training": training}}
    rows = [("privacy unit", report["unit"])]
    if report["enabled"]:
        rows = [("epsilon (PLD)", f"{report['epsilon']:.4f}"), ("epsilon (RDP)", f"{report['epsilon_rdp']:.4f}"),
                ("delta", f"{report['delta']:.3e}"), ("steps", report["steps"]),
                ("sample rate", f"{report['sample_rate']:.6f}"), ("noise multiplier", f"{report['noise_multiplier']:.4f}"),
                ("clip norm", f"{report['clip_norm']} ({report['clipping']} clipping)"), *rows,
                ("accountant", report["accountant"])]
    rows += [("tokenizer trained on the private data", "yes (not covered by the guarantee)"
              if report["tokenizer_trained_on_private_data"] else "no"),
             ("base model", base or "none (trained from scratch)"),
             ("fine-tuning", f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {cfg.lora.targets}"
              if cfg.lora.enabled else "all weights")]
    guarantee = ("This model was trained with differentially private SGD (per-example clipping and Gaussian noise); the "
                 "guarantee below covers the training data, per privacy unit." if report["enabled"]
                 else "This model was trained WITHOUT differential privacy: there is no guarantee for its training data.")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", "# Model trained with dpdist", "",
             guarantee, ""]
    if "warning" in report:
        lines += [f"**Warning:** {report['warning']}", ""]
    lines += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    return "\n".join(lines)


def run(args) -> int:
    try:
        if args.hf is not None:
            out, report = args.hf, export_hf(args.run_dir, args.hf)
        elif args.adapter is not None:
            out, report = args.adapter, export_adapter(args.run_dir, args.adapter)
        else:
            out = args.out or args.run_dir / "export" / "model.safetensors"
            report = export(args.run_dir, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out.is_dir():
        print(f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    else:
        print(f"wrote {out}")
    if args.adapter is not None:
        print(f"  a PEFT LoRA adapter for the base model {load_config(args.run_dir / 'config.yaml').model.pretrained}")
    if report["tokenizer_trained_on_private_data"]:
        print("note: the tokenizer was trained on the corpus itself (data.tokenizer_path unset); its vocabulary is "
              "not covered by the guarantee", file=sys.stderr)
    if report["enabled"]:
        print(f"privacy: epsilon = {report['epsilon']:.3f} (PLD; RDP {report['epsilon_rdp']:.3f}) at delta = "
              f"{report['delta']:.2e} over {report['steps']} steps, sample rate {report['sample_rate']:.5f}, noise "
              f"multiplier {report['noise_multiplier']:.4f}, clip {report['clip_norm']} ({report['clipping']})")
    else:
        print("privacy: none (trained without differential privacy)")
    if "warning" in report:
        print(f"WARNING: {report['warning']}", file=sys.stderr)
    return 0
