"""``dpdist bench``: what DP costs, measured, next to the floor the cost model says it cannot beat.

For one model and one batch, on this machine, in one run: the non-private step, the dpdist DP step
(for one or several memory budgets) and, when Opacus is installed, Opacus ghost clipping on an
equivalent untied plain-torch model.  Every mode runs in a fresh Python process (``python -m
dpdist.bench.worker SPEC``) because peak RSS (``ru_maxrss``) is per process and only ever grows.

Reported per mode: mean and min step time over the steps after the first (warm-up) one, and the peak
RSS minus the RSS measured after the model, the batch, the optimizer (and the DP engine or Opacus
wrapper) were built.  The FLOP floor of the DP/non-private ratio is
``(nonprivate_step_flops + plan.extra_flops) / nonprivate_step_flops``: the extra matmul work the
per-example norms of the chosen per-layer strategies need (the norm rules' own cost model), over the
analytic FLOPs of a non-private step.  Times and ratios are only comparable within one run.

Unless turned off, each budget also runs one process in which the non-private and the DP step
alternate (``paired_ratio``: the median DP / non-private ratio of adjacent steps over all rounds),
which a slow patch of a shared machine cannot bias towards one side.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import torch

from .config import NONE, UNLIMITED, BenchConfig, budget_label, describe, nonprivate_step_flops, parse_budget
from .worker import RESULT_TAG

# Opacus runs on its own plain-torch copy of the tied GPT (``opacus_model.PlainGPT``), fully trained
OPACUS_SKIPPED = "skipped with --arch llama or --lora: its comparison model is the plain tied GPT, fully trained"
MEMORY_MEASURE = ("peak RSS (ru_maxrss) minus the RSS after building model, batch, optimizer and DP wrapper, per fresh "
                  "process; with --rounds, the largest over rounds")


def run_mode(cfg: BenchConfig, mode: str, **extra) -> dict:
    """Run one mode in a fresh ``python -m dpdist.bench.worker`` process; its measurements as a dict."""
    spec = {"config": dataclasses.asdict(cfg), "mode": mode, **extra}
    proc = subprocess.run([sys.executable, "-m", "dpdist.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker for mode {mode!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def opacus_available() -> bool:
    return importlib.util.find_spec("opacus") is not None


def _dp_row(cfg: BenchConfig, base: dict, result: dict, clipping: str, budget, floor_base: float,
            paired: list[float] | None) -> dict:
    return {"clipping": clipping, "budget": budget_label(budget, clipping),
            "paired_ratio": statistics.median(paired) if paired else None, "paired_ratios": paired,
            "memory_budget_mb": budget if isinstance(budget, float) else (None if budget == NONE else UNLIMITED),
            "step_s": result["step_s"], "step_min_s": result["step_min_s"],
            "ratio": result["step_s"] / base["step_s"], "ratio_min": result["step_min_s"] / base["step_min_s"],
            "peak_mb": result["peak_mb"], "memory_ratio": result["peak_mb"] / base["peak_mb"],
            "flop_floor_ratio": (floor_base + result["extra_flops"]) / floor_base,
            "ratio_over_floor": result["step_s"] / base["step_s"] / ((floor_base + result["extra_flops"]) / floor_base),
            "strategies": result["strategies"], "plan_kept_mb": result["plan_kept_mb"],
            "microbatch_s": result.get("microbatch_s"), "release_and_update_s": result.get("release_and_update_s"),
            "cpu_utilisation": result["cpu_utilisation"], "step_times_s": result["step_times_s"],
            "peak_mb_rounds": result["peak_mb_rounds"],
            "other_processes_cpu_share": result["other_processes_cpu_share"]}


def run_benchmark(cfg: BenchConfig, *, clipping: str = "flat", budget="none", budgets=None, opacus: bool = True,
                  rounds: int = 1, paired: bool = True, log=None) -> dict:
    """Measure every mode (each in a fresh process) and return one dict (the ``--json`` object).

    ``clipping``: ``flat``, ``per_layer`` or ``automatic``; ``budget``: the main memory budget
    (see ``parse_budget``); ``budgets``: optional list of budgets for the frontier table; ``opacus``:
    also run Opacus ghost clipping (and its own non-private reference) when Opacus is installed.
    ``rounds``: run the whole sequence of modes this many times, interleaved, and keep for each mode
    the round with the lowest mean step time (on a shared machine, the least disturbed one).
    ``paired``: also time each budget's DP step against the non-private step in one process, step by
    step (``steps.setup_paired``); ``paired_ratio`` is the median of those ratios over all rounds.
    """
    cfg.validate()
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    say = log or (lambda message: None)
    budget = parse_budget(budget)
    sweep = [parse_budget(b) for b in budgets] if budgets else []
    floor_base = nonprivate_step_flops(cfg)
    comparable = cfg.arch == "gpt" and not cfg.lora_rank
    use_opacus = opacus and comparable and opacus_available()

    modes = [("nonprivate", "non-private step", {})]
    for b in [budget] + [b for b in sweep if b != budget]:
        modes.append((("dp", b), f"dpdist DP step, {clipping} clipping, memory budget {budget_label(b, clipping)}",
                      {"clipping": clipping, "budget": b}))
        if paired:
            modes.append((("paired", b), f"non-private and DP steps alternating in one process, budget "
                          f"{budget_label(b, clipping)}", {"clipping": clipping, "budget": b}))
    if use_opacus:
        modes.append(("plain_nonprivate", "plain-torch untied model, non-private (Opacus's reference)", {}))
        modes.append(("opacus_ghost", "Opacus ghost clipping on the untied plain-torch model", {}))
    best: dict = {}
    peaks: dict = {}
    pairs: dict = {}
    for round_index in range(rounds):
        for key, text, extra in modes:
            say(f"[{round_index + 1}/{rounds}] {text} ...")
            result = run_mode(cfg, key[0] if isinstance(key, tuple) else key, **extra)
            if isinstance(key, tuple) and key[0] == "paired":
                pairs.setdefault(key[1], []).extend(result["paired_ratios"])
                continue
            peaks.setdefault(key, []).append(result["peak_mb"])
            if key not in best or result["step_s"] < best[key]["step_s"]:
                best[key] = result
    for key, result in best.items():  # time from the fastest round, memory the largest over rounds
        result["peak_mb"], result["peak_mb_rounds"] = max(peaks[key]), peaks[key]

    base = best["nonprivate"]
    dp_results = {b: _dp_row(cfg, base, best[("dp", b)], clipping, b, floor_base, pairs.get(b))
                  for b in [budget] + sweep}
    main = dp_results[budget]
    out = {
        "config": dataclasses.asdict(cfg), "clipping": clipping, "budget": main["budget"],
        "memory_budget_mb": main["memory_budget_mb"], "threads": base["threads"], "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "rounds": rounds, "params": base["params"], "memory_measure": MEMORY_MEASURE,
        "model": describe(cfg, base["params"], base["trainable_params"]), "trainable_params": base["trainable_params"],
        "nonprivate_flops": floor_base,
        "nonprivate_step_s": base["step_s"], "nonprivate_step_min_s": base["step_min_s"],
        "nonprivate_peak_mb": base["peak_mb"], "nonprivate_baseline_rss_mb": base["baseline_rss_mb"],
        "nonprivate_peak_rss_mb": base["peak_rss_mb"], "nonprivate_peak_mb_rounds": base["peak_mb_rounds"],
        "dp_step_s": main["step_s"], "dp_step_min_s": main["step_min_s"], "dp_peak_mb": main["peak_mb"],
        "ratio": main["ratio"], "ratio_min": main["ratio_min"], "paired_ratio": main["paired_ratio"],
        "paired_ratios": main["paired_ratios"], "memory_ratio": main["memory_ratio"],
        "flop_floor_ratio": main["flop_floor_ratio"], "ratio_over_floor": main["ratio_over_floor"],
        "strategies": main["strategies"],
        "plan_kept_mb": main["plan_kept_mb"], "dp_microbatch_s": main["microbatch_s"],
        "dp_release_and_update_s": main["release_and_update_s"],
        "nonprivate_step_times_s": base["step_times_s"], "dp_step_times_s": main["step_times_s"],
        "cpu_utilisation": {"nonprivate": base["cpu_utilisation"], "dp": main["cpu_utilisation"]},
        "load_average_start": base["load_average_start"],
        "other_processes_cpu_share": {"nonprivate": base["other_processes_cpu_share"],
                                      "dp": main["other_processes_cpu_share"]},
    }
    if sweep:
        out["frontier"] = [dp_results[b] for b in sweep]
    if use_opacus:
        plain, ghost = best["plain_nonprivate"], best["opacus_ghost"]
        out.update({
            "opacus_params": ghost["params"],
            "plain_nonprivate_step_s": plain["step_s"], "plain_nonprivate_peak_mb": plain["peak_mb"],
            "opacus_step_s": ghost["step_s"], "opacus_step_min_s": ghost["step_min_s"], "opacus_peak_mb": ghost["peak_mb"],
            "opacus_peak_mb_rounds": ghost["peak_mb_rounds"],
            "opacus_ratio": ghost["step_s"] / base["step_s"],
            "opacus_ratio_vs_plain": ghost["step_s"] / plain["step_s"],
            "opacus_memory_ratio": ghost["peak_mb"] / base["peak_mb"],
        })
        out["cpu_utilisation"].update(plain_nonprivate=plain["cpu_utilisation"], opacus_ghost=ghost["cpu_utilisation"])
        out["other_processes_cpu_share"].update(plain_nonprivate=plain["other_processes_cpu_share"],
                                                opacus_ghost=ghost["other_processes_cpu_share"])
    elif opacus and not comparable:
        out["opacus"] = OPACUS_SKIPPED
    elif opacus:
        out["opacus"] = "not installed"
    return out
