"""One benchmark mode in this fresh process: ``python -m dpdist.bench.worker '<json spec>'`` prints one
``RESULT_TAG`` line with the mode's step times, peak memory and CPU share.  Peak RSS (``ru_maxrss``) is
per process and only ever grows, hence one process per mode."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from . import steps
from .config import BenchConfig, parse_budget
from .machine import current_rss_mb, machine_busy_s, peak_rss_mb

RESULT_TAG = "DPDIST_BENCH_RESULT "


def run_worker(spec: dict) -> dict:
    """Run ``spec["mode"]`` for ``cfg.steps`` steps in this process and return its measurements."""
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = BenchConfig(**spec["config"])
    torch.manual_seed(cfg.seed)
    mode = spec["mode"]
    if mode == "nonprivate":
        step, info = steps.setup_nonprivate(cfg)
    elif mode == "dp":
        step, info = steps.setup_dp(cfg, spec["clipping"], parse_budget(spec["budget"]))
    elif mode == "paired":
        step, info = steps.setup_paired(cfg, spec["clipping"], parse_budget(spec["budget"]))
    elif mode == "plain_nonprivate":
        step, info = steps.setup_plain_nonprivate(cfg)
    elif mode == "opacus_ghost":
        step, info = steps.setup_opacus(cfg)
    else:
        raise ValueError(f"unknown bench mode {mode!r}")
    baseline = current_rss_mb()
    times, cpu_times, parts = [], [], {}
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for index in range(cfg.steps):
        if index == 1:
            busy_start = machine_busy_s()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(index, parts)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    busy_end = machine_busy_s()
    peak = peak_rss_mb()
    timed = times[1:]
    others = None
    if busy_start is not None and busy_end is not None:
        # the share of the machine's cores that other processes used during the timed steps
        others = max(0.0, (busy_end - busy_start) - sum(cpu_times[1:])) / (sum(timed) * (os.cpu_count() or 1))
    result = {"mode": mode, "step_s": sum(timed) / len(timed), "step_min_s": min(timed), "first_step_s": times[0],
              "step_times_s": times, "peak_mb": peak - baseline, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
              "threads": torch.get_num_threads(), "load_average_start": load_start,
              # CPU seconds per wall second of the timed steps: near the thread count on an idle machine,
              # lower when other processes take the cores (then the times are inflated)
              "cpu_utilisation": sum(cpu_times[1:]) / sum(timed), "other_processes_cpu_share": others, **info}
    for name, values in parts.items():  # the first step is warm-up here too
        result[name] = values[1:] if name == "paired_ratios" else sum(values[1:]) / len(values[1:])
    return result


if __name__ == "__main__":  # worker entry point: python -m dpdist.bench.worker '<json spec>'
    print(RESULT_TAG + json.dumps(run_worker(json.loads(sys.argv[1]))), flush=True)
