"""Tiny end-to-end runs for the checkpoint and backend tests: config overrides, a prepared run
directory (data, tokenizer, plan), training it in this process, what a finished run leaves (final
weights, ledger), and the exact-resume checks, in process and under torchrun."""
import dataclasses
from pathlib import Path

import torch

from dpdist.commands.train import prepare_run
from dpdist.config import load_config
from dpdist.privacy.ledger import PrivacyLedger
from dpdist.runtime.mesh import Mesh
from dpdist.train.loop import train
from dpdist.train.plan import RunPlan

from helpers import ROOT
from helpers.launch import torchrun

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
    return prepare_run(cfg).run_dir


def train_in_process(run_dir: Path, resume: str = "none", max_steps: int | None = None) -> dict:
    """Train a prepared run directory in this process, as its config and plan say (to step ``max_steps``
    if given); the run's summary."""
    plan = RunPlan.load(run_dir / "plan.json")
    if max_steps is not None:
        plan = dataclasses.replace(plan, max_steps=max_steps)
    return train(load_config(run_dir / "config.yaml"), plan, run_dir, Mesh(), resume=resume)


def final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "final" / "model.pt")


def ledger(run_dir: Path) -> list:
    return [(e["step"], e["sample_rate"], e["noise_multiplier"]) for e in PrivacyLedger(run_dir / "ledger.jsonl").entries()]


def assert_same_run(whole: Path, resumed: Path) -> None:
    """A resumed run ended where the run in one go ended: bit-identical final weights and the same
    ledger, with every step released once."""
    a, b = final_model(whole), final_model(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a resume"
    assert ledger(whole) == ledger(resumed) and [e[0] for e in ledger(resumed)] == list(range(STEPS))


def assert_resume_is_exact(tmp_path: Path, cache, *extra) -> None:
    """One process, float64: K steps, a checkpoint, a resumed ``train`` to the end, against the run in
    one go."""
    whole = prepared(cache, tmp_path / "whole", 1, 1, "float64", *extra)
    split = prepared(cache, tmp_path / "split", 1, 1, "float64", *extra)
    train_in_process(whole)
    train_in_process(split, max_steps=K)
    train_in_process(split, resume="auto")
    assert_same_run(whole, split)


def assert_launched_resume_is_exact(tmp_path: Path, cache, data: int, tensor: int, *extra) -> Path:
    """The same under torchrun at (data, tensor), float32 (tests/dist/resume_steps.py); the resumed run."""
    whole = prepared(cache, tmp_path / "whole", data, tensor, "float32", *extra)
    split = prepared(cache, tmp_path / "split", data, tensor, "float32", *extra)
    torchrun("resume_steps.py", data * tensor, "exact", whole, split, K)
    assert_same_run(whole, split)
    return split
