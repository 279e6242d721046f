"""``benchmarks/gpu_check.sh``, the one-shot GPU check, on the CPU: ``--device cpu --tiny`` prints one
table with every row and exits 0; its verdicts, its reading of pytest's and ``dpdist plan``'s reports
and the runs it hands the plan are checked against hand-written references."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpdist.bench.config import BenchConfig, build_bench_model, make_batch, model_config
from dpdist.config import load_config

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_tiny_run_prints_one_table_with_every_row_and_exits_0(tmp_path):
    wheels = tmp_path / "wheels"  # empty: whatever the venv lacks stays missing, and says so
    wheels.mkdir()
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--tiny", "--wheels", str(wheels),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DP / non-private") == 1  # one table
    report = json.loads(out.read_text())
    rows = {row["check"]: row for row in report["rows"]}
    runs = [f"{label} B4 T32 {mode}" for label in ("gpt-tiny", "llama-tiny")
            for mode in ("non-private", "DP flat", "DP per_layer")]
    assert list(rows) == ["CUDA tests (pytest -k cuda)", *runs, "noise keyed_normal on cpu", "wall time of this check"]
    for check, row in rows.items():
        assert check in proc.stdout and row["result"] in proc.stdout and not row["error"], row
    tests = rows["CUDA tests (pytest -k cuda)"]
    assert tests["result"] == "SKIP (no CUDA device)" and tests["numbers"]["skipped"] >= 1
    assert tests["numbers"]["failed"] == tests["numbers"]["errors"] == tests["numbers"]["passed"] == 0
    for label in ("gpt-tiny", "llama-tiny"):
        ref = rows[f"{label} B4 T32 non-private"]["numbers"]
        for clipping, floor in (("flat", 0.8), ("per_layer", 0.9)):
            row = rows[f"{label} B4 T32 DP {clipping}"]
            ratio = row["numbers"]["tokens_per_s"] / ref["tokens_per_s"]
            assert row["numbers"]["tokens_ratio"] == ratio and row["ratio"] == f"{ratio:.2f}x tok/s"
            assert row["result"] == ("PASS" if ratio >= floor else "FAIL (tok/s)")
            assert row["numbers"]["peak_bytes"] is None  # no allocator statistics on a CPU
            assert row["plan"] != "-", row  # dpdist plan's prediction beside the measurement
    assert rows["noise keyed_normal on cpu"]["numbers"]["normals_per_s"] > 0
    assert report["failed"] == []


def test_a_dp_row_passes_at_its_targets_and_fails_past_them():
    ref = {"tokens_per_s": 100.0, "peak_bytes": 1000.0}
    at_targets = {"tokens_per_s": 80.0, "peak_bytes": 1100.0}
    assert gpu_check.judge(at_targets, ref, "flat") == ("0.80x tok/s, 1.10x mem", "PASS")
    assert gpu_check.judge({"tokens_per_s": 79.0, "peak_bytes": 1100.0}, ref, "flat")[1] == "FAIL (tok/s)"
    assert gpu_check.judge({"tokens_per_s": 89.0, "peak_bytes": 1000.0}, ref, "per_layer")[1] == "FAIL (tok/s)"
    assert gpu_check.judge({"tokens_per_s": 90.0, "peak_bytes": 1101.0}, ref, "per_layer")[1] == "FAIL (mem)"
    assert gpu_check.judge({"tokens_per_s": 50.0, "peak_bytes": 2000.0}, ref, "flat")[1] == "FAIL (tok/s, mem)"
    # on a CPU no peak is measured: speed alone is judged
    assert gpu_check.judge({"tokens_per_s": 95.0, "peak_bytes": None}, {"tokens_per_s": 100.0, "peak_bytes": None},
                           "per_layer") == ("0.95x tok/s", "PASS")


def test_pytest_counts_come_from_its_junit_report(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" '
                      'tests="10" time="1.0"></testsuite></testsuites>')
    assert gpu_check.junit_counts(report) == {"passed": 4, "failed": 2, "errors": 1, "skipped": 3}


def test_plan_columns_read_the_plan_json_schema():
    out = {"schema": 1, "run": {"time_s": {"step": 0.5, "nonprivate_step": 0.25},
                                "memory_bytes": {"peak": 3 * 2**30, "nonprivate_peak": 2 * 2**30}}}
    columns = gpu_check.plan_columns(out, 8 * 1024)
    assert columns == {"dp": {"tokens_per_s": 16384.0, "peak_bytes": 3 * 2**30},
                       "nonprivate": {"tokens_per_s": 32768.0, "peak_bytes": 2 * 2**30}}
    assert gpu_check.plan_text(columns["nonprivate"]) == "32,768 tok/s, 2.00 GiB"
    assert gpu_check.plan_text(columns["dp"], columns["nonprivate"]) == "16,384 tok/s (0.50x), 3.00 GiB (1.50x)"
    assert gpu_check.plan_text({"tokens_per_s": 1.0, "peak_bytes": 3 * 2**20}) == "1 tok/s, 3.0 MiB"


@pytest.mark.parametrize("label", ["gpt2-124m", "llama-1b"])
def test_the_plan_is_asked_about_the_model_that_is_measured(label):
    """The overrides handed to `dpdist plan` load (with dpdist's own config loader) into the model config
    that the bench step builds, and into its micro-batch, sequence length, precision and clipping."""
    cfg = BenchConfig(**dict(gpu_check.FULL.runs)[label])
    run = load_config(None, gpu_check.plan_overrides(cfg, "per_layer", "cpu"))
    bench = model_config(cfg)
    for key in ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "hidden", "max_seq_len",
                "tie_embeddings", "norm", "bias", "dtype"):
        assert getattr(run.model, key) == getattr(bench, key), key
    assert (run.data.seq_len, run.data.vocab_size, run.train.micro_batch_size, run.train.batch_size) == (
        1024, cfg.vocab, cfg.batch, cfg.batch)
    assert (run.train.precision, run.train.optimizer, run.privacy.clipping) == ("bf16", "sgd", "per_layer")


def test_the_tied_llama_bench_model_shares_its_head_with_the_embedding():
    shape = dict(arch="llama", layers=2, d_model=32, heads=4, kv_heads=2, mlp_hidden=48, vocab=64, seq_len=8)
    tied, untied = (build_bench_model(BenchConfig(**shape, tie_embeddings=tie)) for tie in (True, None))
    assert tied.lm_head is None and untied.lm_head is not None
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 64 * 32
    with pytest.raises(ValueError, match="tie_embeddings=False is for --arch llama"):
        BenchConfig(tie_embeddings=False).validate()


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "--device cpu needs --tiny"),
    (["--device", "cpu", "--tiny", "--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels is not a folder"),
])
def test_a_check_that_cannot_start_says_why_and_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


ON_DEVICE = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", ON_DEVICE)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_a_dp_step_on_the_device_releases_the_cpus_gradient(arch, clipping, device):
    """The check's GPU rows time the engine on the device: there, in float64, it releases the CPU's noisy
    clipped gradient (its norms up to rounding, its noise bit for bit).  ``-k cuda`` selects the cuda
    case, which the GPU check runs; the cpu case checks this test against itself."""
    from dpdist.model import build_model
    from dpdist.privacy.step import native_step

    cfg = BenchConfig(arch=arch, layers=2, d_model=32, heads=4, vocab=64, seq_len=16, batch=4,
                      tie_embeddings=True, **({"kv_heads": 2, "mlp_hidden": 48} if arch == "llama" else {}))
    ids, labels = make_batch(cfg)
    grads = {}
    for where in ("cpu", device):
        model = build_model(dataclasses.replace(model_config(cfg), dtype="float64"), device=where)
        engine = native_step(model, clip_norm=0.05, noise_multiplier=1.0, expected_batch_size=cfg.batch, secret=7,
                             clipping=clipping, micro_batch_size=cfg.batch, seq_len=cfg.seq_len)
        stats = engine.microbatch(ids.to(where), labels.to(where))
        engine.release(3)
        assert stats.clipped == cfg.batch  # a clip norm every example exceeds: the clip factors matter
        grads[where] = {name: p.grad.cpu() for name, p in model.named_parameters()}
    assert grads["cpu"].keys() == grads[device].keys()
    for name, grad in grads["cpu"].items():
        assert grad.dtype == torch.float64
        torch.testing.assert_close(grads[device][name], grad, rtol=1e-10, atol=1e-14, msg=name)
