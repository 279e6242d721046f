"""``dpdist audit --empirical``: train once with planted canaries and compare the empirical lower bound
on epsilon (Steinke, Nasr & Jagielski 2023) with the accountant's epsilon.

Exit code 0 when the lower bound does not exceed the accountant's epsilon, 1 when it does (the run's
(epsilon, delta) guarantee is refuted with confidence 1 - beta), 2 on bad input.  The experiment is
``dpdist.eval.canary_audit``; the bound ``dpdist.privacy.empirical_audit``.
"""
from __future__ import annotations

import sys

from ..config import ConfigError, load_config
from ..eval.canary_audit import AuditResult, audit_one_run


def add_arguments(parser) -> None:
    group = parser.add_argument_group("empirical audit (with --empirical; --batch and --seq-len are not used, "
                                      "sequences are data.seq_len tokens, --seed draws the canaries and coins)")
    group.add_argument("--empirical", action="store_true",
                       help="train once with planted canaries and bound epsilon from below (Steinke et al. 2023)")
    group.add_argument("--canaries", type=int, default=256, help="canaries m, each trained on with probability 1/2")
    group.add_argument("--ordinary", type=int, default=None, help="ordinary sequences, always trained on (default m)")
    group.add_argument("--k-plus", type=int, default=None, help="how many top scores to guess 'in' (default m/4)")
    group.add_argument("--k-minus", type=int, default=None, help="how many bottom scores to guess 'out' (default m/4)")
    group.add_argument("--beta", type=float, default=0.05, help="the bound holds with confidence 1 - beta")


def _input_error(canaries: int, ordinary: int, k_plus: int, k_minus: int, beta: float) -> str | None:
    if canaries < 1 or ordinary < 1:  # ordinary sequences keep the training set non-empty whatever the coins
        return f"--canaries and --ordinary must be >= 1; got {canaries} and {ordinary}"
    if k_plus < 0 or k_minus < 0 or not 1 <= k_plus + k_minus <= canaries:
        return (f"--k-plus and --k-minus must be >= 0 with 1 <= k-plus + k-minus <= --canaries ({canaries}); "
                f"got {k_plus} and {k_minus}")
    if not 0 < beta < 1:
        return f"--beta must be in (0, 1); got {beta}"
    return None


def report(result: AuditResult) -> str:
    r = result
    confidence = f"{100 * (1 - r.beta):g}%"
    lines = [
        "empirical privacy audit from one training run (Steinke, Nasr & Jagielski 2023)",
        f"  data:     {r.canaries} random-token canaries ({r.included} trained on, by a fair coin each) "
        f"+ {r.ordinary} ordinary sequences, {r.seq_len} tokens each",
        f"  run:      {r.steps} steps, sample rate {r.sample_rate:.4g}, noise multiplier {r.noise_multiplier:.4g}, "
        f"clip {r.clip_norm:g}",
        f"  guesses:  'in' for the {r.k_plus} largest loss drops, 'out' for the {r.k_minus} smallest: "
        f"{r.correct} of {r.made} correct",
        f"  accountant epsilon ({r.accountant}, delta {r.delta:.3g}):  {r.epsilon:.4f}",
        f"  empirical lower bound ({confidence} confidence, same delta):  {r.lower_bound:.4f}  "
        f"(at most {r.ceiling:.4f} with {r.made} guesses all correct)",
    ]
    if r.violated:
        lines.append(f"FAIL: the lower bound exceeds the accountant's epsilon: the run is not "
                     f"({r.epsilon:.4g}, {r.delta:.3g})-DP, with confidence {confidence}")
    else:
        lines.append("ok: the lower bound does not exceed the accountant's epsilon (a lower bound: this does not "
                     "prove the guarantee)")
    return "\n".join(lines)


def run(args) -> int:
    m = args.canaries
    ordinary = m if args.ordinary is None else args.ordinary
    k_plus = m // 4 if args.k_plus is None else args.k_plus
    k_minus = m // 4 if args.k_minus is None else args.k_minus
    try:
        error = _input_error(m, ordinary, k_plus, k_minus, args.beta)
        if error:
            raise ConfigError(error)
        cfg = load_config(args.config, args.overrides)
        result = audit_one_run(cfg, m, ordinary, args.seed, k_plus, k_minus, args.beta)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 1 if result.violated else 0
