"""``dpdist plan --config FILE [key=value ...] [--hardware NAME] [--json]``: will this run fit, how long a step takes.

Builds the model on the meta device (no memory, no corpus read) and prints, per rank, the memory terms
and their peak, the FLOPs per step (non-private and DP), the bytes each collective moves and the
predicted step time, for the config's layout and for the other layouts of its device count; a run
that does not fit gets the largest term named and the smallest change that fits (``dpdist.plan``).
Exit status 0 when the run fits, 1 when it does not, 2 for a refused input.
"""
from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    from ..plan.hardware import DEFAULT_EFFICIENCY, NAMES

    parser = subparsers.add_parser("plan", help="predict memory, FLOPs, communication and step time per rank")
    parser.add_argument("--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2")
    parser.add_argument("--hardware", choices=NAMES, default=None,
                        help="the device (default: h100-80gb when parallel.device=cuda, else cpu)")
    parser.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                        help=f"fraction of peak FLOP/s, bandwidth and link rate a step reaches (default {DEFAULT_EFFICIENCY})")
    parser.add_argument("--fastest", action="store_true",
                        help="also search layouts, micro-batch, checkpointing and norm budget for the fastest step that fits")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run)


def plan(config: str | None, overrides: list[str], hardware_name: str | None = None, efficiency: float | None = None,
         fastest: bool = False) -> dict:
    """The plan's JSON object for a config file and overrides (what ``--json`` prints)."""
    from ..config import load_config
    from ..plan.hardware import DEFAULT_EFFICIENCY, hardware
    from ..plan.report import to_json
    from ..plan.search import Planner

    efficiency = DEFAULT_EFFICIENCY if efficiency is None else efficiency
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency must be in (0, 1]; got {efficiency}")
    cfg = load_config(config, overrides)
    hw = hardware(hardware_name or ("h100-80gb" if cfg.parallel.device == "cuda" else "cpu"))
    planner = Planner(cfg, hw, efficiency)
    run_row = planner.evaluate(cfg)
    change = None if run_row.fits else planner.smallest_fitting_change()
    params = planner.shard(1).params
    best = (planner.fastest_fitting(),) if fastest else ()
    return to_json(run_row, planner.layouts(), change, hw, efficiency, planner.vocab, params, best)


def run(args) -> int:
    from ..config import ConfigError
    from ..plan.report import format_report

    try:
        out = plan(args.config, args.overrides, args.hardware, args.efficiency, args.fastest)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else format_report(out))
    return 0 if out["fits"] else 1
