"""``dpdist account``: epsilon for a noise multiplier, or the noise multiplier for a target epsilon.

Both with PLD (the headline) and RDP (alongside), for Poisson-sampled DP-SGD with add/remove-one
adjacency, so a run can be planned before any process starts.  A Re-Attention run with ``dp`` token
frequencies also spends one Gaussian release before its first step; ``--reattention-frequency-noise``
composes it exactly as training does (``frequencies.release_history``), and without it the numbers are
those of the steps alone, which the output then says.
"""
from __future__ import annotations

import json
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
    parser.add_argument("--reattention-frequency-noise", type=float, metavar="SIGMA_H",
                        help="also count Re-Attention's token-frequency release (model.reattention=true with "
                             "model.reattention_frequencies=dp): one Gaussian release at this noise multiplier "
                             "(model.reattention_frequency_noise), as training charges it; without this option it "
                             "is not counted")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
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
    if args.noise_multiplier is not None and not args.noise_multiplier >= 0:
        return f"--noise-multiplier must be >= 0; got {args.noise_multiplier}"
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        return f"--target-epsilon must be > 0; got {args.target_epsilon}"
    if args.reattention_frequency_noise is not None and not args.reattention_frequency_noise > 0:
        return f"--reattention-frequency-noise must be > 0; got {args.reattention_frequency_noise}"
    return None


def run(args) -> int:
    error = _input_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sigma_h = args.reattention_frequency_noise
    prior = release_entry(sigma_h) if sigma_h is not None else []
    result = {"sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta,
              "reattention_frequency_noise": sigma_h}
    if args.noise_multiplier is not None:
        result["noise_multiplier"] = args.noise_multiplier
        for name in ("pld", "rdp"):
            result[f"epsilon_{name}"] = accounting.epsilon(args.sample_rate, args.noise_multiplier, args.steps,
                                                           args.delta, accountant=name, prior=prior)
        text = f"epsilon {result['epsilon_pld']:.4f} (PLD), {result['epsilon_rdp']:.4f} (RDP)"
    else:
        result["target_epsilon"] = args.target_epsilon
        try:
            for name in ("pld", "rdp"):
                result[f"noise_multiplier_{name}"] = accounting.calibrate_noise_multiplier(
                    args.target_epsilon, args.sample_rate, args.steps, args.delta, accountant=name, prior=prior)
        except ValueError as exc:
            print(f"error: --target-epsilon {args.target_epsilon:g} cannot be reached: {exc}", file=sys.stderr)
            return 2
        text = (f"noise multiplier {result['noise_multiplier_pld']:.4f} (PLD), "
                f"{result['noise_multiplier_rdp']:.4f} (RDP) for epsilon {args.target_epsilon:g}")
    release = (f" after Re-Attention's token-frequency release (sigma_h {sigma_h:g})" if sigma_h is not None else
               " (steps only, no Re-Attention token-frequency release)")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{text} at delta {args.delta:g}, sample rate {args.sample_rate:g}, {args.steps} steps{release}")
    return 0
