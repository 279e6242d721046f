"""Tiny end-to-end runs for the checkpoint and backend tests: config overrides, a prepared run
directory (data, tokenizer, plan), and what a finished run leaves (final weights, ledger)."""
from pathlib import Path

import torch

from dpdist.commands.train import prepare_run
from dpdist.config import load_config
from dpdist.privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[1]
STEPS, K = 6, 3


def overrides(cache, run_dir, data=1, tensor=1, dtype="float32", *extra):
    return [f"data.cache_dir={cache}", "data.max_corpus_mb=0.5", "data.vocab_size=509", "data.seq_len=32",
            "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", f"model.dtype={dtype}",
            f"train.steps={STEPS}", "train.batch_size=24", "train.micro_batch_size=8", f"train.checkpoint_every={K}",
            "train.progress=false", "privacy.seed=11", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null",
            "privacy.allow_large_delta=true", f"parallel.data={data}", f"parallel.tensor={tensor}",
            f"train.run_dir={run_dir}", *extra]


def prepared(cache, run_dir, *args, **kwargs) -> Path:
    cfg = load_config(ROOT / "configs/default.yaml", overrides(cache, run_dir, *args, **kwargs))
    run_dir, _, _ = prepare_run(cfg)
    return run_dir


def final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "final" / "model.pt")


def ledger(run_dir: Path) -> list:
    return [(e["step"], e["sample_rate"], e["noise_multiplier"]) for e in PrivacyLedger(run_dir / "ledger.jsonl").entries()]
