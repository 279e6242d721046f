"""``dpdist train --config FILE [key=value ...]``: validate, prepare, then run 1 process or launch torchrun.

Everything that can be wrong with the input (config, corpus, privacy parameters, a checkpoint to
resume) is checked here, before any process group starts; the effective config and the resolved
privacy plan are written into the run directory that the workers read.  A run directory is fresh
unless ``--resume`` continues it: ``auto`` takes ``train.run_dir``'s latest complete checkpoint (or
starts there when it has none yet), a ``step-*`` folder names the checkpoint itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import PURE_BF16, ConfigError, RunConfig, dump_config, load_config
from ..runtime.mesh import launched_world_size
from ..train.stop import SIGNALS as STOP_SIGNALS



def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model with differential privacy")
    parser.add_argument("--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5 privacy.seed=1")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the launch command only")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT",
                        help="continue a run: 'auto' = the latest complete checkpoint under train.run_dir (a fresh "
                             "start there if it has none), or a checkpoint folder (RUN/checkpoints/step-*)")
    parser.add_argument("--rewind", action="store_true",
                        help="with --resume CHECKPOINT older than the run's latest: go back to it, moving the newer "
                             "checkpoints to RUN/abandoned/ (the replayed steps are charged to the ledger again)")
    parser.set_defaults(func=run)


def fresh_run_dir(requested: str | None) -> Path:
    """The run directory to create; an existing, non-empty one is refused (its ledger must never be mixed)."""
    path = Path(requested) if requested else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run directory {str(path)!r} already holds a run; choose another train.run_dir, or continue it with --resume auto")
    return path


def resumed_run(cfg: RunConfig, resume: str) -> tuple[Path, Path | None]:
    """The run directory to continue and the checkpoint to start from (None: none saved yet)."""
    from ..train.checkpoint import latest_checkpoint

    if resume == "auto":
        if not cfg.train.run_dir:
            raise ConfigError("--resume auto needs train.run_dir: the run directory whose latest checkpoint to continue")
        run_dir = Path(cfg.train.run_dir)
        return run_dir, latest_checkpoint(run_dir) if run_dir.is_dir() else None
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder; give RUN/checkpoints/step-* or 'auto'")
    run_dir = checkpoint.parent.parent
    if cfg.train.run_dir and Path(cfg.train.run_dir).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {resume} belongs to run {run_dir}, not train.run_dir={cfg.train.run_dir}; drop "
                          "train.run_dir or make them agree")
    return run_dir, checkpoint


def vocabulary_file(cfg: RunConfig) -> str:
    """What a run directory keeps to read its tokens: the sentencepiece model, a folder with a Hugging
    Face tokenizer's files, or for the generated item task its public item catalogue (token t is item t)."""
    from ..data.text_tokenizer import is_hugging_face

    if cfg.data.source == "zipf_items":
        return "items.json"
    return "tokenizer" if cfg.data.tokenizer_path is not None and is_hugging_face(cfg.data.tokenizer_path) else "tokenizer.model"


def keep_vocabulary(tokenizer_path: str, target: Path) -> None:
    """The run's own copy of its tokenizer (export and eval read it, not the source, which may change)."""
    from ..data.text_tokenizer import copy_tokenizer

    if target.name == "tokenizer":
        copy_tokenizer(tokenizer_path, target)
    else:
        shutil.copyfile(tokenizer_path, target)


def rewound(checkpoint: Path | None, rewind: bool) -> list[Path]:
    """The newer checkpoints that resuming from ``checkpoint`` abandons; refused unless ``rewind``."""
    from ..train.checkpoint import newer_checkpoints

    newer = newer_checkpoints(checkpoint) if checkpoint is not None else []
    if newer and not rewind:
        raise ConfigError(f"--resume {checkpoint} rewinds the run: {len(newer)} newer checkpoint(s) exist (latest "
                          f"{newer[-1].name}); continue with --resume auto, or add --rewind to go back (the newer "
                          "checkpoints move to RUN/abandoned/, the replayed steps draw fresh noise and are charged again)")
    if rewind and not newer:
        raise ConfigError("--rewind needs --resume CHECKPOINT older than the run's latest checkpoint; there is "
                          "nothing to rewind" + ("" if checkpoint is None else f" from {checkpoint.name}"))
    return newer


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    cfg: RunConfig  # what the workers read: the vocabulary size and run directory resolved
    run_dir: Path
    plan: "RunPlan"
    checkpoint: Path | None  # where the workers resume, None for a fresh start
    data_notes: tuple[str, ...] = ()  # what the data step reports beside the counts (pair truncation)


def resolved_config(cfg: RunConfig, vocab_size: int, run_dir: Path) -> RunConfig:
    """A new, validated config with what preparing the run decides; the caller's is left as it was read.
    A pretrained model keeps its embedding's rows, which must cover every id of the tokenizer."""
    if cfg.model.pretrained is not None and vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer_path {cfg.data.tokenizer_path} has {vocab_size} ids but the model in "
                          f"{cfg.model.pretrained} embeds only {cfg.model.vocab_size}; use the tokenizer that came "
                          "with the model")
    vocab_size = cfg.model.vocab_size if cfg.model.pretrained is not None else vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size),
                               train=dataclasses.replace(cfg.train, run_dir=str(run_dir))).validate()


def prepare_run(cfg: RunConfig, resume: str | None = None, rewind: bool = False) -> PreparedRun:
    from ..data.dataset import prepare_data
    from ..runtime.mesh import Mesh
    from ..runtime.secret import check_resumed_secret
    from ..train.backends import backend_for
    from ..train.checkpoint import abandon, check_backend, check_compatible, read_record
    from ..train.plan import resolve_plan

    if cfg.model.dtype == "bfloat16":  # refused for training only: a finished bf16 run still exports and evaluates
        raise ConfigError(PURE_BF16)
    run_dir, checkpoint = resumed_run(cfg, resume) if resume else (fresh_run_dir(cfg.train.run_dir), None)
    record = read_record(checkpoint) if checkpoint is not None else None  # intact files, before the slow data step
    abandoned = rewound(checkpoint, rewind)
    check_resumed_secret(cfg.privacy.seed, run_dir, checkpoint)  # before config.yaml is rewritten without the seed
    data = prepare_data(cfg.data)
    cfg = resolved_config(cfg, data.vocab_size, run_dir)
    plan = resolve_plan(cfg, data.num_train, data.num_val, data.vocab_size)
    if record is not None:
        check_compatible(record, checkpoint, cfg, plan)
        check_backend(record, checkpoint, backend_for(cfg), Mesh(dp_size=cfg.parallel.data, tp_size=cfg.parallel.tensor))
    if abandoned:
        print(f"rewinding to {checkpoint.name}: moved {len(abandoned)} newer checkpoint(s) to {abandon(abandoned, run_dir)}",
              flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_vocabulary(data.tokenizer_path, run_dir / vocabulary_file(cfg))
    dump_config(cfg, run_dir / "config.yaml")
    plan.save(run_dir / "plan.json")
    notes = tuple(note for note in (data.pair_summary(),) if note)
    return PreparedRun(cfg, run_dir, plan, checkpoint, notes)


def describe(prepared: PreparedRun) -> str:
    from ..train.backends import backend_for

    cfg, plan = prepared.cfg, prepared.plan
    p, m, t = cfg.privacy, cfg.model, cfg.train
    source = f"{m.pretrained} ({m.hf_model_type or m.arch})" if m.pretrained else f"{m.arch}, from scratch"
    adapters = f"; LoRA rank {cfg.lora.rank} on {cfg.lora.targets}, base frozen" if cfg.lora.enabled else ""
    compute = (", bf16 compute" if t.precision == "bf16" else "") + (
        ", blocks recomputed in the backward" if t.activation_checkpointing == "blocks" else "")
    schedule = t.lr_schedule + (f" after {t.warmup_steps} warm-up steps" if t.warmup_steps else "")
    lines = [f"data: {plan.num_examples} training sequences of {cfg.data.seq_len} tokens (one sequence = one "
             f"privacy unit), vocab {plan.vocab_size}", *prepared.data_notes,
             f"model: {source}, {m.n_layers} layers, d_model {m.d_model}, {m.dtype}{compute}{adapters}",
             f"optimizer: {t.optimizer}, lr {t.lr:g} ({schedule})",
             f"parallel: {cfg.parallel.data} data x {cfg.parallel.tensor} tensor on {cfg.parallel.device}"
             + backend_for(cfg).describe()]
    if p.enabled:
        lines.append(f"privacy: clip {p.clip_norm} ({p.clipping}), sigma {plan.noise_multiplier:.4f}, sample rate "
                     f"{plan.sample_rate:.5f} (expected batch {plan.expected_batch_size:.1f}), delta {plan.delta:.2e}, "
                     f"steps {plan.max_steps}" + (f" (budget epsilon {plan.epsilon_budget})" if plan.epsilon_budget else ""))
    else:
        lines.append("privacy: DISABLED (non-private training, no guarantee)")
    return "\n".join(lines)


def run_forwarding_signals(command: list[str], env: dict) -> int:
    """Run torchrun and pass it the stop signals this process gets (a scheduler signals the process
    it started; torchrun forwards them to the workers, which checkpoint and stop)."""
    child = subprocess.Popen(command, env=env)
    # the workers' own stop signals; SIGINT (Ctrl-C) reaches torchrun from the terminal itself
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum)) for sig in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args) -> int:
    from ..runtime.launch import LAUNCH_ENV, rendezvous, torchrun_command

    try:
        cfg = load_config(args.config, args.overrides)
        if launched_world_size() > 1:
            raise ConfigError("dpdist train launches its own processes; run it once, not under torchrun")
        nnodes = rendezvous(cfg, dict(os.environ))[0]
        if nnodes > 1 and not args.dry_run:
            raise ConfigError(f"a {nnodes}-node job: prepare it once with --dry-run, which prints the torchrun command, "
                              "then run that command on every node (slurm/dpdist.sbatch does both)")
        from ..plan.check import check_fits, run_hardware

        check_fits(cfg, run_hardware(cfg))  # refuse, with dpdist plan's numbers, a run its device cannot hold
        prepared = prepare_run(cfg, args.resume, args.rewind)
        cfg, run_dir, plan, checkpoint = prepared.cfg, prepared.run_dir, prepared.plan, prepared.checkpoint
        resume = str(checkpoint) if checkpoint is not None else "auto"
        command = torchrun_command(cfg, run_dir, resume, dict(os.environ))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(prepared), flush=True)
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    if args.dry_run:
        print(shlex.join(["env", *(f"{k}={v}" for k, v in LAUNCH_ENV.items()), *command]))
        return 0
    (run_dir / "summary.json").unlink(missing_ok=True)  # a stale one must not pass for this launch's
    if cfg.parallel.world_size == 1:
        from ..train.worker import run_worker
        summary = run_worker(run_dir, resume)
    else:
        env = dict(os.environ, **LAUNCH_ENV,
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cfg.parallel.world_size)))
        code = run_forwarding_signals(command, env)
        summary_path = run_dir / "summary.json"
        # torchrun exits non-zero after forwarding a signal even when the workers stopped cleanly
        if not summary_path.exists():
            print(f"error: training processes failed (exit {code}); see the output above and {run_dir}; "
                  f"continue from the last checkpoint with --resume auto train.run_dir={run_dir}", file=sys.stderr)
            return code or 1
        summary = json.loads(summary_path.read_text())
    print(format_summary(summary, cfg))
    return 0


def format_summary(summary: dict, cfg: RunConfig) -> str:
    from ..runtime.secret import origin_warning

    if summary["stopped_by_signal"]:
        return (f"stopped by a signal after step {summary['steps']}; checkpoint {summary['checkpoint']}\n"
                f"  continue with: dpdist train --config {cfg.train.run_dir}/config.yaml --resume auto")
    validation = (f"validation loss {summary['val_loss']:.4f} (perplexity {summary['val_perplexity']:.1f})"
                  if summary["val_loss"] is not None else
                  f"no validation split (data.val_fraction={cfg.data.val_fraction} of the examples rounds to 0)")
    lines = [f"done: {summary['steps']} steps" + (" (stopped: privacy budget reached)" if summary["budget_stopped"] else ""),
             f"  final train loss {summary['train_loss']:.4f}, {validation}"]
    if "epsilon" in summary:
        lines.append(f"  privacy: epsilon = {summary['epsilon']:.3f} (PLD; RDP {summary['epsilon_rdp']:.3f}) at delta = "
                     f"{summary['delta']:.2e}, sigma {summary['noise_multiplier']:.4f}, q {summary['sample_rate']:.5f}")
    else:
        lines.append("  privacy: none (privacy.enabled=false)")
    warning = origin_warning(summary["fixed_seed"])
    if warning is not None:
        lines.append(f"  WARNING: {warning}")
    lines.append(f"  model: {summary['model']}")
    if summary.get("checkpoint"):
        lines.append(f"  checkpoint: {summary['checkpoint']}")
    if summary.get("resumed_from"):
        lines.append(f"  resumed from {summary['resumed_from']}")
    return "\n".join(lines)
