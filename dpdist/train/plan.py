"""Resolve the numbers a private run depends on, once, before any process group starts.

The dataset size N fixes the sampling rate q (from the expected batch size), the default delta and
the check that delta is small enough; sigma comes from the config or is calibrated for the target
epsilon; the budget fixes how many steps may run.  Every worker reads the same resolved plan.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..privacy import accounting
from .reattention import release_history


@dataclass
class RunPlan:
    num_examples: int
    num_val: int
    vocab_size: int
    sample_rate: float
    delta: float
    noise_multiplier: float
    epsilon_budget: float | None  # stop before epsilon would exceed this
    max_steps: int  # train.steps, or fewer when the budget ends first

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunPlan":
        return cls(**json.loads(Path(path).read_text()))


def resolve_plan(cfg: RunConfig, num_examples: int, num_val: int, vocab_size: int) -> RunPlan:
    privacy, train = cfg.privacy, cfg.train
    if num_examples < 1:
        raise ConfigError("the corpus yields no training example; give more text or a smaller data.seq_len")
    if privacy.sample_rate is not None:
        sample_rate = privacy.sample_rate
    else:
        if train.batch_size > num_examples:
            raise ConfigError(f"train.batch_size ({train.batch_size}) exceeds the {num_examples} training examples; "
                              "lower it or give more data")
        sample_rate = train.batch_size / num_examples
    delta = privacy.delta if privacy.delta is not None else 1.0 / (10 * num_examples)
    if delta >= 1.0 / num_examples and not privacy.allow_large_delta:
        raise ConfigError(f"privacy.delta ({delta:g}) >= 1/N = {1 / num_examples:g} allows releasing a whole example; "
                          "lower it or set privacy.allow_large_delta=true")
    if not privacy.enabled:
        return RunPlan(num_examples, num_val, vocab_size, sample_rate, delta, 0.0, None, train.steps)
    prior = release_history(cfg)  # spent before step 0 (Re-Attention's token-frequency release)
    budget = privacy.max_epsilon if privacy.max_epsilon is not None else privacy.target_epsilon
    check_reach(cfg, sample_rate, delta, prior, budget)
    sigma = privacy.noise_multiplier
    try:
        if sigma is None:
            try:
                sigma = accounting.calibrate_noise_multiplier(privacy.target_epsilon, sample_rate, train.steps, delta,
                                                              accountant=privacy.accountant, prior=prior)
            except ValueError as exc:
                raise ConfigError(f"privacy.target_epsilon {privacy.target_epsilon} cannot be reached: {exc}") from None
        max_steps = train.steps
        if budget is not None:
            if sigma == 0:
                raise ConfigError("privacy.noise_multiplier=0 spends an infinite epsilon; no budget can hold it")
            max_steps = min(train.steps, accounting.max_steps_within(budget, sample_rate, sigma, delta,
                                                                     accountant=privacy.accountant, upper=train.steps,
                                                                     prior=prior))
    except accounting.OutOfReach as exc:
        raise ConfigError(str(exc)) from None
    return RunPlan(num_examples, num_val, vocab_size, sample_rate, delta, float(sigma), budget, max_steps)


def check_reach(cfg: RunConfig, sample_rate: float, delta: float, prior: list, budget: float | None) -> None:
    """Refuse, by RDP's epsilon (milliseconds), what spends more than ``accounting.MAX_EPSILON`` before
    the PLD accountant is asked (its memory and time grow with epsilon): the token-frequency release,
    and a given sigma over the run, or over one step when a budget (at most MAX_EPSILON) stops the run."""
    limit = accounting.MAX_EPSILON
    if prior and accounting.epsilon_for_history(prior, delta, "rdp") > limit:
        raise ConfigError(f"reattention.frequency_noise {cfg.reattention.frequency_noise:g} spends more "
                          f"than epsilon {limit:g} on the token-frequency release alone; raise it")
    sigma = cfg.privacy.noise_multiplier
    if not sigma:  # calibrated within the target, or 0: an infinite epsilon by design, with no accountant run
        return
    steps = cfg.train.steps if budget is None else 1
    spent = accounting.epsilon(sample_rate, sigma, steps, delta, "rdp", prior=prior)
    if spent > limit:
        floor = accounting.noise_floor(sample_rate, steps, delta, prior)
        raise ConfigError(f"privacy.noise_multiplier {sigma:g} spends epsilon {spent:.5g} (RDP) over {steps} step(s), "
                          f"past {limit:g}: no guarantee is left and the PLD accountant cannot compute it; use at least "
                          f"{floor:.4g}, or privacy.enabled=false to train without privacy")
