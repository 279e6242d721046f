"""The one-run membership experiment behind ``dpdist audit --empirical``.

m canaries, random token sequences, distinct, drawn from the audit's seed, are each put into the
training set by a secret fair coin, next to ordinary sequences that are always in (counting runs
``s, s+1, s+2, ... mod V`` from a random start: data the model can learn, so the canaries are not the
whole signal).  The config's model is then trained with the project's own DP step, exactly as ``dpdist
train`` builds it (``build_gradient``: clipping, mode, ANADP, LSG; Poisson sampling with the plan's rate),
on one CPU process.  The sample rate and delta are resolved for the nominal data set of every ordinary
sequence and every canary, so neither depends on the coins; the gradient is normalised by that
nominal expected batch size, a public constant.

Membership is scored from the final model only (black box): a canary's score is its loss drop, its
loss under the initial model (public: ``model.init_seed``) minus its loss under the trained one.  The
guesses and the bound are ``dpdist.privacy.empirical_audit``'s.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import ConfigError, RunConfig
from ..model import build_model
from ..privacy import accounting
from ..privacy.empirical_audit import count_correct, epsilon_lower_bound, guesses
from ..privacy.sampling import PoissonSampler, public_padding
from ..runtime.mesh import Mesh
from ..runtime.secret import shared_secret
from ..privacy.step import model_losses
from ..train.engine import build_gradient
from ..train.methods import transform_model
from ..train.loop import make_optimizer
from ..train.plan import RunPlan, resolve_plan


@dataclass
class AuditResult:
    canaries: int
    included: int  # canaries whose coin put them into the training set
    ordinary: int
    seq_len: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    delta: float
    accountant: str
    epsilon: float  # the accountant's, at delta
    k_plus: int
    k_minus: int
    made: int  # guesses made (k+ + k-)
    correct: int
    beta: float
    lower_bound: float  # the empirical lower bound on epsilon at delta, confidence 1 - beta
    ceiling: float  # the bound had every guess been right: the most this audit can show

    @property
    def violated(self) -> bool:
        return self.lower_bound > self.epsilon


def canary_rows(m: int, vocab_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """m distinct uniformly random token rows; distinct so that no canary's coin moves another's score."""
    if vocab_size ** length < m * m:  # at least m^2 rows to draw from: a draw is distinct with chance >= 1/2
        raise ConfigError(f"{m} distinct canaries of {length} tokens need a larger model.vocab_size or "
                          "data.seq_len, or fewer --canaries")
    while True:
        rows = torch.randint(0, vocab_size, (m, length), generator=generator)
        if len(torch.unique(rows, dim=0)) == m:
            return rows


def ordinary_rows(n: int, vocab_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n counting runs from random starts."""
    starts = torch.randint(0, vocab_size, (n, 1), generator=generator)
    return (starts + torch.arange(length)) % vocab_size


@torch.no_grad()
def canary_losses(model, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([model_losses(model, part[:, :-1], part[:, 1:], None).double() for part in rows.split(chunk)])


def check_auditable(cfg: RunConfig) -> None:
    if not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled=false: there is no guarantee to audit; enable privacy")
    if cfg.train.backend != "native":
        raise ConfigError("the empirical audit trains on one process with the native backend; set train.backend=native")
    if cfg.reattention.enabled:
        raise ConfigError("the empirical audit trains without Re-Attention's token-frequency release; "
                          "set reattention.enabled=false")


def train(cfg: RunConfig, plan: RunPlan, model, rows: torch.Tensor, secret: int) -> None:
    """``plan.max_steps`` DP steps on ``rows`` (seq_len + 1 tokens each), as ``dpdist.train.loop``
    takes them; a progress bar on stderr."""
    optimizer = make_optimizer(cfg, model)
    run = build_gradient(cfg, plan, model, optimizer, Mesh(), secret)
    gradient, optimizer = run.step, run.optimizer
    sampler = PoissonSampler(len(rows), plan.sample_rate, secret, micro_batch_size=cfg.train.micro_batch_size)
    for step in tqdm(range(plan.max_steps), desc="audit-train", unit="step", file=sys.stderr,
                     disable=not cfg.train.progress, dynamic_ncols=True):
        micro_batches = sampler.plan(step).micro_batches
        for k, micro in enumerate(micro_batches):
            batch = rows[micro.indices]
            input_ids, labels = public_padding(batch[:, :-1], batch[:, 1:], micro.mask)
            gradient.microbatch(input_ids, labels, micro.mask, last=k == len(micro_batches) - 1)
        gradient.release(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gradient.detach()  # the scores below are plain forwards


def audit_one_run(cfg: RunConfig, canaries: int, ordinary: int, seed: int, k_plus: int, k_minus: int,
                  beta: float) -> AuditResult:
    """Plant ``canaries`` canaries by fair coins (from ``seed``), train once, guess, and bound epsilon at
    the run's delta.  The noise and sampling secret is ``privacy.seed`` when set, else fresh entropy."""
    check_auditable(cfg)
    generator = torch.Generator().manual_seed(seed)
    length = cfg.data.seq_len + 1
    canary = canary_rows(canaries, cfg.model.vocab_size, length, generator)
    normal = ordinary_rows(ordinary, cfg.model.vocab_size, length, generator)
    included = torch.rand(canaries, generator=generator) < 0.5
    plan = resolve_plan(cfg, ordinary + canaries, 0, cfg.model.vocab_size)
    model = transform_model(cfg, build_model(cfg.model))  # as dpdist train builds it (LoRA adapters)
    before = canary_losses(model, canary, cfg.train.micro_batch_size)
    train(cfg, plan, model, torch.cat([normal, canary[included]]), shared_secret(cfg.privacy.seed))
    scores = (before - canary_losses(model, canary, cfg.train.micro_batch_size)).numpy()
    made, correct = count_correct(guesses(scores, k_plus, k_minus), included.numpy())
    epsilon = accounting.epsilon(plan.sample_rate, plan.noise_multiplier, plan.max_steps, plan.delta,
                                 accountant=cfg.privacy.accountant)
    return AuditResult(canaries=canaries, included=int(included.sum()), ordinary=ordinary, seq_len=cfg.data.seq_len,
                       steps=plan.max_steps, sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
                       clip_norm=cfg.privacy.clip_norm, delta=plan.delta, accountant=cfg.privacy.accountant,
                       epsilon=epsilon, k_plus=k_plus, k_minus=k_minus, made=made, correct=correct, beta=beta,
                       lower_bound=epsilon_lower_bound(canaries, made, correct, beta, plan.delta),
                       ceiling=epsilon_lower_bound(canaries, made, made, beta, plan.delta))
