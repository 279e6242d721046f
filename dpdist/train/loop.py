"""The training loop of one worker process: sampler, engine, optimizer, ledger, progress, summary.

Each logical step: the Poisson plan for this step (identical on every rank), the micro-batches of this
data-parallel rank through the DP step (``dpdist.train.engine``), one noisy gradient, the ledger entry (written before
the update, so a crash never under-counts epsilon), the optimizer step.  The printed training loss is a
non-private diagnostic of the sampled batch; the privacy guarantee covers the model, not the log.

Sampling and noise are keyed by the release index, the ledger position of the step's release: a run
resumed from its latest checkpoint after a clean stop continues the ledger where the checkpoint left
it and draws exactly what an uninterrupted run would, while a step computed again (after a crash, or a
rewind to an older checkpoint) is a new ledger line with a fresh sample and fresh noise.  The budget
is checked against the ledger itself, so releases spent on replayed steps count against it.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import RunConfig
from ..data.dataset import prepare_data
from ..model import build_model, strip_vocab_padding
from ..model.hf import build_pretrained
from ..parallel.cross_entropy import per_example_loss
from ..privacy import accounting
from ..privacy.accounting import DISPLAY_PLD_GRID
from ..privacy.ledger import PrivacyLedger
from ..privacy.sampling import PoissonSampler, public_padding
from ..runtime.mesh import Mesh
from ..runtime.secret import run_secret, seed_is_fixed
from .activation_checkpointing import apply_activation_checkpointing
from .checkpoint import check_ledger, latest_checkpoint, load_checkpoint, save_checkpoint
from .engine import build_gradient
from .methods import transform_model
from .metrics import MetricsLog
from .plan import RunPlan
from .precision import apply_precision
from .reattention import reattention_for_training
from .schedule import lr_at, set_lr
from .stop import StopSignal


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones (a LoRA base) never move
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def _all_sum(values: list[float], mesh: Mesh) -> list[float]:
    if mesh.dp_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=mesh.dp_group)
    return t.tolist()


@torch.no_grad()
def validation_loss(model, data, mesh: Mesh, micro_batch_size: int, max_examples: int = 512) -> float:
    """Mean per-example loss on the held-out split (each data-parallel rank takes a strided share), with
    dropout (LoRA's) off and the model's training mode restored after."""
    n = min(data.num_val, max_examples)
    indices = torch.arange(mesh.dp_rank, n, mesh.dp_size)
    total, training = 0.0, model.training
    model.eval()
    # Every rank runs as many forwards (a sharded model's forward is a collective): one short of
    # examples scores example 0 and leaves it out of the total.
    for k in range(math.ceil(math.ceil(n / mesh.dp_size) / micro_batch_size)):
        chunk = indices[k * micro_batch_size:(k + 1) * micro_batch_size]
        input_ids, labels = data.val_batch(chunk if len(chunk) else torch.zeros(1, dtype=torch.long))
        logits = model(input_ids.to(mesh.device))
        losses = per_example_loss(logits, labels.to(mesh.device), vocab_start=model.vocab_start, tp_group=mesh.tp_group)
        total += float(losses.sum()) if len(chunk) else 0.0
    model.train(training)
    total, count = _all_sum([total, float(len(indices))], mesh)
    return total / max(count, 1.0)


def release_budget(ledger: PrivacyLedger | None, cfg: RunConfig, plan: RunPlan, steps_left: int,
                   mesh: Mesh) -> tuple[int, int]:
    """(the release index of the next release, how many releases may still be made): the ledger's
    length, and the most releases that keep the ledger's epsilon within the budget (``steps_left`` when
    there is no budget or it is not binding).  Rank 0 reads the ledger; every rank gets its answer."""
    answer = [0, steps_left]
    if ledger is not None:
        history = ledger.history()
        answer[0] = sum(count for _, _, count in history)
        if plan.epsilon_budget is not None:
            answer[1] = accounting.max_steps_within(plan.epsilon_budget, plan.sample_rate, plan.noise_multiplier,
                                                    plan.delta, accountant=cfg.privacy.accountant, upper=steps_left,
                                                    prior=history)
    if mesh.world_size > 1:
        dist.broadcast_object_list(answer, src=0, group=mesh.world_group)
    return answer[0], answer[1]


def resume_point(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to start from: ``auto`` is the run's latest complete one (None: a fresh start)."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return Path(resume)


def train(cfg: RunConfig, plan: RunPlan, run_dir: Path, mesh: Mesh, resume: str | None = "auto",
          stop: StopSignal | None = None) -> dict:
    """Train from the resume point to ``plan.max_steps``, or until ``stop`` is requested (then
    checkpoint and return early); ``stop`` defaults to handlers installed for this call."""
    own_stop = stop is None
    stop = stop or StopSignal()
    try:
        return _train(cfg, plan, run_dir, mesh, resume, stop)
    finally:
        if own_stop:
            stop.restore()


def _train(cfg: RunConfig, plan: RunPlan, run_dir: Path, mesh: Mesh, resume: str | None, stop: StopSignal) -> dict:
    data = prepare_data(cfg.data)
    privacy = cfg.privacy
    secret = run_secret(privacy.seed, run_dir, mesh)
    ledger = PrivacyLedger(run_dir / "ledger.jsonl") if privacy.enabled and mesh.is_main else None
    reattention = reattention_for_training(cfg, plan, data, run_dir, mesh, secret, ledger)  # None unless enabled
    build = build_pretrained if cfg.model.pretrained else build_model  # pretrained: weights read, not drawn
    model = build(cfg.model, tp_group=mesh.tp_group, device=mesh.device, reattention=reattention)
    transform_model(cfg, model, mesh.tp_group)  # LoRA adapters (frozen base) when lora.enabled
    apply_precision(cfg.train.precision, model, mesh.device)  # every forward, the validation's too
    apply_activation_checkpointing(cfg.train.activation_checkpointing, model)
    optimizer = make_optimizer(cfg, model)
    sampler = PoissonSampler(plan.num_examples, plan.sample_rate, secret, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size,
                             micro_batch_size=cfg.train.micro_batch_size)
    run = build_gradient(cfg, plan, model, optimizer, mesh, secret)
    torch_optimizer = optimizer  # whose param groups every backend steps with (dpdist.train.schedule)
    gradient, optimizer = run.step, run.optimizer
    start, resumed_from = 0, None
    checkpoint = resume_point(resume, run_dir)
    if checkpoint is not None:
        record = load_checkpoint(checkpoint, model, optimizer, cfg, plan, mesh, run.backend, run.components)
        start, resumed_from = record["next_step"], str(checkpoint)
        if privacy.enabled and mesh.is_main:
            check_ledger(checkpoint, run_dir / "ledger.jsonl")
    first_release, allowed = release_budget(ledger, cfg, plan, plan.max_steps - start, mesh)
    end = start + allowed  # < plan.max_steps only when replayed steps spent part of the budget
    metrics = MetricsLog(run_dir, cfg.train.tensorboard) if mesh.is_main else None
    bar = tqdm(total=plan.max_steps, desc="dp-train" if privacy.enabled else "train", unit="step", file=sys.stderr,
               disable=not (mesh.is_main and cfg.train.progress), dynamic_ncols=True)
    window = {"loss": 0.0, "examples": 0.0, "clipped": 0.0, "nonfinite": 0.0, "tokens": 0.0, "seconds": 0.0}
    last_loss, epsilon, stopped_at = float("nan"), 0.0, None
    bar.update(start)

    def checkpoint_at(next_step: int) -> None:
        save_checkpoint(run_dir, next_step, model, optimizer, cfg, plan, mesh, keep=cfg.train.keep_checkpoints,
                        backend=run.backend, components=run.components)

    for step in range(start, end):
        started = time.perf_counter()
        release = first_release + step - start
        step_plan = sampler.plan(release)
        loss_sum = clipped = examples = nonfinite = 0.0
        last = len(step_plan.micro_batches) - 1
        for k, micro in enumerate(step_plan.micro_batches):
            input_ids, labels = public_padding(*data.train_batch(micro.indices), micro.mask)
            input_ids, labels, mask = input_ids.to(mesh.device), labels.to(mesh.device), micro.mask.to(mesh.device)
            stats = gradient.microbatch(input_ids, labels, mask, last=k == last)
            loss_sum, clipped, examples = loss_sum + stats.loss_sum, clipped + stats.clipped, examples + stats.examples
            nonfinite += stats.nonfinite
        gradient.release(release, step)
        if ledger is not None:  # before the update is applied
            ledger.append(step, plan.sample_rate, plan.noise_multiplier, release=release)
        lr = lr_at(cfg.train, step)
        set_lr(torch_optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, examples, clipped, nonfinite = _all_sum([loss_sum, examples, clipped, nonfinite], mesh)
        window["loss"] += loss_sum
        window["examples"] += examples
        window["clipped"] += clipped
        window["nonfinite"] += nonfinite
        window["tokens"] += examples * cfg.data.seq_len
        window["seconds"] += time.perf_counter() - started
        if mesh.is_main and ((step + 1) % cfg.train.log_every == 0 or step + 1 == end):
            last_loss = window["loss"] / max(window["examples"], 1.0)
            epsilon = ledger.epsilon(plan.delta, privacy.accountant, DISPLAY_PLD_GRID) if ledger else math.inf
            record = {"step": step + 1, "loss": last_loss, "lr": lr, "epsilon": epsilon,
                      "clipped_fraction": window["clipped"] / max(window["examples"], 1.0),
                      "nonfinite_examples": int(window["nonfinite"]),
                      "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9)}
            metrics.write(record)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", eps=f"{epsilon:.2f}")
            window = dict.fromkeys(window, 0.0)
        bar.update(1)
        if stop.requested(mesh):  # every rank agrees at this step boundary
            checkpoint_at(step + 1)
            stopped_at = step + 1
            break
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < end:
            checkpoint_at(step + 1)
    bar.close()
    if metrics is not None:
        metrics.close()
    if stopped_at is not None:
        return {"steps": stopped_at, "stopped_by_signal": True, "resumed_from": resumed_from,
                "checkpoint": str(latest_checkpoint(run_dir))}
    if cfg.train.checkpoint_every and end > start or start < end < plan.max_steps:
        checkpoint_at(end)  # the budget stop is checkpointed too: a resume then finds nothing left to release
    if end < plan.max_steps and mesh.is_main:
        print(f"privacy budget reached: the ledger's {first_release + allowed} releases (some of them replayed "
              f"steps) leave no room for step {end} within epsilon {plan.epsilon_budget}; stopped before it",
              file=sys.stderr, flush=True)
    val_loss = validation_loss(model, data, mesh, cfg.train.micro_batch_size) if data.num_val else None
    summary = {"steps": end, "train_loss": last_loss, "val_loss": val_loss,
               "val_perplexity": None if val_loss is None else math.exp(min(val_loss, 50.0)), "delta": plan.delta,
               "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
               "budget_stopped": end < cfg.train.steps, "stopped_by_signal": False,
               "resumed_from": resumed_from}
    if mesh.is_main:
        summary["fixed_seed"] = seed_is_fixed(run_dir, privacy.seed)
        if ledger is not None:
            summary["epsilon"] = ledger.epsilon(plan.delta, accountant="pld")
            summary["epsilon_rdp"] = ledger.epsilon(plan.delta, accountant="rdp")
    summary["model"] = str(save_model(model, run_dir, mesh, run.backend))
    latest = latest_checkpoint(run_dir)
    summary["checkpoint"] = str(latest) if latest is not None else None
    return summary


def save_model(model, run_dir: Path, mesh: Mesh, backend) -> Path:
    """The trained weights at full shape, written by rank 0; no secret is in this file."""
    path = run_dir / "final" / "model.pt"
    state = backend.full_state_dict(model, mesh)  # on the ranks that gather it (None elsewhere)
    state = strip_vocab_padding(state, model) if state is not None else None
    if mesh.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in state.items()}, path)
    return path
