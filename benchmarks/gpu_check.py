"""The one-shot GPU check of issue 17: on one GPU, in one call, print ONE table of

- the CUDA tests (``pytest -k cuda``): passed / failed / errors / skipped;
- GPT-2-124M and Llama-3.2-1B shapes at T=1024 in bf16 (``train.precision=bf16``: fp32 weights, an
  autocast forward): tokens/s and peak memory (``torch.cuda.max_memory_allocated``) of the
  non-private step and of the DP step with flat and with per-layer clipping, the DP over
  non-private ratios next to the issue's targets (per-layer >= 0.9x tokens/s, flat >= 0.8x,
  memory <= 1.1x), PASS or FAIL on every row;
- keyed noise generation (``keyed_normal``) on the device, normals/s;
- ``dpdist plan``'s prediction of the same runs, once ``python -m dpdist plan --help`` succeeds
  (the column reads "-" until then).

    bash benchmarks/gpu_check.sh [--wheels DIR] [--device cuda|cpu] [--tiny] [--out FILE]

The steps are ``dpdist/bench/steps.py``'s (``setup_nonprivate``, ``setup_dp``), run one after the
other in this process: ``max_memory_allocated`` is reset before each, so each peak is its own.
``--device cpu --tiny`` runs the same flow with tiny shapes (the CPU test of this script); there
peak memory is not measured (no allocator statistics on a CPU) and the targets are shown but not
held, since they are the issue's for the full shapes on a GPU.

Exit status: 0 when every row passes (under --tiny: when every row ran), 1 when a row fails, 2 when
the check cannot start (no CUDA device, a missing dependency without its wheel).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# (pip name, import name, who needs it, required to start): what the GPU machine lacks, from --wheels DIR only
WHEELS = (("cryptography", "cryptography", "dpdist", True), ("dp-accounting", "dp_accounting", "dpdist", True),
          ("pytest", "pytest", "the CUDA tests", False), ("opacus", "opacus", "tests that compare with Opacus", False),
          ("deepspeed", "deepspeed", "tests of train.backend=deepspeed", False))

TOKENS_TARGET = {"flat": 0.8, "per_layer": 0.9}  # DP tokens/s over non-private tokens/s, at least
MEMORY_TARGET = 1.1  # DP peak memory over non-private peak memory, at most
PRECISION = "bf16"
BUDGET = "none"  # the engine's default per-layer norm strategies, as `dpdist train` without privacy.memory_budget_mb
NOISE_SECRET, NOISE_NAME = 0x5EC12E7, "check.weight"


@dataclass(frozen=True)
class Profile:
    """What one run of the check measures: the models (micro-batch sizes that leave room on an 80 GB
    GPU), the steps per mode (the first ``warmup`` untimed), the noise tensor and the time limit."""
    runs: tuple  # (label, BenchConfig keyword arguments)
    steps: int
    warmup: int
    noise_normals: int
    noise_rounds: int
    limit_s: float


FULL = Profile(
    runs=(("gpt2-124m", dict(arch="gpt", layers=12, d_model=768, heads=12, vocab=50257, seq_len=1024, batch=16)),
          ("llama-1b", dict(arch="llama", layers=16, d_model=2048, heads=32, kv_heads=8, mlp_hidden=8192,
                            vocab=128256, seq_len=1024, batch=8, tie_embeddings=True))),
    steps=10, warmup=2, noise_normals=1 << 26, noise_rounds=5, limit_s=8 * 60)
TINY = Profile(
    runs=(("gpt-tiny", dict(arch="gpt", layers=2, d_model=64, heads=4, vocab=128, seq_len=32, batch=4)),
          ("llama-tiny", dict(arch="llama", layers=2, d_model=64, heads=4, kv_heads=2, mlp_hidden=128, vocab=128,
                              seq_len=32, batch=4, tie_embeddings=True))),
    steps=3, warmup=1, noise_normals=1 << 16, noise_rounds=3, limit_s=60)


@dataclass
class Row:
    check: str
    measured: str = "-"
    ratio: str = "-"
    target: str = "-"
    plan: str = "-"
    result: str = "-"  # PASS, FAIL (why), SKIP (why) or - (a reference row without a target)
    error: bool = False  # the row could not run: a failure under --tiny too
    numbers: dict = field(default_factory=dict)  # for --out


_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def refuse(message: str) -> None:
    """The check cannot start: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}"


# ---------------------------------------------------------------------------------------------------
# Dependencies: installed from the wheel folder only, never from the network

def install_wheels(folder: str | None) -> None:
    """Install each missing package of ``WHEELS`` from ``folder`` (pip --no-index); exit 2 when one that
    dpdist itself needs is still missing."""
    if folder is not None and not Path(folder).is_dir():
        refuse(f"--wheels {folder} is not a folder")
    for pip_name, module, purpose, _ in WHEELS:
        if importlib.util.find_spec(module) is not None:
            continue
        if folder is None:
            say(f"{pip_name} is not installed ({purpose} need it); pass --wheels DIR holding its wheel")
            continue
        say(f"installing {pip_name} from {folder} (no index) ...")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", folder,
                               "--disable-pip-version-check", pip_name], capture_output=True, text=True)
        importlib.invalidate_caches()
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            say(f"  {pip_name} not installed: {tail[-1] if tail else 'pip failed'}")
    missing = [pip_name for pip_name, module, _, required in WHEELS
               if required and importlib.util.find_spec(module) is None]
    if missing:
        refuse(f"dpdist needs {', '.join(missing)}: pass --wheels DIR with their wheels and those of their "
                 "dependencies that the machine lacks")


# ---------------------------------------------------------------------------------------------------
# (a) the CUDA tests

def junit_counts(path: Path) -> dict:
    """passed, failed, errors and skipped from pytest's JUnit XML report."""
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"]}


def pytest_row(device: str, workdir: Path) -> Row:
    row = Row("CUDA tests (pytest -k cuda)", target="all pass")
    if importlib.util.find_spec("pytest") is None:
        row.result, row.error = "FAIL (pytest is not installed: add its wheel to --wheels DIR)", True
        return row
    say("CUDA tests: pytest -k cuda tests/ ...")
    report = workdir / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
                           "-k", "cuda", "--continue-on-collection-errors", f"--junitxml={report}", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    if not report.exists():
        row.result, row.error = f"FAIL (pytest exit {proc.returncode}, no report)", True
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return row
    counts = junit_counts(report)
    row.numbers = counts
    row.measured = ", ".join(f"{n} {key}" for key, n in counts.items())
    if counts["failed"] or counts["errors"]:
        row.result, row.error = "FAIL", True
        print(proc.stdout[-6000:], flush=True)  # pytest's own summary of what failed
    elif counts["passed"]:
        row.result = "PASS"
    elif device == "cuda":
        row.result, row.error = "FAIL (none ran on the GPU)", True
    else:
        row.result = "SKIP (no CUDA device)"
    return row


# ---------------------------------------------------------------------------------------------------
# (b) DP over non-private tokens/s and peak memory, with dpdist bench's own steps

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(setup, cfg, profile: Profile, device: str) -> dict:
    """Tokens/s over the timed steps and the peak memory (CUDA: bytes allocated, from a fresh reset)."""
    gc.collect()  # the previous mode's model, optimizer and engine (hooks make cycles)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, info = setup()
    times = []
    for index in range(profile.steps):
        synchronize(device)
        start = time.perf_counter()
        step(index, {})
        synchronize(device)
        times.append(time.perf_counter() - start)
    timed = times[profile.warmup:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    dp_plan = {key: info[key] for key in ("strategies", "plan_kept_mb") if key in info}  # the DP step's only
    return {"tokens_per_s": cfg.batch * cfg.seq_len * len(timed) / sum(timed), "peak_bytes": peak,
            "step_s": statistics.median(timed), "params": info["params"], **dp_plan}


def size(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 / 10 else f"{count / 2**20:.1f} MiB"


def measured_text(m: dict) -> str:
    memory = size(m["peak_bytes"]) if m["peak_bytes"] is not None else "memory: CUDA only"
    return f"{m['tokens_per_s']:,.0f} tok/s, {memory}"


def model_rows(label: str, cfg, profile: Profile, device: str, plan: dict) -> list[Row]:
    from dpdist.bench.steps import setup_dp, setup_nonprivate

    shape = f"{label} B{cfg.batch} T{cfg.seq_len}"
    base = Row(f"{shape} non-private", plan=plan_text(plan.get("nonprivate")), numbers={"plan": plan.get("nonprivate")})
    say(f"{shape}: non-private step, {PRECISION} ...")
    try:
        ref = measure(lambda: setup_nonprivate(cfg, device, PRECISION), cfg, profile, device)
        base.measured = measured_text(ref)
        base.numbers.update(ref)
        say(f"  {base.measured} ({ref['params'] / 1e6:.1f}M params)")
    except Exception as exc:  # an out-of-memory or a step that fails on this device: a row, not a crash
        ref = None
        base.result, base.error = f"FAIL ({short(exc)})", True
        say(f"  failed: {short(exc)}")
    rows = [base]
    for clipping in ("flat", "per_layer"):
        row = Row(f"{shape} DP {clipping}", plan=plan_text(plan.get(clipping), plan.get("nonprivate")),
                  target=f">= {TOKENS_TARGET[clipping]}x tok/s, <= {MEMORY_TARGET}x mem",
                  numbers={"plan": plan.get(clipping)})
        say(f"{shape}: DP step, {clipping} clipping, {PRECISION} ...")
        try:
            m = measure(lambda: setup_dp(cfg, clipping, BUDGET, device, PRECISION), cfg, profile, device)
        except Exception as exc:
            row.result, row.error = f"FAIL ({short(exc)})", True
            say(f"  failed: {short(exc)}")
            rows.append(row)
            continue
        row.measured = measured_text(m)
        say(f"  {row.measured}; norm strategies {m['strategies']}, kept {m['plan_kept_mb']:.0f} MB")
        if ref is None:
            row.result, row.error = "FAIL (no non-private reference)", True
        else:
            row.ratio, row.result = judge(m, ref, clipping)
        row.numbers.update(m)
        rows.append(row)
    return rows


def judge(dp: dict, ref: dict, clipping: str) -> tuple[str, str]:
    """The ratio text and PASS/FAIL of one DP row against the non-private row, the ratios also stored
    in ``dp`` (``tokens_ratio``, ``memory_ratio``); memory is judged only where it was measured (CUDA)."""
    speed = dp["tokens_per_s"] / ref["tokens_per_s"]
    dp["tokens_ratio"] = speed
    missed = [] if speed >= TOKENS_TARGET[clipping] else ["tok/s"]
    text = f"{speed:.2f}x tok/s"
    if dp["peak_bytes"] is not None and ref["peak_bytes"] is not None:
        memory = dp["peak_bytes"] / ref["peak_bytes"]
        dp["memory_ratio"] = memory
        missed += [] if memory <= MEMORY_TARGET else ["mem"]
        text += f", {memory:.2f}x mem"
    return text, f"FAIL ({', '.join(missed)})" if missed else "PASS"


# ---------------------------------------------------------------------------------------------------
# (c) keyed noise on the device

def noise_row(profile: Profile, device: str) -> Row:
    from dpdist.privacy.noise import keyed_normal

    row = Row(f"noise keyed_normal on {device}")
    say(f"noise: {profile.noise_normals:,} normals (float32) per call on {device} ...")
    try:
        keyed_normal(NOISE_SECRET, 0, NOISE_NAME, (1 << 16,), device=device)  # kernels loaded, workspace sized
        rates = []
        for release in range(1, profile.noise_rounds + 1):
            synchronize(device)
            start = time.perf_counter()
            keyed_normal(NOISE_SECRET, release, NOISE_NAME, (profile.noise_normals,), dtype=torch.float32,
                         device=device)
            synchronize(device)
            rates.append(profile.noise_normals / (time.perf_counter() - start))
    except Exception as exc:
        row.result, row.error = f"FAIL ({short(exc)})", True
        return row
    row.numbers = {"normals_per_s": statistics.median(rates), "rounds": rates}
    row.measured = f"{statistics.median(rates) / 1e6:,.1f} M normals/s (median of {len(rates)})"
    return row


# ---------------------------------------------------------------------------------------------------
# (d) dpdist plan's prediction beside each measurement

def plan_hardware(device: str) -> str:
    if device != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    return "h200-141gb" if "H200" in name else "a100-80gb" if "A100" in name else "h100-80gb"


def plan_overrides(cfg, clipping: str, device: str) -> list[str]:
    """The bench run as a `dpdist train` config: one rank, SGD without momentum, one micro-batch per step."""
    model = [f"model.arch={cfg.arch}", f"model.vocab_size={cfg.vocab}", f"model.d_model={cfg.d_model}",
             f"model.n_layers={cfg.layers}", f"model.n_heads={cfg.heads}", f"model.max_seq_len={cfg.seq_len}",
             f"model.tie_embeddings={str(cfg.tied).lower()}"]
    if cfg.arch == "llama":
        model += [f"model.n_kv_heads={cfg.key_value_heads}", f"model.mlp_hidden={cfg.hidden}", "model.norm=rmsnorm",
                  "model.bias=false"]
    else:
        model.append(f"model.mlp_ratio={cfg.mlp_ratio}")
    return model + [f"data.seq_len={cfg.seq_len}", f"data.vocab_size={cfg.vocab}",
                    f"train.micro_batch_size={cfg.batch}", f"train.batch_size={cfg.batch}", "train.optimizer=sgd",
                    f"train.precision={PRECISION}", f"privacy.clipping={clipping}", "privacy.noise_multiplier=1.0",
                    "parallel.data=1", "parallel.tensor=1", f"parallel.device={device}"]


def plan_columns(out: dict, tokens_per_step: int) -> dict:
    """tokens/s and peak bytes that `dpdist plan --json` (``docs/plan.md``, schema 1) predicts, DP and
    non-private."""
    run = out["run"]
    return {"dp": {"tokens_per_s": tokens_per_step / run["time_s"]["step"], "peak_bytes": run["memory_bytes"]["peak"]},
            "nonprivate": {"tokens_per_s": tokens_per_step / run["time_s"]["nonprivate_step"],
                           "peak_bytes": run["memory_bytes"]["nonprivate_peak"]}}


def start_plans(cfg, device: str) -> dict:
    """One ``dpdist plan --json`` process per clipping, started before the CUDA tests so that they run
    beside them; collected (``plan_predictions``) before any step is timed."""
    return {clipping: subprocess.Popen([sys.executable, "-m", "dpdist", "plan", *plan_overrides(cfg, clipping, device),
                                        "--hardware", plan_hardware(device), "--json"],
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for clipping in ("flat", "per_layer")}


def plan_predictions(cfg, procs: dict) -> dict:
    """{"nonprivate": ..., "flat": ..., "per_layer": ...} predictions, or {"error": the plan's message}."""
    predicted = {}
    for clipping, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode not in (0, 1):  # 1: predicted not to fit, still a prediction
            return {"error": (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        columns = plan_columns(json.loads(stdout), cfg.batch * cfg.seq_len)
        predicted[clipping] = columns["dp"]
        predicted["nonprivate"] = columns["nonprivate"]
    return predicted


def plan_text(prediction: dict | None, nonprivate: dict | None = None) -> str:
    """The plan column: predicted tokens/s and peak, with a DP row's predicted ratios to compare."""
    if prediction is None:
        return "-"
    if nonprivate is None:
        return f"{prediction['tokens_per_s']:,.0f} tok/s, {size(prediction['peak_bytes'])}"
    speed, memory = (prediction[key] / nonprivate[key] for key in ("tokens_per_s", "peak_bytes"))
    return (f"{prediction['tokens_per_s']:,.0f} tok/s ({speed:.2f}x), "
            f"{size(prediction['peak_bytes'])} ({memory:.2f}x)")


# ---------------------------------------------------------------------------------------------------

def format_table(rows: list[Row]) -> str:
    header = ("check", "measured", "DP / non-private", "target", "dpdist plan", "result")
    cells = [header] + [(r.check, r.measured, r.ratio, r.target, r.plan, r.result) for r in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", help="folder of wheels for what the machine lacks (installed with --no-index)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the flow, not the targets")
    parser.add_argument("--out", help="also write the rows and the table as JSON to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        refuse("no CUDA device: run with --device cpu --tiny to check the flow on a CPU")
    if args.device == "cpu" and not args.tiny:
        refuse("--device cpu needs --tiny: the GPT-2 and Llama-1B shapes at T=1024 take hours on a CPU")
    profile = TINY if args.tiny else FULL
    install_wheels(args.wheels)
    from dpdist.bench.config import BenchConfig

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    say(f"gpu_check on {where}: torch {torch.__version__}, {'tiny shapes' if args.tiny else 'full shapes'}")
    runs = [(label, BenchConfig(steps=profile.steps, **shape)) for label, shape in profile.runs]
    for _, cfg in runs:
        cfg.validate()
    plans = [start_plans(cfg, args.device) for _, cfg in runs]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        rows.append(pytest_row(args.device, Path(workdir)))
    plans = [plan_predictions(cfg, procs) for (_, cfg), procs in zip(runs, plans)]
    for (label, cfg), plan in zip(runs, plans):
        if "error" in plan:
            say(f"dpdist plan refused {label}: {plan['error']}")
            rows.append(Row(f"{label} dpdist plan", plan="error", result=f"FAIL ({plan['error'][:80]})", error=True))
            plan = {}
        rows += model_rows(label, cfg, profile, args.device, plan)
    rows.append(noise_row(profile, args.device))
    total = time.perf_counter() - _START
    rows.append(Row("wall time of this check", measured=f"{total:.0f} s", target=f"< {profile.limit_s:.0f} s",
                    result="PASS" if total < profile.limit_s else "FAIL", numbers={"seconds": total}))

    table = format_table(rows)
    missed = [r for r in rows if r.result.startswith("FAIL")]
    failed = [r for r in missed if r.error or not args.tiny]
    print(f"\ngpu_check on {where}, torch {torch.__version__}, {PRECISION}, "
          f"{'tiny shapes' if args.tiny else 'T=1024'}:\n{table}")
    print(f"{len(missed)} of {len(rows)} rows FAIL" if missed else f"all {len(rows)} rows pass")
    if args.tiny:
        print("--tiny: the targets are the issue's for the full shapes on a GPU: shown, not held; the exit status "
              f"counts the rows that could not run ({len(failed)})")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": where, "torch": torch.__version__, "tiny": args.tiny, "precision": PRECISION,
            "profile": dataclasses.asdict(profile), "table": table,
            "rows": [dataclasses.asdict(r) for r in rows], "failed": [r.check for r in failed]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
