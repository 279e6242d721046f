"""The learning-rate schedule: a pure function of the step index and the ``train`` config.

It reads nothing but the step, so it is public and costs no privacy, and a resumed run recomputes
exactly the lr sequence of a run in one go (nothing of it needs to be checkpointed).  The lr is set
on the torch optimizer's parameter groups before every update; DeepSpeed's ZeRO optimizer steps
those same group dicts (it swaps their ``params`` for its fp32 partitions), so one setter serves both
backends.  A checkpoint load replaces the group dicts (``load_state_dict``), which is why the groups
are looked up again at every step rather than held.

Warm-up (steps ``s < W``): ``lr * (s + 1) / W``, rising to ``lr`` at the last warm-up step; no update
is spent at lr 0, since every update spends privacy budget.  Decay (``s >= W``) over the progress
``p = (s - W) / (steps - W)``, which reaches 1 at step ``train.steps`` (after the last update):
cosine ``min_lr + (lr - min_lr) (1 + cos(pi p)) / 2``, linear ``min_lr + (lr - min_lr) (1 - p)``.
"""
from __future__ import annotations

import math

from ..config import TrainConfig


def lr_at(train: TrainConfig, step: int) -> float:
    """The learning rate of the update made at ``step`` (0-based)."""
    lr, warmup = train.lr, train.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return lr
    progress = (step - warmup) / (train.steps - warmup)
    if train.lr_schedule == "cosine":
        return train.min_lr + (lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr + (lr - train.min_lr) * (1.0 - progress)


def identity(train: TrainConfig) -> dict:
    """What ``lr_at`` depends on, recorded in each checkpoint: the horizon ``steps`` only where the
    schedule decays (a constant run may be extended with a larger ``train.steps``)."""
    found = {"lr_schedule": train.lr_schedule, "lr": train.lr, "warmup_steps": train.warmup_steps,
             "min_lr": train.min_lr}
    if train.lr_schedule != "constant":
        found["steps"] = train.steps
    return found


def changed(saved: dict, train: TrainConfig) -> str | None:
    """A one-line note when a resume continues under another schedule than the checkpoint's: it is
    allowed (the schedule is public), and the new one takes effect from the resumed step."""
    mine = identity(train)
    differ = [f"{key}: checkpoint {saved.get(key)!r}, run {value!r}" for key, value in mine.items()
              if saved.get(key) != value]
    differ += [f"{key}: checkpoint {value!r}, run unset" for key, value in saved.items() if key not in mine]
    if not differ:
        return None
    return (f"note: the learning-rate schedule changed since the checkpoint ({'; '.join(differ)}); the resumed "
            "steps follow the new one")


def set_lr(optimizer, lr: float) -> None:
    """``lr`` on every parameter group of the torch optimizer (the one ``make_optimizer`` built)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
