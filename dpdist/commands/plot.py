"""``dpdist plot RUN_DIR [--out PATH]``: the run's training loss and epsilon over steps, as a PNG.

Reads ``RUN_DIR/metrics.jsonl`` (rank 0's log, one record per ``train.log_every`` steps) and draws
two panels sharing the step axis.  A step logged twice (a resume after a crash computes the steps
since the last checkpoint again) is drawn with its latest record, the one the run continued from.
matplotlib's Agg backend renders without a display, so this works on a login node.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..config import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="draw a run's loss and epsilon over steps (metrics.jsonl) as a PNG")
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="output PNG (default: RUN_DIR/metrics.png)")
    parser.set_defaults(func=run)


def read_metrics(run_dir: Path) -> list[dict]:
    """The logged records, one per step (the latest where a step was logged twice), by step."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir} is not a directory; give a dpdist run directory")
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; a run writes it at its first log (train.log_every steps)")
    by_step = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} line {number} is not a metrics record (JSON with a step)") from None
    if not by_step:
        raise ConfigError(f"{path} holds no records yet; plot after the first log")
    return [by_step[step] for step in sorted(by_step)]


def plot(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("dpdist plot needs matplotlib: pip install matplotlib (or 'dpdist[plot]')") from None
    records = read_metrics(run_dir)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, (loss_axes, epsilon_axes) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    loss_axes.plot(steps, [r["loss"] for r in records], marker=".")
    loss_axes.set_ylabel("training loss")
    loss_axes.set_title(Path(run_dir).resolve().name)
    private = [(s, r["epsilon"]) for s, r in zip(steps, records) if math.isfinite(r["epsilon"])]
    if private:
        epsilon_axes.plot(*zip(*private), marker=".", color="tab:red")
    else:  # privacy.enabled=false logs epsilon = inf
        epsilon_axes.text(0.5, 0.5, "trained without differential privacy", ha="center", va="center",
                          transform=epsilon_axes.transAxes)
    epsilon_axes.set_ylabel("epsilon")
    epsilon_axes.set_xlabel("step")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out


def run(args) -> int:
    out = args.out or args.run_dir / "metrics.png"
    try:
        plot(args.run_dir, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
