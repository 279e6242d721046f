"""``dpdist audit --config FILE``: check the DP claims on that config's model and print a table.

In float64 on one process: the engine's per-example norms (every strategy, both modes) against
brute-force per-example gradients; its clipped sums likewise; and the sensitivity bound (removing any
one example moves the pre-noise clipped sum by at most C, for every clipping method).  When the config
trains in another precision (``model.dtype``, ``train.precision``), the sensitivity bound is checked again
in that precision on a batch of near-duplicate examples, whose clipped sum is about batch x C: rounding it below fp32
is what breaks the bound.  Exits non-zero if any check fails.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from .. import audit
from . import audit_empirical
from ..config import ConfigError, load_config
from ..model import build_model
from ..train.precision import apply_precision

NORM_TOLERANCE = 1e-9
# The sensitivity bound in a training precision: fp32 sums of bf16 per-example gradients are exact to
# about batch x 2^-24 relative, far inside this.
PRECISION_TOLERANCE = 1e-3
PRECISION_BATCH = 512


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("audit", help="check per-example norms, clipping and sensitivity on a config's model")
    parser.add_argument("--config", help="YAML run config whose model is audited")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=2")
    parser.add_argument("--batch", type=int, default=4, help="examples in the audit batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: min(data.seq_len, 32))")
    parser.add_argument("--seed", type=int, default=0)
    audit_empirical.add_arguments(parser)
    parser.set_defaults(func=run)


def audit_batch(vocab_size: int, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with a repeated token and ignored labels, the cases norm rules get wrong."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    labels = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    input_ids[0, 1::3] = input_ids[0, 0]
    labels[-1, : seq_len // 2] = -100
    return input_ids, labels


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def run_checks(model, input_ids, labels) -> list[tuple[str, float, float, bool]]:
    """(check, measured, bound, passed) rows."""
    reference = audit.brute_force_grads(model, input_ids, labels)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in reference.values()))
    rows = []
    for mode in ("bookkeeping", "two_pass"):
        for strategy in ("ghost", "materialise", None):
            norms = audit.per_example_norms(model, input_ids, labels, mode=mode, strategy=strategy)
            err = _relative(norms, ref_norms)
            rows.append((f"norms {mode}/{strategy or 'mixed rule'}", err, NORM_TOLERANCE, err < NORM_TOLERANCE))
    clip = float(ref_norms[ref_norms > 0].median())  # clips about half of the examples
    factors = torch.clamp(clip / (ref_norms + 1e-6), max=1.0)
    for mode in ("bookkeeping", "two_pass"):
        sums = audit.clipped_sum(model, input_ids, labels, clip, mode=mode)
        err = max(_relative(sums[n], torch.einsum("b,b...->...", factors, g)) for n, g in reference.items())
        rows.append((f"clipped sum {mode}", err, NORM_TOLERANCE, err < NORM_TOLERANCE))
    for clipping in ("flat", "automatic", "per_layer"):
        full = audit.clipped_sum(model, input_ids, labels, clip, clipping=clipping)
        worst = 0.0
        for removed in range(input_ids.shape[0]):
            neighbour = labels.clone()
            neighbour[removed] = -100  # an example with no target tokens contributes nothing: removal
            sums = audit.clipped_sum(model, input_ids, neighbour, clip, clipping=clipping)
            worst = max(worst, float(torch.sqrt(sum((full[n] - sums[n]).pow(2).sum() for n in full))))
        rows.append((f"sensitivity {clipping} (max shift / C)", worst / clip, 1.0, worst <= clip * (1 + 1e-9)))
    return rows


def precision_checks(model, precision: str, vocab_size: int, clip_norm: float, seq_len: int, seed: int,
                     batch: int = PRECISION_BATCH, removed: int = 3) -> list[tuple[str, float, float, bool]]:
    """Sensitivity rows in the precision ``model`` computes in (named ``precision``): removing one of
    ``batch`` near-duplicates moves the pre-noise clipped sum by at most C (1 + PRECISION_TOLERANCE), for
    every clipping method."""
    input_ids, labels = audit.near_duplicates(vocab_size, batch, seq_len, seed)
    rows = []
    for clipping in ("flat", "automatic", "per_layer"):
        shift = audit.removal_shift(model, input_ids, labels, clip_norm, range(removed), clipping=clipping)
        rows.append((f"sensitivity {clipping} in {precision}, {batch} near-duplicates (max shift / C)", shift, 1.0,
                     shift <= 1 + PRECISION_TOLERANCE))
    return rows


def run(args) -> int:
    if args.empirical:
        return audit_empirical.run(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seq_len = args.seq_len if args.seq_len is not None else min(cfg.data.seq_len, 32)
    if not 2 <= seq_len <= cfg.model.max_seq_len or args.batch < 2:
        print(f"error: --seq-len must be in [2, model.max_seq_len = {cfg.model.max_seq_len}] and --batch >= 2; got "
              f"{seq_len} and {args.batch}", file=sys.stderr)
        return 2
    model = build_model(dataclasses.replace(cfg.model, dtype="float64"))
    input_ids, labels = audit_batch(cfg.model.vocab_size, args.batch, seq_len, args.seed)
    rows = run_checks(model, input_ids, labels)
    if cfg.model.dtype != "float64" or cfg.train.precision != "fp32":
        model = build_model(cfg.model)
        apply_precision(cfg.train.precision, model, "cpu")  # bf16 compute on the fp32 weights, as in training
        precision = "bf16 compute" if cfg.train.precision == "bf16" else cfg.model.dtype
        rows += precision_checks(model, precision, cfg.model.vocab_size, cfg.privacy.clip_norm, seq_len, args.seed)
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'measured':>10}  {'bound':>8}  result")
    for name, measured, bound, passed in rows:
        print(f"{name:<{width}}  {measured:>10.2e}  {bound:>8.1e}  {'ok' if passed else 'FAIL'}")
    failed = [r[0] for r in rows if not r[3]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
