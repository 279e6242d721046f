"""``dpdist bench`` on a tiny model, 2 steps: the JSON's ratios are those of the times it reports, its
FLOP floor is the hand-computed one, and the table has the rows asked for."""
import json
import re

import pytest

from dpdist.commands import bench
from dpdist.bench.config import BenchConfig, nonprivate_step_flops, parse_budget
from dpdist.bench.report import format_report

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
                             "mlp_ratio": 4, "seed": 0}
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


def test_backend_bench_compares_zero_with_native(capsys):
    """``--backend deepspeed --data 2``: every case ran in its own launch and is reported against its
    non-private twin and the native backend (here ZeRO-2 only, to keep the launches few)."""
    out = _run(["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "--batch", "4",
                "--steps", "2", "--data", "2", "--backend", "deepspeed", "--zero-stages", "2", "--json"], capsys)
    rows = {(r["backend"], r["zero_stage"], r["private"]): r for r in out["rows"]}
    assert list(rows) == [("native", None, False), ("native", None, True), ("deepspeed", 2, False),
                          ("deepspeed", 2, True)]
    for (backend, stage, private), row in rows.items():
        twin, native = rows[(backend, stage, False)], rows[("native", None, private)]
        assert row["dp_over_nonprivate"] == row["step_s"] / twin["step_s"]
        assert row["time_over_native"] == row["step_s"] / native["step_s"]
        assert row["memory_over_native"] == row["peak_mb"] / native["peak_mb"]


def test_backend_bench_refuses_a_single_replica(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--backend", "deepspeed", "--zero-stages", "3"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "--data 2 or more" in err and "--zero-stages must list stages 1 and/or 2" in err
