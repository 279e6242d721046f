"""One step of each benchmark mode, built on one model and one batch: ``setup_*`` returns the step
function ``step(index, parts)`` (``parts`` collects named sub-timings) and what the report needs to
know about the mode.  The non-private and the DP step can run on a GPU and in bf16
(``benchmarks/gpu_check.py``); the step functions do not synchronise the device."""
from __future__ import annotations

import time

import torch
from torch import nn

from .config import BenchConfig, budget_bytes, build_bench_model, make_batch
from .opacus_model import PlainGPT


def _params(model: nn.Module) -> dict:
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _model_and_batch(cfg: BenchConfig, device: str, precision: str) -> tuple:
    """The bench model and batch on ``device``, the model computing in ``precision`` as ``train.precision``
    makes it (fp32 weights; bf16: an autocast forward)."""
    from ..train.precision import apply_precision

    model = build_bench_model(cfg).to(device)
    apply_precision(precision, model, device)
    ids, labels = make_batch(cfg)
    return model, ids.to(device), labels.to(device)


def setup_nonprivate(cfg: BenchConfig, device: str = "cpu", precision: str = "fp32") -> tuple:
    from ..parallel.cross_entropy import per_example_loss

    model, ids, labels = _model_and_batch(cfg, device, precision)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(_: int, parts: dict) -> None:
        per_example_loss(model(ids), labels).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, _params(model)


def setup_dp(cfg: BenchConfig, clipping: str, budget, device: str = "cpu", precision: str = "fp32") -> tuple:
    from ..privacy.rules import rule_for
    from ..privacy.step import native_step

    model, ids, labels = _model_and_batch(cfg, device, precision)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=cfg.batch, secret=1,
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
    counts: dict[str, int] = {}  # over the layers whose rule offers a choice (norm layers and position tables do not);
    # the plan holds the layers with trainable parameters only: under LoRA, the adapters
    for layer, strategy in plan.strategies.items():
        if len(rule_for(layer).choices(layer, cfg.batch, cfg.seq_len, 4)) > 1:
            counts[strategy] = counts.get(strategy, 0) + 1
    info = {**_params(model), "extra_flops": plan.extra_flops,
            "plan_kept_mb": plan.kept_bytes(clipping == "per_layer") / 2**20, "strategies": counts}
    return step, info


def setup_paired(cfg: BenchConfig, clipping: str, budget) -> tuple:
    """The non-private and the DP step alternating in one process: each DP step's time over the
    non-private step just before it.  A slow patch of a shared machine then hits both sides of a pair,
    where the fresh-process means of two modes can land in different patches and move their ratio
    (BENCHMARKS.md, "x paired").  Its peak memory covers both models and is not reported."""
    nonprivate, _ = setup_nonprivate(cfg)
    dp, info = setup_dp(cfg, clipping, budget)

    def step(index: int, parts: dict) -> None:
        start = time.perf_counter()
        nonprivate(index, {})
        mid = time.perf_counter()
        dp(index, {})
        parts.setdefault("paired_ratios", []).append((time.perf_counter() - mid) / (mid - start))

    return step, info


def setup_plain_nonprivate(cfg: BenchConfig) -> tuple:
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


def setup_opacus(cfg: BenchConfig) -> tuple:
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
