"""Tiny end-to-end runs for the checkpoint and backend tests: config overrides, a prepared run
directory (data, tokenizer, plan), what a finished run leaves (final weights, ledger), and an
in-process exact-resume check."""
import dataclasses
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


def assert_resume_is_exact(tmp_path: Path, cache, *extra) -> None:
    """One process, float64: K steps, a checkpoint, a resumed ``train`` to the end, against the run in
    one go: bit-identical weights and the same ledger."""
    from dpdist.runtime.mesh import Mesh
    from dpdist.train.loop import train
    from dpdist.train.plan import RunPlan

    whole = prepared(cache, tmp_path / "whole", 1, 1, "float64", *extra)
    split = prepared(cache, tmp_path / "split", 1, 1, "float64", *extra)
    train(load_config(whole / "config.yaml"), RunPlan.load(whole / "plan.json"), whole, Mesh(), resume="none")
    cfg, plan = load_config(split / "config.yaml"), RunPlan.load(split / "plan.json")
    train(cfg, dataclasses.replace(plan, max_steps=K), split, Mesh(), resume="none")
    train(cfg, plan, split, Mesh(), resume="auto")
    a, b = final_model(whole), final_model(split)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a resume"
    assert ledger(whole) == ledger(split) and len(ledger(split)) == STEPS
