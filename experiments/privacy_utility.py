"""Privacy-utility experiment (issue 6): the DP methods at one (epsilon, delta) and one compute budget.

Every method trains the same model for the same number of steps at the same expected batch size on
the same task, over several seeds; the private ones spend the same epsilon at the same delta (sigma
is calibrated by ``privacy.target_epsilon``).  Methods:

  nonprivate   privacy.enabled=false (no guarantee; the utility ceiling)
  dp           plain DP-SGD (flat clipping, Gaussian noise)
  lsg          DP-SGD + low-rank/sparse gradients (lsg.enabled=true)
  anadp        DP-SGD + adaptive noise allocation (anadp.enabled=true, with the per-layer clipping it needs)
  reattention  DP-SGD + Re-Attention (reattention.enabled=true)

Tasks: ``text`` (the embedded corpus; validation perplexity, and canary exposure when ``dpdist eval``
exists) and ``items`` (the generated long-tailed next-item task, ``data.source=zipf_items``;
validation perplexity, NDCG@10 and HIT@10 over a full ranking of all items, plus a popularity
baseline).  Each run is a real ``dpdist train`` subprocess with ``parallel.data=1``.

No hyperparameter is tuned, on the evaluation split or otherwise: every method uses the fixed
defaults below, chosen before any run, and the held-out split is only used for the final numbers.
The seed varies the model initialisation and the sampling/noise stream (``privacy.seed``, fixed so a
run can be reproduced, which is why dpdist warns that these particular models carry no guarantee: the
epsilon is what the same run spends with a secret seed); the task (corpus, item catalogue and
sequences) is the same for every run.  Validation perplexity is the training loop's (the first 512
held-out sequences), the ranking uses all 1000 held-out item sequences.

    .venv/bin/python experiments/privacy_utility.py --methods dp,nonprivate --seeds 3 --out results/pu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpdist.config import load_config  # noqa: E402
from dpdist.data.dataset import prepare_data  # noqa: E402
from dpdist.eval.ranking import model_ranking, popularity_ranking  # noqa: E402
from dpdist.eval.weights import load_model  # noqa: E402

METHODS = {
    "nonprivate": ["privacy.enabled=false"],
    "dp": [],
    "lsg": ["lsg.enabled=true"],
    "anadp": ["anadp.enabled=true", "privacy.clipping=per_layer"],  # noise is allocated per clipped layer group
    "reattention": ["reattention.enabled=true"],
}
TASKS = {
    "text": ["data.source=text", "data.max_corpus_mb=1", "data.vocab_size=1024"],
    "items": ["data.source=zipf_items", "data.val_fraction=0.05"],  # 20000 sequences of 2000 items (defaults)
}
METRICS = {"text": ["val_perplexity", "exposure", "exposure_most_inserted"],
           "items": ["val_perplexity", "ndcg@10", "hit@10"]}
EVAL_COMMAND = REPO / "dpdist" / "commands" / "eval.py"
RANKED_SEQUENCES = 1000  # validation sequences ranked per items run (all of them at val_fraction 0.05)
# One torch thread per run: at this model size the thread pool costs more than it gives (measured on the
# 2-core machine: 0.17 s per non-private step with 1 thread, 2.1 s with 2 under load); use --jobs for the cores.
RUN_ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
LABELS = {"val_perplexity": "val perplexity", "ndcg@10": "NDCG@10", "hit@10": "HIT@10",
          "exposure": "exposure, all canaries (bits)",
          "exposure_most_inserted": "exposure, most-inserted canaries (bits)"}


class RunFailed(RuntimeError):
    """A training subprocess failed; the message holds the end of its log."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (task, method): 0 .. N-1")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon; delta is 1/(10 N) for N examples")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "dpdist"), help="the token/item cache (shared)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one core each); 2 on an idle 2-core machine")
    parser.add_argument("--out", type=Path, required=True, help="new folder for runs, logs, results.json, results.md")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every run (repeatable), e.g. privacy.clipping=per_layer")
    args = parser.parse_args(argv)
    args.methods, args.tasks = _subset(parser, args.methods, METHODS), _subset(parser, args.tasks, TASKS)
    if args.seeds < 1 or args.jobs < 1 or (args.out.exists() and any(args.out.iterdir())):
        parser.error("--seeds and --jobs must be >= 1 and --out a new or empty folder (runs are never overwritten)")
    return args


def _subset(parser, text: str, known: dict) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        parser.error(f"unknown or empty choice {', '.join(unknown)}; pick from {', '.join(known)}")
    return chosen


def common_overrides(args) -> list[str]:
    """The fixed setup every run shares: model, compute, privacy target, one process."""
    return [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
            f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}", f"data.cache_dir={args.cache_dir}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.micro_batch_size=64",
            f"train.lr={args.lr}", "train.optimizer=adamw", "train.checkpoint_every=0", "train.progress=false",
            f"train.log_every={max(1, args.steps // 10)}", f"privacy.target_epsilon={args.epsilon}",
            "privacy.noise_multiplier=null", "privacy.delta=null", "privacy.clip_norm=1.0", "parallel.data=1",
            "parallel.tensor=1"]


def train_run(args, task: str, method: str, seed: int) -> dict:
    """One ``dpdist train`` subprocess; its output goes to ``logs/<name>.log``."""
    name = f"{task}-{method}-seed{seed}"
    run_dir, log = args.out / "runs" / name, args.out / "logs" / f"{name}.log"
    overrides = [*common_overrides(args), *TASKS[task], *METHODS[method], *args.extra, f"privacy.seed={seed}",
                 f"model.init_seed={seed}", f"train.run_dir={run_dir}"]
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "dpdist.cli", "train", *overrides], stdout=out,
                               stderr=subprocess.STDOUT, cwd=REPO, env=RUN_ENV)
    seconds = time.perf_counter() - started
    if code != 0 or not (run_dir / "summary.json").exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RunFailed(f"run {name} failed (exit {code}); its log {log} ends with:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("steps", "train_loss", "val_loss", "val_perplexity", "epsilon", "epsilon_rdp", "delta",
            "noise_multiplier", "sample_rate")
    return {"task": task, "method": method, "seed": seed, "run_dir": str(run_dir), "seconds": seconds,
            "overrides": overrides, **{k: summary[k] for k in keys if k in summary}}


def ranking_of(run_dir: str) -> dict:
    """NDCG@10 / HIT@10 of the run's final model (``load_model`` gives a Re-Attention model what it
    computed with in training: sigma C, qN and the run's saved frequency release, never a new one)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = load_model(cfg, run_dir / "final" / "model.pt", device="cpu")
    return model_ranking(model, prepare_data(cfg.data, progress=False), RANKED_SEQUENCES, progress=False)


def exposure_of(run_dir: str) -> dict:
    """``dpdist eval RUN_DIR --json``: held-out loss and canary exposure of the run's final model, or
    ``{"error": its last line}``: exposure is a side measurement, and one that fails (say, for a
    method the eval command does not handle yet) must not discard the runs' utility numbers."""
    result = subprocess.run([sys.executable, "-m", "dpdist.cli", "eval", run_dir, "--json"], capture_output=True,
                            text=True, cwd=REPO, env=RUN_ENV)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        print(f"warning: dpdist eval {run_dir} failed, no exposure for it: {last}", file=sys.stderr)
        return {"error": last}
    return json.loads(result.stdout)


def exposures(evaluation: dict) -> dict:
    """Mean exposure in bits of a ``dpdist eval --json`` report: over every planted canary, and over the
    most inserted ones, where memorisation without privacy shows first."""
    by_insertions = evaluation["mean_exposure_by_insertions"]
    return {"exposure": statistics.fmean(c["exposure"] for c in evaluation["canaries"]),
            "exposure_most_inserted": by_insertions[max(by_insertions, key=int)]}


def measured_run(args, task: str, method: str, seed: int, measure_exposure: bool) -> dict:
    """Train one run, then measure it: ranking on the items task, canary exposure on the text task."""
    started = time.perf_counter()
    run = train_run(args, task, method, seed)
    if task == "items":
        run.update(ranking_of(run["run_dir"]))
    if task == "text" and measure_exposure:
        run["eval"] = exposure_of(run["run_dir"])
        if "error" not in run["eval"]:
            run.update(exposures(run["eval"]))
    run["total_seconds"] = time.perf_counter() - started
    return run


def aggregate(runs: list[dict], metric: str) -> dict | None:
    values = [r[metric] for r in runs if metric in r and math.isfinite(r[metric])]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def markdown(args, runs: list[dict], baselines: dict, summary: dict) -> str:
    lines = [f"Fixed budget: epsilon = {args.epsilon} at delta = 1/(10 N) for the private methods; {args.steps} steps, "
             f"expected batch {args.batch_size}, d_model {args.d_model}, {args.layers} layers, seq_len {args.seq_len}, "
             f"AdamW lr {args.lr}, clip 1.0; {args.seeds} seeds; mean ± std [min, max].", ""]
    for task in args.tasks:
        metrics = [m for m in METRICS[task] if any(summary[task][method].get(m) for method in args.methods)]
        lines += [f"**{task}**", "", "| method | " + " | ".join(LABELS[m] for m in metrics) + " | epsilon | sigma |",
                  "|---" * (len(metrics) + 3) + "|"]
        for method in args.methods:
            cells = [_cell(summary[task][method].get(m)) for m in metrics]
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            privacy = (f"{max(r['epsilon'] for r in mine):.2f} | {mine[0]['noise_multiplier']:.3f}"
                       if "epsilon" in mine[0] else "∞ | –")
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {privacy} |")
        if task in baselines:
            cells = [f"{baselines[task][m]:.4f}" if m in baselines[task] else "–" for m in metrics]
            lines.append("| popularity (train counts) | " + " | ".join(cells) + " | ∞ | – |")
        failed = [f"{Path(r['run_dir']).name} ({r['eval']['error']})" for r in runs
                  if r["task"] == task and "error" in r.get("eval", {})]
        if failed:
            lines += ["", "Exposure not measured (dpdist eval failed) for: " + "; ".join(failed)]
        lines.append("")
    return "\n".join(lines)


def _cell(stats: dict | None) -> str:
    if not stats:
        return "–"
    mean, std, low, high = (stats[k] for k in ("mean", "std", "min", "max"))
    d = 1 if mean > 10 else 4  # perplexities to 0.1, rates and bits to 1e-4
    return f"{mean:.{d}f} ± {std:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    measure_exposure = EVAL_COMMAND.exists()
    if not measure_exposure:
        print(f"note: {EVAL_COMMAND.relative_to(REPO)} does not exist; no canary exposure column", file=sys.stderr)
    torch.set_num_threads(1)  # the ranking in this process, for the reason RUN_ENV gives
    baselines = {}
    for task in args.tasks:  # build each cache once, before runs could race to build it
        data = prepare_data(load_config(None, [*common_overrides(args), *TASKS[task], *args.extra]).data, progress=True)
        if task == "items":
            baselines[task] = popularity_ranking(data, RANKED_SEQUENCES)
    plan = [(task, method, seed) for task in args.tasks for method in args.methods for seed in range(args.seeds)]
    started = time.perf_counter()
    pool = ThreadPoolExecutor(args.jobs)  # its threads only wait on subprocesses and on torch (GIL released)
    try:
        futures = {pool.submit(measured_run, args, *key, measure_exposure): key for key in plan}
        done = {futures[f]: f.result() for f in tqdm(as_completed(futures), total=len(plan), desc="privacy-utility",
                                                     unit="run", file=sys.stderr, dynamic_ncols=True)}
    except RunFailed as exc:
        pool.shutdown(cancel_futures=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pool.shutdown()
    runs = [done[key] for key in plan]
    summary = {task: {method: {m: aggregate([r for r in runs if r["task"] == task and r["method"] == method], m)
                               for m in METRICS[task] + ["seconds", "total_seconds"]} for method in args.methods}
               for task in args.tasks}
    (args.out / "results.json").write_text(json.dumps(
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
         "summary": summary, "baselines": baselines}, indent=1))
    table = markdown(args, runs, baselines, summary)
    (args.out / "results.md").write_text(table)
    print(table)
    per_run = statistics.fmean(r["total_seconds"] for r in runs)
    print(f"{len(runs)} runs in {time.perf_counter() - started:.0f} s ({per_run:.0f} s per run with its evaluation, "
          f"{args.jobs} at a time); {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
