"""``dpdist bench`` on a tiny model, 2 steps: the JSON's ratios are those of the times it reports, its
FLOP floor is the hand-computed one, and the table has the rows asked for."""
import json
import re

import pytest

from dpdist.commands import bench
from dpdist.bench.config import BenchConfig, build_bench_model, make_batch, nonprivate_step_flops, parse_budget
from dpdist.bench.report import format_report
from dpdist.bench.runner import OPACUS_SKIPPED

TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "--batch", "4",
        "--steps", "2", "--no-opacus", "--json"]


def _run(argv, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_reports_what_it_measured(capsys):
    out = _run(TINY + ["--budgets", "0,none"], capsys)
    assert out["config"] == {"layers": 1, "d_model": 32, "heads": 2, "vocab": 64, "seq_len": 8, "batch": 4, "steps": 2,
                             "mlp_ratio": 4, "seed": 0, "arch": "gpt", "kv_heads": None, "mlp_hidden": None,
                             "lora_rank": 0, "tie_embeddings": None}
    # two steps per mode, the first one warm-up: mean and min are the second step's time
    for mode in ("nonprivate", "dp"):
        times = out[f"{mode}_step_times_s"]
        assert len(times) == 2 and out[f"{mode}_step_s"] == out[f"{mode}_step_min_s"] == times[1]
    assert out["ratio"] == out["dp_step_s"] / out["nonprivate_step_s"]
    assert out["ratio_min"] == out["dp_step_min_s"] / out["nonprivate_step_min_s"]
    assert out["memory_ratio"] == out["dp_peak_mb"] / out["nonprivate_peak_mb"]
    # the floor by hand: the analytic step (see test_flop_count_and_budget_parsing) plus the cost model's
    # extra work of the all-ghost plan (2T^2 = 128 <= pd for every linear layer and the 64 x 32 table):
    # linear ghost norms 2B * 64 Gram entries * (p + d + 1) = 512 * (129 + 65 + 161 + 161) = 264192;
    # tied table: lookup 4BTd = 4096, output ghost 512 * 97 = 49664, cross term 2BT^2d = 16384;
    # position table 4096; three norm layers 3 * 4BTd = 12288; 350720 in all
    nonprivate = 3 * 4 * (2 * 8 * 12 * 32 * 32 + 4 * 8 * 8 * 32 + 2 * 8 * 32 * 64)
    assert out["nonprivate_flops"] == nonprivate == 2_850_816
    assert out["strategies"] == {"ghost": 5}  # qkv, attention out, fc, mlp out, the tied table
    assert out["flop_floor_ratio"] == pytest.approx((nonprivate + 350_720) / nonprivate, rel=1e-12)
    assert out["ratio_over_floor"] == pytest.approx(out["ratio"] / out["flop_floor_ratio"], rel=1e-12)
    assert [row["budget"] for row in out["frontier"]] == ["0 MB", "none (FLOP rule)"]
    assert out["frontier"][1]["step_s"] == out["dp_step_s"]  # the main budget is the frontier's "none" row
    for row in out["frontier"]:
        assert row["ratio"] == row["step_s"] / out["nonprivate_step_s"]
        # the paired timing: one ratio per step after the warm-up one, for every budget
        assert len(row["paired_ratios"]) == 1 and row["paired_ratio"] == row["paired_ratios"][0]
    rows = [re.split(" {2,}", line)[:2] for line in format_report(out).splitlines()
            if re.match("(non-private|dpdist flat) {2,}", line)]
    assert rows == [["non-private", "-"], ["dpdist flat", "0 MB"], ["dpdist flat", "none (FLOP rule)"]]


def test_bench_without_paired_timing_reports_none(capsys):
    out = _run(TINY + ["--no-paired"], capsys)
    assert out["paired_ratio"] is None and out["paired_ratios"] is None
    assert out["ratio"] == out["dp_step_s"] / out["nonprivate_step_s"]
    assert "frontier" not in out


def test_flop_count_and_budget_parsing():
    cfg = BenchConfig(layers=1, d_model=4, heads=1, vocab=10, seq_len=2, batch=1)
    # forward: linears 2*2*(3*16+16+2*4*16) = 768, attention 4*4*4 = 64, vocab 2*2*4*10 = 160; step = 3x
    assert nonprivate_step_flops(cfg) == 3 * (768 + 64 + 160)
    assert parse_budget("none") == "none" and parse_budget("inf") == "unlimited" and parse_budget("256") == 256.0
    llama = BenchConfig(arch="llama", layers=1, d_model=4, heads=2, vocab=10, seq_len=2, batch=1)
    # 1 key/value head of width 2; SwiGLU width 8 * ceil(floor(32 / 3) / 8) = 16; forward: linears
    # 2*2*(16 [q] + 2*4*2 [k, v] + 16 [o] + 3*4*16 [gate, up, down]) = 960, attention 64, vocab 160 (untied)
    assert (llama.key_value_heads, llama.hidden) == (1, 16)
    assert nonprivate_step_flops(llama) == 3 * (960 + 64 + 160)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("rank", [0, 8])
def test_flop_count_is_what_autograd_runs(arch, rank):
    """torch's own FLOP counter over one non-private step (attention as plain matmuls) counts what the
    analytic F says, also under LoRA, where frozen weights get no weight gradient and the first block's
    q/k/v no input gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dpdist.parallel.cross_entropy import per_example_loss

    cfg = BenchConfig(arch=arch, layers=2, d_model=32, heads=2, vocab=64, seq_len=16, batch=4, lora_rank=rank)
    model = build_bench_model(cfg)
    ids, labels = make_batch(cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        per_example_loss(model(ids), labels).mean().backward()
    assert counter.get_total_flops() == nonprivate_step_flops(cfg)


def test_bench_llama_lora_floor_counts_the_adapters_only(capsys):
    """``--arch llama --lora``: both steps train the adapters alone, the DP plan covers the 28 adapter
    layers and nothing else, and the FLOP floor is the hand count's."""
    from dpdist.bench import steps

    shape = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "16", "--batch", "4",
             "--steps", "2", "--no-paired", "--json"]
    out = _run(shape + ["--arch", "llama", "--lora"], capsys)
    assert {k: out["config"][k] for k in ("arch", "kv_heads", "mlp_hidden", "lora_rank")} == {
        "arch": "llama", "kv_heads": None, "mlp_hidden": None, "lora_rank": 8}
    # per block, 7 adapter pairs of rank 8: lora_A r * in = 8 * (6 * 32 + 88), lora_B r * out =
    # 8 * (32 + 16 + 16 + 32 + 88 + 88 + 32)
    assert out["trainable_params"] == 2 * (8 * 280 + 8 * 304) == 9344
    # F per example (2T = 32): base linears in*out = 11520 per block (q, k, v: 2048), forward and input
    # gradient but none for block 0's q, k, v; lora_A in*r = 2240 per block (q, k, v: 768), forward,
    # weight and (but block 0's q, k, v) input gradient; lora_B r*out = 2432, three times; attention
    # 12 T^2 d per block; lm_head forward and input gradient 2 * 2TdV
    per_example = (32 * (2 * 2 * 11520 - 2048) + 32 * (3 * 2 * 2240 - 768) + 32 * 3 * 2 * 2432
                   + 2 * 12 * 16 * 16 * 32 + 2 * 32 * 32 * 64)
    assert out["nonprivate_flops"] == 4 * per_example == 10_436_608
    # the plan, by the FLOP rule 2T^2 = 512 <= pd: ghost for gate's and up's lora_B (88 x 8) and down's
    # lora_A (8 x 88), at 2B * T^2 * (p + d + 1) = 8 * 256 * 97 each (one Gram block at T = 16);
    # materialise, 4B pd, for the other 11 adapters of a block (pd: 9 x 256 + 2 x 128)
    assert out["strategies"] == {"ghost": 6, "materialise": 22}
    extra = 2 * (3 * 8 * 256 * 97 + 16 * (9 * 256 + 2 * 128))
    assert out["flop_floor_ratio"] == pytest.approx((10_436_608 + extra) / 10_436_608, rel=1e-12)
    assert out["ratio"] == out["dp_step_s"] / out["nonprivate_step_s"]
    assert out["ratio_over_floor"] == pytest.approx(out["ratio"] / out["flop_floor_ratio"], rel=1e-12)
    assert out["opacus"] == OPACUS_SKIPPED
    # full fine-tuning of the same shape clips every layer (norms and both tables too): a higher floor
    full = BenchConfig(arch="llama", layers=2, d_model=32, heads=2, vocab=64, seq_len=16, batch=4)
    _, info = steps.setup_dp(full, "flat", "none")
    assert info["trainable_params"] == info["params"] == out["params"] - 9344  # the base model alone
    assert out["flop_floor_ratio"] < (nonprivate_step_flops(full) + info["extra_flops"]) / nonprivate_step_flops(full)
    report = format_report(out)
    rows = [re.split(" {2,}", line)[:2] for line in report.splitlines()
            if re.match("(non-private|dpdist) [^:]* {2,}", line)]
    assert rows == [["non-private LoRA", "-"], ["dpdist flat LoRA", "none (FLOP rule)"]]
    assert f"opacus: {OPACUS_SKIPPED}" in report


def test_bench_refuses_lora_outside_one_process(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    for argv, message in ((["--lora", "--tensor", "2"], "--lora belongs to the single-process benchmark"),
                          (["--arch", "llama", "--tensor", "2"], "--arch llama belongs to the single-process and the "
                                                                 "--backend benchmarks"),
                          (["--lora-rank", "4"], "--lora-rank must be > 0 and comes with --lora"),
                          (["--kv-heads", "2"], "--kv-heads and --mlp-hidden are for --arch llama")):
        args = parser.parse_args(["bench", *argv])
        assert args.func(args) == 2
        assert message in capsys.readouterr().err


def test_parallel_bench_counts_what_dp_adds(capsys):
    """``--data 2 --tensor 2`` under torchrun: DP adds exactly one all-reduce of the local batch's
    B-vector (2 examples per replica, float32: 8 bytes) over the tensor group, and nothing over the
    data group (the clipped sums replace the gradient all-reduce, byte for byte)."""
    out = _run(["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "63", "--seq-len", "8", "--batch", "4",
                "--steps", "2", "--data", "2", "--tensor", "2", "--json"], capsys)
    assert (out["data"], out["tensor"], out["local_batch"]) == (2, 2, 2)
    assert out["dp_added_calls"] == {"tensor": 1} and out["dp_added_bytes"] == {"tensor": 2 * 4}
    assert out["nonprivate_comm"]["bytes"]["data"] == out["dp_comm"]["bytes"]["data"] == out["gradient_allreduce_bytes"]
    assert out["ratio"] == out["dp_step_s"] / out["nonprivate_step_s"]
    assert out["ratio_paired_median"] == out["ratio"]  # one timed step: its pair is the whole measurement


def test_backend_bench_compares_zero_and_fsdp_with_native(capsys):
    """``--backend all --data 2``: every case ran in its own launch and is reported against its
    non-private twin and the native backend (here ZeRO-2 only, to keep the launches few); the DP cases
    report the time they spent adding noise, DeepSpeed's in its optimizer hook included."""
    out = _run(["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "--batch", "4",
                "--steps", "2", "--data", "2", "--backend", "all", "--zero-stages", "2", "--json"], capsys)
    assert (out["backends"], out["threads_per_rank"]) == (["deepspeed", "fsdp"], 1)
    rows = {(r["backend"], r["zero_stage"], r["private"]): r for r in out["rows"]}
    assert list(rows) == [("native", None, False), ("native", None, True), ("deepspeed", 2, False),
                          ("deepspeed", 2, True), ("fsdp", None, False), ("fsdp", None, True)]
    for (backend, stage, private), row in rows.items():
        twin, native = rows[(backend, stage, False)], rows[("native", None, private)]
        assert row["dp_over_nonprivate"] == row["step_s"] / twin["step_s"]
        assert row["time_over_native"] == row["step_s"] / native["step_s"]
        assert row["memory_over_native"] == row["peak_mb"] / native["peak_mb"]
        assert row["from_start_over_native"] == row["from_start_mb"] / native["from_start_mb"]
        assert row["from_start_mb"] >= row["peak_mb"]  # its baseline is taken before the model exists
        assert (row["noise_s"] > 0) if private else row["noise_s"] is None


def test_noise_clock_times_the_noise_and_not_the_step():
    """The wrapped seam counts its own calls and returns what the seam returns; around an optimizer's
    pre-hooks the clock counts those registered before it (the backend's noise), not the step, and
    nothing once closed."""
    import time

    import torch

    from dpdist.bench.noise import NoiseClock

    clock = NoiseClock()
    seam = clock.seam(lambda release, released, grads, stds: time.sleep(0.05) or [g + release for g in grads])
    assert torch.equal(seam(3, [], [torch.zeros(2)], [1.0])[0], torch.full((2,), 3.0))
    assert 0.05 <= clock.take() < 0.5 and clock.take() == 0.0
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    optimizer = torch.optim.SGD([param], lr=1.0)
    optimizer.register_step_pre_hook(lambda *args: time.sleep(0.05))  # the backend's noise
    clock.around_pre_hooks(optimizer)
    optimizer.register_step_post_hook(lambda *args: time.sleep(0.5))  # the optimizer's own work: not noise
    optimizer.step()
    assert 0.05 <= clock.take() < 0.5
    assert torch.equal(param.detach(), torch.full((2,), -1.0))
    clock.close()
    optimizer.step()
    assert clock.take() == 0.0


def test_backend_bench_refuses_a_single_replica_for_zero(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--backend", "deepspeed", "--zero-stages", "3"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "give --data 2 or more" in err and "--zero-stages must list stages 1 and/or 2" in err
    args = parser.parse_args(["bench", "--backend", "all", "--data", "1"])
    assert args.func(args) == 2
    assert "--backend all runs DeepSpeed ZeRO" in capsys.readouterr().err


def test_bench_refuses_activation_checkpointing_outside_the_backend_bench(capsys):
    """``--activation-checkpointing`` takes train.activation_checkpointing's values and runs with
    ``--backend`` only."""
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    for argv in (["--activation-checkpointing", "blocks"], ["--activation-checkpointing", "blocks", "--data", "2"]):
        args = parser.parse_args(["bench", *argv])
        assert args.func(args) == 2
        assert capsys.readouterr().err.strip() == ("error: --activation-checkpointing belongs to the backend benchmark: "
                                                   "give --backend fsdp, deepspeed or all")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--backend", "fsdp", "--activation-checkpointing", "layers"])
    assert "argument --activation-checkpointing: invalid choice: 'layers'" in capsys.readouterr().err
