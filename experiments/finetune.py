"""Fine-tuning experiment (issue 15): the DP methods fine-tuning a model pretrained on public data.

The seed papers report LSG's and ANADP's gains for fine-tuning a pretrained model, and Re-Attention's
on long-tailed item data; ``privacy_utility.py`` trains from scratch.  No pretrained weights can be
downloaded here, so this script makes its own, with dpdist itself:

1. **Pretrain**, non-privately, on public data, and export with ``dpdist export --hf``:
   * text: a Llama-shaped model (grouped-query attention, SwiGLU, untied) on the Python source of the
     installed third-party packages (``PUBLIC_PACKAGES``), with a tokenizer trained on that text;
   * items: the small GPT of ``privacy_utility.py`` on the public users of the item task
     (``data.items_users=public``: the same catalogue, a disjoint population).
2. **Fine-tune** each pretrained folder (``model.pretrained``) on the private split at one (epsilon,
   delta), over several seeds:
   * text, the embedded corpus (this Python's standard library, disjoint from the public packages,
     with planted canaries): ``nonprivate``, ``dp`` (full DP-SGD), ``lora`` (DP-LoRA), ``lsg`` and
     ``anadp``, and ``pretrained`` (one step at lr 1e-12: the pretrained model as it is);
   * items (the private users): ``nonprivate``, ``dp`` and ``reattention``.
3. **Measure** validation perplexity and canary exposure (``dpdist eval``) for text, NDCG@10 / HIT@10
   over a full ranking for items, and the epsilon each run spent.

Every hyperparameter below was fixed before any run; the held-out split is only used for the final
numbers.  The seed varies the sampling/noise stream (``privacy.seed``, fixed so runs reproduce; dpdist
warns that such models carry no guarantee) and LoRA's initial adapters; pretraining runs once.

    .venv/bin/python experiments/finetune.py --out results/finetune [--seeds 3 --jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from privacy_utility import REPO, RUN_ENV, RunFailed, _cell, aggregate, exposure_of, exposures, ranking_of

PUBLIC_PACKAGES = ("transformers", "numpy", "torch", "peft", "tokenizers", "yaml", "tqdm")
LLAMA = ["model.arch=llama", "model.d_model=384", "model.n_layers=6", "model.n_heads=6", "model.n_kv_heads=2",
         "model.mlp_hidden=1024", "model.tie_embeddings=false", "model.max_seq_len=128"]
PRETRAIN = {
    "text": [*LLAMA, "data.vocab_size=4096", "data.seq_len=128", "train.batch_size=32", "train.micro_batch_size=32",
             "train.lr=0.001", "train.lr_schedule=cosine", "train.warmup_steps=20"],
    "items": ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "data.seq_len=32",
              "data.source=zipf_items", "data.items_users=public", "data.val_fraction=0.05", "train.batch_size=128",
              "train.micro_batch_size=128", "train.lr=0.003"],
}
FINETUNE = {
    "text": ["data.seq_len=64", "data.max_corpus_mb=1", "train.batch_size=64", "train.micro_batch_size=32"],
    "items": ["data.source=zipf_items", "data.seq_len=32", "data.val_fraction=0.05", "train.batch_size=128",
              "train.micro_batch_size=128"],
}
FULL_LR, LORA_LR = "train.lr=0.0005", "train.lr=0.002"  # adapters start at 0 and take a larger step, as usual
METHODS = {
    "text": {"pretrained": ["privacy.enabled=false", "train.lr=1e-12"], "nonprivate": ["privacy.enabled=false", FULL_LR],
             "dp": [FULL_LR], "lora": ["lora.enabled=true", "lora.rank=8", LORA_LR], "lsg": ["lsg.enabled=true", FULL_LR],
             "anadp": ["anadp.enabled=true", "privacy.clipping=per_layer", FULL_LR]},
    "items": {"nonprivate": ["privacy.enabled=false", FULL_LR], "dp": [FULL_LR],
              "reattention": ["reattention.enabled=true", FULL_LR]},
}
METRICS = {"text": ["val_perplexity", "exposure", "exposure_most_inserted"], "items": ["val_perplexity", "ndcg@10", "hit@10"]}
LABELS = {"val_perplexity": "val perplexity", "ndcg@10": "NDCG@10", "hit@10": "HIT@10",
          "exposure": "exposure, all canaries (bits)", "exposure_most_inserted": "exposure, most-inserted (bits)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="text,items", help="comma-separated subset of text, items")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per (task, method): 0 .. N-1")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon; delta is 1/(10 N) for N examples")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--public-mb", type=float, default=8.0, help="public Python source to pretrain the text model on")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning runs at once (one core each)")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "dpdist"))
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the public corpus, pretrained models, runs, logs and results; a finished "
                             "pretraining found there is reused")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every run (repeatable), e.g. model.d_model=64 for a smoke test")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - set(FINETUNE) or args.seeds < 1 or args.jobs < 1:
        parser.error("--tasks is a subset of text,items; --seeds and --jobs must be >= 1")
    return args


def public_corpus(folder: Path, megabytes: float) -> Path:
    """Python source of the public packages, sorted, up to ``megabytes``, as .txt documents in ``folder``."""
    if folder.is_dir():
        return folder
    import importlib.util

    staging, budget = folder.with_name(folder.name + ".partial"), int(megabytes * 2**20)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for package in PUBLIC_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            size = path.stat().st_size
            if budget <= 0:
                break
            if 0 < size <= budget:
                relative = path.relative_to(root.parent).as_posix().replace("/", "__")
                (staging / f"{relative}.txt").write_text(path.read_text(errors="replace"))
                budget -= size
    staging.rename(folder)
    return folder


def dpdist(args_list: list[str], log: Path, threads: int = 1) -> None:
    env = dict(RUN_ENV, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as out:
        code = subprocess.call([sys.executable, "-m", "dpdist.cli", *args_list], stdout=out, stderr=subprocess.STDOUT,
                               cwd=REPO, env=env)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RunFailed(f"dpdist {args_list[0]} failed (exit {code}); its log {log} ends with:\n{tail}")


def pretrained(args, task: str) -> Path:
    """The exported pretrained folder of ``task``, trained (non-privately, all cores) unless found."""
    folder = args.out / f"pretrained-{task}"
    if (folder / "config.json").is_file():
        return folder
    run_dir, log = args.out / "runs" / f"pretrain-{task}", args.out / "logs" / f"pretrain-{task}.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    data = ([f"data.path={public_corpus(args.out / 'public-text', args.public_mb)}"] if task == "text" else [])
    dpdist(["train", *PRETRAIN[task], *data, "privacy.enabled=false", f"train.steps={args.pretrain_steps}",
            f"data.cache_dir={args.cache_dir}", "train.checkpoint_every=0", "train.progress=false",
            f"train.log_every={max(1, args.pretrain_steps // 20)}", "parallel.data=1", *args.extra,
            f"train.run_dir={run_dir}"], log, threads=os.cpu_count() or 1)
    dpdist(["export", str(run_dir), "--hf", str(folder)], log)
    return folder


def finetune(args, task: str, method: str, seed: int, base: Path) -> dict:
    """One private fine-tuning run and its measurements."""
    name = f"{task}-{method}-seed{seed}"
    run_dir, log = args.out / "runs" / name, args.out / "logs" / f"{name}.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    steps = 1 if method == "pretrained" else args.steps
    overrides = [f"model.pretrained={base}", *FINETUNE[task], *METHODS[task][method], f"train.steps={steps}",
                 f"data.cache_dir={args.cache_dir}", f"privacy.target_epsilon={args.epsilon}",
                 "privacy.noise_multiplier=null", "privacy.delta=null", "privacy.clip_norm=1.0", "train.optimizer=adamw",
                 "train.checkpoint_every=0", "train.progress=false", f"train.log_every={max(1, steps // 10)}",
                 "parallel.data=1", "parallel.tensor=1", *args.extra, f"privacy.seed={seed}",
                 f"train.run_dir={run_dir}"]
    started = time.perf_counter()
    dpdist(["train", *overrides], log)
    summary = json.loads((run_dir / "summary.json").read_text())
    run = {"task": task, "method": method, "seed": seed, "run_dir": str(run_dir), "overrides": overrides,
           **{k: summary[k] for k in ("steps", "train_loss", "val_loss", "val_perplexity", "epsilon", "delta",
                                      "noise_multiplier", "sample_rate") if k in summary}}
    if task == "items":
        run.update(ranking_of(str(run_dir)))
    else:
        run["eval"] = exposure_of(str(run_dir))
        if "error" not in run["eval"]:
            run.update(exposures(run["eval"]))
    run["seconds"] = time.perf_counter() - started
    return run


def markdown(args, runs: list[dict], summary: dict) -> str:
    lines = [f"Fine-tuning at epsilon = {args.epsilon}, delta = 1/(10 N); {args.steps} steps; {args.seeds} seeds; "
             "mean ± std [min, max].", ""]
    for task in args.tasks:
        metrics = METRICS[task]
        lines += [f"**{task}**", "", "| method | " + " | ".join(LABELS[m] for m in metrics) + " | epsilon | sigma |",
                  "|---" * (len(metrics) + 3) + "|"]
        for method in METHODS[task]:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            privacy = (f"{max(r['epsilon'] for r in mine):.2f} | {mine[0]['noise_multiplier']:.3f}"
                       if "epsilon" in mine[0] else "∞ | –")
            cells = [_cell(summary[task][method].get(m)) for m in metrics]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {privacy} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    for sub in ("logs", "runs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        bases = {task: pretrained(args, task) for task in args.tasks}
        print(f"pretrained: {', '.join(str(b) for b in bases.values())} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)
        plan = [(task, method, seed) for task in args.tasks for method in METHODS[task]
                for seed in range(1 if method == "pretrained" else args.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:  # threads wait on subprocesses and torch (GIL released)
            futures = {pool.submit(finetune, args, *key, bases[key[0]]): key for key in plan}
            done = {futures[f]: f.result() for f in tqdm(as_completed(futures), total=len(plan), desc="fine-tune",
                                                         unit="run", file=sys.stderr, dynamic_ncols=True)}
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    runs = [done[key] for key in plan]
    summary = {task: {method: {m: aggregate([r for r in runs if r["task"] == task and r["method"] == method], m)
                               for m in METRICS[task] + ["seconds"]} for method in METHODS[task]}
               for task in args.tasks}
    (args.out / "results.json").write_text(json.dumps(
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
         "summary": summary}, indent=1))
    table = markdown(args, runs, summary)
    (args.out / "results.md").write_text(table)
    print(table)
    print(f"{len(runs)} runs in {time.perf_counter() - started:.0f} s; {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
