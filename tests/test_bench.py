"""``dpdist bench`` smoke test: a tiny model, 2 steps, JSON out, every number present and sane."""
import json

from dpdist.commands import bench
from dpdist.bench.config import BenchConfig, nonprivate_step_flops, parse_budget

TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "--batch", "4",
        "--steps", "2", "--no-opacus", "--json"]


def _run(argv, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_has_positive_measurements(capsys):
    out = _run(TINY + ["--budgets", "0,none"], capsys)
    for key in ("nonprivate_step_s", "dp_step_s", "ratio", "nonprivate_peak_mb", "dp_peak_mb", "flop_floor_ratio"):
        assert isinstance(out[key], (int, float)) and out[key] > 0, (key, out[key])
    assert out["ratio"] == out["dp_step_s"] / out["nonprivate_step_s"]
    assert out["flop_floor_ratio"] >= 1.0
    assert [row["budget"] for row in out["frontier"]] == ["0 MB", "none (FLOP rule)"]
    assert all(row["flop_floor_ratio"] >= 1.0 and row["step_s"] > 0 for row in out["frontier"])
    # the paired timing: one ratio per step after the warm-up one, for every budget
    for row in [out] + out["frontier"]:
        assert len(row["paired_ratios"]) == 1 and row["paired_ratio"] == row["paired_ratios"][0] > 0


def test_bench_without_paired_timing_reports_none(capsys):
    out = _run(TINY + ["--no-paired"], capsys)
    assert out["paired_ratio"] is None and out["paired_ratios"] is None and out["ratio"] > 0


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
    assert out["nonprivate_step_s"] > 0 and out["dp_step_s"] > 0 and out["ratio"] > 0


def test_backend_bench_compares_zero_with_native(capsys):
    """``--backend deepspeed --data 2``: every case ran in its own launch and is reported against its
    non-private twin and the native backend (here ZeRO-2 only, to keep the launches few)."""
    out = _run(["--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "--batch", "4",
                "--steps", "2", "--data", "2", "--backend", "deepspeed", "--zero-stages", "2", "--json"], capsys)
    cases = [(r["backend"], r["zero_stage"], r["private"]) for r in out["rows"]]
    assert cases == [("native", None, False), ("native", None, True), ("deepspeed", 2, False), ("deepspeed", 2, True)]
    for row in out["rows"]:
        assert row["step_s"] > 0 and row["peak_rss_mb"] > 0 and row["dp_over_nonprivate"] > 0
    native_dp = out["rows"][1]
    assert native_dp["time_over_native"] == 1.0 and native_dp["memory_over_native"] == 1.0


def test_backend_bench_refuses_a_single_replica(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--backend", "deepspeed", "--zero-stages", "3"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "--data 2 or more" in err and "--zero-stages must list stages 1 and/or 2" in err
