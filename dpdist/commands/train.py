"""``dpdist train --config FILE [key=value ...]``: validate, prepare, then run 1 process or launch torchrun.

Everything that can be wrong with the input (config, corpus, privacy parameters) is checked here,
before any process group starts; the effective config and the resolved privacy plan are written into
a fresh run directory that the workers read.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..config import ConfigError, RunConfig, dump_config, load_config
from ..runtime.mesh import launched_world_size


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model with differential privacy")
    parser.add_argument("--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5 privacy.seed=1")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the launch command only")
    parser.set_defaults(func=run)


def fresh_run_dir(requested: str | None) -> Path:
    """The run directory to create; an existing, non-empty one is refused (its ledger must never be mixed)."""
    path = Path(requested) if requested else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run directory {str(path)!r} already holds a run; choose another train.run_dir")
    return path


def prepare_run(cfg: RunConfig) -> tuple[Path, "RunPlan"]:
    from ..data.dataset import prepare_data
    from ..train.plan import resolve_plan

    run_dir = fresh_run_dir(cfg.train.run_dir)
    data = prepare_data(cfg.data)
    cfg.model.vocab_size = data.vocab_size
    cfg.validate()
    plan = resolve_plan(cfg, data.num_train, data.num_val, data.vocab_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.run_dir = str(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    plan.save(run_dir / "plan.json")
    return run_dir, plan


def describe(cfg: RunConfig, plan) -> str:
    p = cfg.privacy
    lines = [f"data: {plan.num_examples} training sequences of {cfg.data.seq_len} tokens (one sequence = one "
             f"privacy unit), vocab {plan.vocab_size}",
             f"parallel: {cfg.parallel.data} data x {cfg.parallel.tensor} tensor on {cfg.parallel.device}"]
    if p.enabled:
        lines.append(f"privacy: clip {p.clip_norm} ({p.clipping}), sigma {plan.noise_multiplier:.4f}, sample rate "
                     f"{plan.sample_rate:.5f} (expected batch {plan.expected_batch_size:.1f}), delta {plan.delta:.2e}, "
                     f"steps {plan.max_steps}" + (f" (budget epsilon {plan.epsilon_budget})" if plan.epsilon_budget else ""))
    else:
        lines.append("privacy: DISABLED (non-private training, no guarantee)")
    return "\n".join(lines)


def launch_command(cfg: RunConfig, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.parallel.world_size}",
            "-m", "dpdist.train.worker", str(run_dir)]


def run(args) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if launched_world_size() > 1:
            raise ConfigError("dpdist train launches its own processes; run it once, not under torchrun")
        run_dir, plan = prepare_run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(cfg, plan), flush=True)
    command = launch_command(cfg, run_dir)
    if args.dry_run:
        print(" ".join(command))
        return 0
    if cfg.parallel.world_size == 1:
        from ..train.worker import run_worker
        summary = run_worker(run_dir)
    else:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cfg.parallel.world_size)))
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            print(f"error: training processes failed (exit {result.returncode}); see the output above and "
                  f"{run_dir}", file=sys.stderr)
            return result.returncode
        summary = json.loads((run_dir / "summary.json").read_text())
    print(format_summary(summary, cfg))
    return 0


def format_summary(summary: dict, cfg: RunConfig) -> str:
    lines = [f"done: {summary['steps']} steps" + (" (stopped: privacy budget reached)" if summary["budget_stopped"] else ""),
             f"  final train loss {summary['train_loss']:.4f}, validation loss {summary['val_loss']:.4f} "
             f"(perplexity {summary['val_perplexity']:.1f})"]
    if "epsilon" in summary:
        lines.append(f"  privacy: epsilon = {summary['epsilon']:.3f} (PLD; RDP {summary['epsilon_rdp']:.3f}) at delta = "
                     f"{summary['delta']:.2e}, sigma {summary['noise_multiplier']:.4f}, q {summary['sample_rate']:.5f}")
    else:
        lines.append("  privacy: none (privacy.enabled=false)")
    lines.append(f"  model: {summary['checkpoint']}")
    return "\n".join(lines)
