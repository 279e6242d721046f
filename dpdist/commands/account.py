"""``dpdist account``: epsilon for a noise multiplier, or the noise multiplier for a target epsilon.

Both with PLD (the headline) and RDP (alongside), for Poisson-sampled DP-SGD with add/remove-one
adjacency, so a run can be planned before any process starts.  A Re-Attention run with ``dp`` token
frequencies also spends one Gaussian release before its first step; ``--reattention-frequency-noise``
composes it exactly as training does (``dpdist.train.reattention.release_history``), and without it the numbers are
those of the steps alone, which the output then says.
"""
from __future__ import annotations

import json
import math
import sys

from ..privacy import accounting
from ..privacy.frequencies import release_entry


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("account", help="epsilon for sigma, or sigma for a target epsilon (PLD and RDP)")
    parser.add_argument("--noise-multiplier", type=float, help="sigma: noise std on the clipped sum / clip norm")
    parser.add_argument("--target-epsilon", type=float, help="calibrate sigma to reach this epsilon")
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q = B / N")
    parser.add_argument("--steps", type=int, required=True, help="number of DP steps")
    parser.add_argument("--delta", type=float, required=True, help="delta, usually below 1/N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reattention-frequency-noise", type=float, metavar="SIGMA_H",
                        help="also count Re-Attention's token-frequency release (reattention.enabled=true with "
                             "reattention.frequencies=dp): one Gaussian release at this noise multiplier "
                             "(reattention.frequency_noise), as training charges it; without this option it "
                             "is not counted")
    parser.set_defaults(func=run)


def _input_error(args) -> str | None:
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        return "give exactly one of --noise-multiplier and --target-epsilon"
    if not 0 < args.sample_rate <= 1:
        return f"--sample-rate must be in (0, 1]; got {args.sample_rate}"
    if args.steps < 0:
        return f"--steps must be >= 0; got {args.steps}"
    if not 0 < args.delta < 1:
        return f"--delta must be in (0, 1); got {args.delta}"
    if args.noise_multiplier is not None and not 0 <= args.noise_multiplier < math.inf:
        return f"--noise-multiplier must be >= 0 and finite; got {args.noise_multiplier}"
    if args.target_epsilon is not None and not 0 < args.target_epsilon <= accounting.MAX_EPSILON:
        return (f"--target-epsilon must be in (0, {accounting.MAX_EPSILON:g}]; got {args.target_epsilon:g} (past "
                f"{accounting.MAX_EPSILON:g} no guarantee is left and the PLD accountant runs out of memory)")
    if args.reattention_frequency_noise is not None and not 0 < args.reattention_frequency_noise < math.inf:
        return f"--reattention-frequency-noise must be > 0 and finite; got {args.reattention_frequency_noise}"
    return _reach_error(args)


def _reach_error(args) -> str | None:
    """Like ``dpdist train`` (``plan.check_reach``): a sigma whose RDP epsilon is past MAX_EPSILON is
    refused before the PLD accountant tries it."""
    if not args.noise_multiplier or not args.steps:
        return None  # sigma 0 is an infinite epsilon and 0 steps spend nothing, with no accountant run
    limit = accounting.MAX_EPSILON
    spent = accounting.epsilon(args.sample_rate, args.noise_multiplier, args.steps, args.delta, accountant="rdp")
    if spent <= limit:
        return None
    floor = accounting.noise_floor(args.sample_rate, args.steps, args.delta)
    return (f"--noise-multiplier {args.noise_multiplier:g} spends epsilon {spent:.5g} (RDP) over {args.steps} steps, past "
            f"{limit:g}: no guarantee is left and the PLD accountant cannot compute it; use at least {floor:.4g}")


def run(args) -> int:
    try:
        error = _input_error(args)
        result, text = (None, None) if error else _account(args)
    except accounting.OutOfReach as exc:
        error = str(exc)
    except ValueError as exc:  # a target the Re-Attention release alone already exceeds
        error = f"--target-epsilon {args.target_epsilon:g} cannot be reached: {exc}"
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        sigma_h = args.reattention_frequency_noise
        release = (f" after Re-Attention's token-frequency release (sigma_h {sigma_h:g})" if sigma_h is not None else
                   " (steps only, no Re-Attention token-frequency release)")
        print(f"{text} at delta {args.delta:g}, sample rate {args.sample_rate:g}, {args.steps} steps{release}")
    return 0


def _account(args) -> tuple[dict, str]:
    """The JSON result and its one-line text."""
    sigma_h = args.reattention_frequency_noise
    prior = release_entry(sigma_h) if sigma_h is not None else []
    result = {"sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta,
              "reattention_frequency_noise": sigma_h}
    if args.noise_multiplier is not None:
        result["noise_multiplier"] = args.noise_multiplier
        for name in ("pld", "rdp"):
            result[f"epsilon_{name}"] = accounting.epsilon(args.sample_rate, args.noise_multiplier, args.steps,
                                                           args.delta, accountant=name, prior=prior)
        return result, f"epsilon {result['epsilon_pld']:.4f} (PLD), {result['epsilon_rdp']:.4f} (RDP)"
    result["target_epsilon"] = args.target_epsilon
    for name in ("pld", "rdp"):
        result[f"noise_multiplier_{name}"] = accounting.calibrate_noise_multiplier(
            args.target_epsilon, args.sample_rate, args.steps, args.delta, accountant=name, prior=prior)
    return result, (f"noise multiplier {result['noise_multiplier_pld']:.4f} (PLD), "
                    f"{result['noise_multiplier_rdp']:.4f} (RDP) for epsilon {args.target_epsilon:g}")
