"""``dpdist export RUN_DIR [--out FILE]``: one safetensors file to publish: weights, tokenizer, privacy report.

The weights are the run's final full-shape model; the tokenizer (sentencepiece model, base64; for the
generated item task, its public item catalogue as JSON) and the
privacy report (epsilon from the run's own ledger with PLD and RDP, delta, steps, sample rate, noise
multiplier, clip, clipping, the privacy unit, whether the secret was a fixed seed, whether the tokenizer
was trained on the private corpus) go into the file's metadata, so the guarantee travels with the model.
Nothing else from ``RUN_DIR/private`` (the secret) or the checkpoints is read into it: with the secret,
anyone could subtract the noise.
"""
from __future__ import annotations

import base64
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..config import ConfigError, load_config

TOKENIZER_KEY, PRIVACY_KEY, MODEL_KEY = "dpdist.tokenizer_model_base64", "dpdist.privacy", "dpdist.model_config"
ITEMS_KEY = "dpdist.items_json"  # the generated item task's public catalogue, in place of a tokenizer


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a finished run's model, tokenizer and privacy report to "
                                                  "one safetensors file (no secrets)")
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds final/model.pt and ledger.jsonl)")
    parser.add_argument("--out", type=Path, help="output file (default: RUN_DIR/export/model.safetensors)")
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


def export(run_dir: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from ..model.lora import merged_state_dict
    from .train import vocabulary_file

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a dpdist run directory (no config.yaml)")
    model_file = run_dir / "final" / "model.pt"
    if not model_file.is_file():
        raise ConfigError(f"{run_dir} has no final model yet; finish the run first (dpdist train --config "
                          f"{run_dir}/config.yaml --resume auto)")
    cfg = load_config(run_dir / "config.yaml")
    vocabulary = run_dir / vocabulary_file(cfg)
    if not vocabulary.is_file():
        raise ConfigError(f"{vocabulary} is missing; it is written when the run starts")
    report = privacy_report(run_dir, cfg)
    state = torch.load(model_file, map_location="cpu")
    if cfg.lora.enabled:  # the adapters folded in: the file holds the plain model under its own names
        state = merged_state_dict(state, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    state = {name: t.contiguous() for name, t in state.items()}
    metadata = {"format": "pt", PRIVACY_KEY: json.dumps(report), MODEL_KEY: json.dumps(asdict(cfg.model)),
                **({ITEMS_KEY: vocabulary.read_text()} if cfg.data.source == "zipf_items"
                   else {TOKENIZER_KEY: base64.b64encode(vocabulary.read_bytes()).decode()})}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    partial.replace(out)
    return report


def run(args) -> int:
    out = args.out or args.run_dir / "export" / "model.safetensors"
    try:
        report = export(args.run_dir, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
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
