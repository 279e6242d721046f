"""``dpdist bench``: what DP costs, measured, next to the floor the cost model says it cannot beat.

For one model and one batch, on this machine, in one run: the non-private step, the dpdist DP step
(for one or several memory budgets) and, when Opacus is installed, Opacus ghost clipping on an
equivalent untied plain-torch model.  Every mode runs in a fresh Python process (``python -m
dpdist.bench.runner SPEC``) because peak RSS (``ru_maxrss``) is per process and only ever grows.

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
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RESULT_TAG = "DPDIST_BENCH_RESULT "
CONTENDED = 0.10  # share of the cores other processes may use during a mode's timed steps before it is flagged
MEMORY_MEASURE = ("peak RSS (ru_maxrss) minus the RSS after building model, batch, optimizer and DP wrapper, per fresh "
                  "process; with --rounds, the largest over rounds")


@dataclass
class BenchConfig:
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    vocab: int = 8000
    seq_len: int = 128
    batch: int = 32
    steps: int = 6
    mlp_ratio: int = 4
    seed: int = 0

    def validate(self) -> None:
        for key in ("layers", "d_model", "heads", "vocab", "seq_len", "batch"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be > 0; got {getattr(self, key)}")
        if self.steps < 2:
            raise ValueError(f"--steps must be >= 2 (the first step is excluded as warm-up); got {self.steps}")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model ({self.d_model}) must be a multiple of --heads ({self.heads})")


# ---------------------------------------------------------------------------------------------------
# Memory budgets: a number of MB, "none" (no budget: the engine's default choice per layer, the FLOP
# rule 2T^2 <= pd for flat clipping) or "unlimited" (a budget so large that the time-cost model alone
# chooses).

NONE, UNLIMITED = "none", "unlimited"


def parse_budget(text: str | float | None):
    """``"256"`` -> 256.0 (MB); ``"none"``/None -> ``"none"``; ``"unlimited"``/``"inf"`` -> ``"unlimited"``."""
    if text is None:
        return NONE
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        word = text.strip().lower()
        if word in ("none", "null", ""):
            return NONE
        if word in ("unlimited", "inf", "infinite", "lifted"):
            return UNLIMITED
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"a memory budget is a number of MB, 'none' or 'unlimited'; got {text!r}") from None
    if math.isinf(value):
        return UNLIMITED
    if value < 0 or math.isnan(value):
        raise ValueError(f"a memory budget must be >= 0 MB; got {text!r}")
    return value


def budget_bytes(budget) -> float | None:
    if budget == NONE:
        return None
    if budget == UNLIMITED:
        return math.inf
    return float(budget) * 2**20


def budget_label(budget, clipping: str = "flat") -> str:
    if budget == NONE:
        return "none (fastest lean)" if clipping == "per_layer" else "none (FLOP rule)"
    if budget == UNLIMITED:
        return "unlimited"
    return f"{budget:g} MB"


# ---------------------------------------------------------------------------------------------------
# FLOPs

def nonprivate_step_flops(cfg: BenchConfig) -> float:
    """Analytic matmul FLOPs of one non-private training step of the benchmark GPT (tied or not).

    Forward, per example of T tokens (2 FLOPs per multiply-add):
      - per layer, the linear layers: 2 T (3d^2 [qkv] + d^2 [attention out] + 2 r d^2 [MLP, r = mlp_ratio]);
      - per layer, attention: 2 T^2 d for Q K^T and 2 T^2 d for (softmax) V, counted over the full
        T x T square (the causal mask is not subtracted);
      - the vocabulary projection: 2 T d V.
    The step is taken as 3x the forward (the backward computes a gradient for the inputs and one for
    the weights of every matmul).  Embedding lookups, norms, softmax, the loss and element-wise work
    are not counted; they are small next to the matmuls here and are memory-bound anyway.
    """
    d, T, L, V, r = cfg.d_model, cfg.seq_len, cfg.layers, cfg.vocab, cfg.mlp_ratio
    linear = 2.0 * T * (3 * d * d + d * d + 2 * r * d * d)
    attention = 4.0 * T * T * d
    forward_per_example = L * (linear + attention) + 2.0 * T * d * V
    return 3.0 * cfg.batch * forward_per_example


# ---------------------------------------------------------------------------------------------------
# The models and the batch

def model_config(cfg: BenchConfig, tie: bool = True):
    from ..config import ModelConfig
    return ModelConfig(vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                       max_seq_len=cfg.seq_len, mlp_ratio=cfg.mlp_ratio, tie_embeddings=tie, dtype="float32",
                       init_seed=cfg.seed)


def make_batch(cfg: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens from a fixed seed: inputs and next-token labels, both (B, T) and contiguous."""
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_proj = nn.Linear(d, mlp_ratio * d), nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """nanoGPT-style model in plain torch (nn.Embedding / nn.Linear / nn.LayerNorm + SDPA), untied,
    the same shapes and FLOPs as the dpdist GPT: what Opacus ghost clipping can run."""

    def __init__(self, cfg: BenchConfig):
        super().__init__()
        d = cfg.d_model
        self.tok_emb, self.pos_emb = nn.Embedding(cfg.vocab, d), nn.Embedding(cfg.seq_len, d)
        self.blocks = nn.ModuleList(PlainBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # Opacus needs a batch dimension and a contiguous index tensor for the position lookup.
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx).contiguous()
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------------
# The worker: one mode in this (fresh) process

def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _setup_nonprivate(cfg: BenchConfig) -> tuple:
    from ..model.gpt import build_model
    from ..parallel.cross_entropy import per_example_loss

    model = build_model(model_config(cfg))
    ids, labels = make_batch(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(_: int, parts: dict) -> None:
        per_example_loss(model(ids), labels).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, {"params": sum(p.numel() for p in model.parameters())}


def _setup_dp(cfg: BenchConfig, clipping: str, budget) -> tuple:
    from ..model.gpt import build_model
    from ..privacy.rules import rule_for
    from ..train.engine import PrivateGradient

    model = build_model(model_config(cfg))
    ids, labels = make_batch(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = PrivateGradient(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=cfg.batch, secret=1,
                             clipping=clipping, micro_batch_size=cfg.batch, seq_len=cfg.seq_len,
                             memory_budget_bytes=budget_bytes(budget))

    def step(index: int, parts: dict) -> None:
        start = time.perf_counter()
        engine.microbatch(ids, labels)
        mid = time.perf_counter()
        engine.release(index)
        opt.step()
        opt.zero_grad(set_to_none=True)
        parts.setdefault("microbatch_s", []).append(mid - start)
        parts.setdefault("release_and_update_s", []).append(time.perf_counter() - mid)

    plan = engine.plan
    counts: dict[str, int] = {}  # over the layers whose rule offers a choice (norm layers and position tables do not)
    for layer, strategy in plan.strategies.items():
        if len(rule_for(layer).choices(layer, cfg.batch, cfg.seq_len, 4)) > 1:
            counts[strategy] = counts.get(strategy, 0) + 1
    info = {"params": sum(p.numel() for p in model.parameters()), "extra_flops": plan.extra_flops,
            "plan_kept_mb": plan.kept_bytes(clipping == "per_layer") / 2**20, "strategies": counts}
    return step, info


def _setup_paired(cfg: BenchConfig, clipping: str, budget) -> tuple:
    """The non-private and the DP step alternating in one process: each DP step's time over the
    non-private step just before it.  A slow patch of a shared machine then hits both sides of a pair,
    where the fresh-process means of two modes can land in different patches (on the project's 2-vCPU
    VM that alone moved one plan's ratio of means from 1.17 to 1.46 within one run).  Its peak memory
    covers both models and is not reported."""
    nonprivate, _ = _setup_nonprivate(cfg)
    dp, info = _setup_dp(cfg, clipping, budget)

    def step(index: int, parts: dict) -> None:
        start = time.perf_counter()
        nonprivate(index, {})
        mid = time.perf_counter()
        dp(index, {})
        parts.setdefault("paired_ratios", []).append((time.perf_counter() - mid) / (mid - start))

    return step, info


def _setup_plain_nonprivate(cfg: BenchConfig) -> tuple:
    model = PlainGPT(cfg)
    ids, labels = make_batch(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()

    def step(_: int, parts: dict) -> None:
        logits = model(ids)
        crit(logits.reshape(-1, cfg.vocab), labels.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, {"params": sum(p.numel() for p in model.parameters())}


def _setup_opacus(cfg: BenchConfig) -> tuple:
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")  # secure-RNG and full-backward-hook notices
    model = PlainGPT(cfg)
    params = sum(p.numel() for p in model.parameters())
    ids, labels = make_batch(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(ids, labels), batch_size=cfg.batch)
    model, opt, crit, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss())

    def step(_: int, parts: dict) -> None:
        logits = model(ids)
        crit(logits.reshape(-1, cfg.vocab), labels.reshape(-1), shape=logits.shape).backward()
        opt.step()
        opt.zero_grad()

    return step, {"params": params}


def run_worker(spec: dict) -> dict:
    """Run ``spec["mode"]`` for ``cfg.steps`` steps in this process and return its measurements."""
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = BenchConfig(**spec["config"])
    torch.manual_seed(cfg.seed)
    mode = spec["mode"]
    if mode == "nonprivate":
        step, info = _setup_nonprivate(cfg)
    elif mode == "dp":
        step, info = _setup_dp(cfg, spec["clipping"], parse_budget(spec["budget"]))
    elif mode == "paired":
        step, info = _setup_paired(cfg, spec["clipping"], parse_budget(spec["budget"]))
    elif mode == "plain_nonprivate":
        step, info = _setup_plain_nonprivate(cfg)
    elif mode == "opacus_ghost":
        step, info = _setup_opacus(cfg)
    else:
        raise ValueError(f"unknown bench mode {mode!r}")
    baseline = current_rss_mb()
    times, cpu_times, parts = [], [], {}
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for index in range(cfg.steps):
        if index == 1:
            busy_start = _machine_busy_s()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(index, parts)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    busy_end = _machine_busy_s()
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


def run_mode(cfg: BenchConfig, mode: str, **extra) -> dict:
    """Run one mode in a fresh ``python -m dpdist.bench.runner`` process; its measurements as a dict."""
    spec = {"config": dataclasses.asdict(cfg), "mode": mode, **extra}
    proc = subprocess.run([sys.executable, "-m", "dpdist.bench.runner", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker for mode {mode!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def opacus_available() -> bool:
    return importlib.util.find_spec("opacus") is not None


# ---------------------------------------------------------------------------------------------------
# The whole benchmark

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
    step (``_setup_paired``); ``paired_ratio`` is the median of those ratios over all rounds.
    """
    cfg.validate()
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    say = log or (lambda message: None)
    budget = parse_budget(budget)
    sweep = [parse_budget(b) for b in budgets] if budgets else []
    floor_base = nonprivate_step_flops(cfg)
    use_opacus = opacus and opacus_available()

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
    elif opacus:
        out["opacus"] = "not installed"
    return out


def format_report(out: dict) -> str:
    """The human-readable table of a ``run_benchmark`` result."""
    c = out["config"]
    lines = [
        f"dpdist bench: GPT {c['layers']} layers, d_model {c['d_model']}, {c['heads']} heads, vocab {c['vocab']} "
        f"(tied, {out['params'] / 1e6:.2f}M params), batch {c['batch']} x {c['seq_len']} tokens, float32, "
        f"{c['steps']} steps (first excluded), {out['threads']} threads, torch {out['torch']}"
        + (f", fastest of {out['rounds']} rounds per mode (peak MB: largest)" if out.get("rounds", 1) > 1 else ""),
        f"non-private step: {out['nonprivate_flops'] / 1e9:.1f} GFLOP (analytic matmul count); "
        f"memory = peak RSS minus RSS after setup (baseline {out['nonprivate_baseline_rss_mb']:.0f} MB)",
        "",
    ]
    header = ("mode", "budget", "step s mean/min", "x time", "x paired", "peak MB", "x mem", "FLOP floor", "time/floor",
              "plan")
    rows = [("non-private", "-", f"{out['nonprivate_step_s']:.3f} / {out['nonprivate_step_min_s']:.3f}", "1.00", "1.00",
             f"{out['nonprivate_peak_mb']:.0f}", "1.00", "1.00", "", "")]

    def plan_text(row: dict) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(row["strategies"].items())) + f"; kept {row['plan_kept_mb']:.0f} MB"

    dp_rows = out.get("frontier") or []
    main = {"clipping": out["clipping"], "budget": out["budget"], "step_s": out["dp_step_s"],
            "step_min_s": out["dp_step_min_s"], "ratio": out["ratio"], "paired_ratio": out["paired_ratio"],
            "peak_mb": out["dp_peak_mb"],
            "memory_ratio": out["memory_ratio"], "flop_floor_ratio": out["flop_floor_ratio"],
            "ratio_over_floor": out["ratio_over_floor"],
            "strategies": out["strategies"], "plan_kept_mb": out["plan_kept_mb"]}
    if not any(r["budget"] == main["budget"] for r in dp_rows):
        dp_rows = [main] + dp_rows
    for r in dp_rows:
        paired = "" if r.get("paired_ratio") is None else f"{r['paired_ratio']:.2f}"
        rows.append((f"dpdist {r['clipping'].replace('_', '-')}", r["budget"], f"{r['step_s']:.3f} / {r['step_min_s']:.3f}",
                     f"{r['ratio']:.2f}", paired, f"{r['peak_mb']:.0f}", f"{r['memory_ratio']:.2f}", f"{r['flop_floor_ratio']:.3f}",
                     f"{r['ratio_over_floor']:.2f}", plan_text(r)))
    if "opacus_step_s" in out:
        rows.append(("opacus ghost (untied)", "-", f"{out['opacus_step_s']:.3f} / {out['opacus_step_min_s']:.3f}",
                     f"{out['opacus_ratio']:.2f}", "", f"{out['opacus_peak_mb']:.0f}", f"{out['opacus_memory_ratio']:.2f}", "", "",
                     f"{out['opacus_params'] / 1e6:.2f}M params; {out['opacus_ratio_vs_plain']:.2f}x its own "
                     f"non-private ({out['plain_nonprivate_step_s']:.3f} s, {out['plain_nonprivate_peak_mb']:.0f} MB)"))
    lines_after = ["x time: ratio of the fresh-process means; x paired: median of the DP step over the non-private "
                   "step just before it, alternating in one process (robust to a machine's slow patches)",
                   "plan: the strategy of each layer with a choice (linear layers and the tied token table); 'kept' is "
                   "what the cost model says the plan keeps beyond a non-private step"]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.extend(lines_after)
    if out.get("dp_microbatch_s") is not None:
        lines.append("")
        lines.append(f"dpdist DP step at budget {out['budget']}: micro-batch (forward, backward, norms, clipped sums) "
                     f"{out['dp_microbatch_s']:.3f} s, release (noise) + update {out['dp_release_and_update_s']:.3f} s")
    shares = dict(out["other_processes_cpu_share"],
                  **{f"dp {r['budget']}": r["other_processes_cpu_share"] for r in out.get("frontier", [])})
    busy = {mode: share for mode, share in shares.items() if share is not None and share > CONTENDED}
    if busy:
        lines.append("warning: other processes used part of the CPU while these were timed: "
                     + ", ".join(f"{mode} {share:.0%}" for mode, share in busy.items())
                     + " of the cores; their times are inflated: rerun on an idle machine (or use --rounds)")
    if out.get("opacus") == "not installed":
        lines.append("opacus is not installed: no Opacus comparison (pip install opacus)")
    return "\n".join(lines)


if __name__ == "__main__":  # worker entry point: python -m dpdist.bench.runner '<json spec>'
    print(RESULT_TAG + json.dumps(run_worker(json.loads(sys.argv[1]))), flush=True)
