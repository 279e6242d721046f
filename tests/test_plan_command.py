"""``dpdist plan``: its numbers for a tiny model against hand computations and against the engine and
``dpdist bench`` themselves, the does-not-fit verdict and its suggestion, the JSON schema, the time limit."""
import dataclasses
import json
import time

import pytest

from dpdist.bench.config import BenchConfig, nonprivate_step_flops, planned_peak_mb
from dpdist.cli import main
from dpdist.commands.plan import plan
from dpdist.config import load_config
from dpdist.model import build_model
from dpdist.plan.memory import memory
from dpdist.plan.shapes import build_shard
from dpdist.privacy.step import native_step

from helpers import ROOT

D, L, H, V, S, B = 32, 2, 2, 96, 16, 4  # width, blocks, heads, vocabulary, tokens, micro-batch
TINY = [f"model.d_model={D}", f"model.n_layers={L}", f"model.n_heads={H}", f"model.max_seq_len={S}",
        f"data.seq_len={S}", f"data.vocab_size={V}", "model.dtype=float64", f"train.micro_batch_size={B}",
        "train.batch_size=8", "privacy.noise_multiplier=1.0"]


def gpt_block_params(tensor: int) -> int:
    """One GPT block's parameters on one tensor rank, by hand: the column-parallel weights and biases
    (qkv, fc) and the row-parallel weights (proj) split over the ranks; the norms and the row-parallel
    biases replicated."""
    d, h = D, 4 * D
    return 2 * 2 * d + (3 * d * d + 3 * d) // tensor + d * d // tensor + d + (d * h + h) // tensor + h * d // tensor + d


def gpt_params(tensor: int) -> int:
    """Blocks, the vocabulary table (split over the ranks), positions and the final norm (replicated)."""
    return V // tensor * D + S * D + L * gpt_block_params(tensor) + 2 * D


def tiny(*overrides):
    cfg = load_config(None, TINY + list(overrides))
    return cfg, build_shard(cfg, cfg.parallel.tensor)


@pytest.mark.parametrize("tensor", [1, 2])
def test_shard_parameters_match_a_hand_count(tensor):
    _, shard = tiny(f"parallel.tensor={tensor}")
    assert shard.params == shard.trainable == gpt_params(tensor)
    assert shard.block_params == gpt_block_params(tensor)
    assert shard.largest_trainable == D * 4 * D // tensor  # an MLP weight (the table is smaller here)


LLAMA = ["model.arch=llama", "model.norm=rmsnorm", "model.bias=false", "model.n_kv_heads=1", "model.mlp_hidden=80",
         "model.tie_embeddings=false"]


@pytest.mark.parametrize("arch", [[], LLAMA], ids=["gpt", "llama"])
def test_shard_parameters_match_a_built_model(arch):
    cfg, shard = tiny(*arch)
    built = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": V}))
    assert shard.params == sum(p.numel() for p in built.parameters())


def test_weights_optimizer_and_fsdp_share_by_hand():
    cfg, shard = tiny()
    P = gpt_params(1)
    native = memory(cfg, shard, V)
    assert native.weights == 8 * P and native.optimizer == 2 * 8 * P  # float64 weights, two AdamW slots
    assert native.gradients == 8 * P  # float64 sums (fp32 or wider)
    sharded = memory(load_config(None, TINY + ["train.backend=fsdp", "parallel.data=4"]), shard, V)
    assert sharded.weights == native.weights / 4 and sharded.optimizer == native.optimizer / 4
    assert sharded.gradients == native.gradients / 4 + 8 * D * 4 * D  # and one whole MLP sum, reduce-scattered
    sgd = memory(load_config(None, TINY + ["train.optimizer=sgd"]), shard, V)
    momentum = memory(load_config(None, TINY + ["train.optimizer=sgd", "train.momentum=0.9"]), shard, V)
    assert sgd.optimizer == 0 and momentum.optimizer == 8 * P


@pytest.mark.parametrize("checkpointing", ["none", "blocks"])
def test_activations_follow_the_stated_formula(checkpointing):
    cfg, shard = tiny(f"train.activation_checkpointing={checkpointing}")
    block = 4 * D * 8 + (5 * D + 2 * 4 * D) * 8  # float64: the norms' inputs and outputs, attention, MLP
    head = 2 * D * 8 + 3 * V * 4
    if checkpointing == "none":
        expected = L * block + head
    else:  # the blocks' inputs, then the head or, once its log-softmax is freed, one block recomputed
        expected = L * D * 8 + max(head, block + 2 * D * 8)
    assert memory(cfg, shard, V).activations == B * S * expected


@pytest.mark.parametrize("arch", [[], LLAMA], ids=["gpt", "llama"])
def test_checkpointed_bookkeeping_holds_the_recorded_inputs_by_hand(arch):
    """Under checkpointing, book-keeping's tap keeps each recomputed block's linear inputs (all ghost here)
    to the end of the backward: the two norms' outputs, the merged heads and the MLP's activation (GELU's
    output; SwiGLU's product), q/k/v and gate/up sharing theirs; a materialised layer keeps none."""
    from dpdist.plan.memory import recorded_input_bytes

    cfg, shard = tiny(*arch, "train.activation_checkpointing=blocks")
    strategies = shard.plan(B, S, budget_bytes=None, per_layer=False).strategies
    recorded = (3 * D + (80 if arch else 4 * D)) * 8
    assert recorded_input_bytes(cfg, shard, strategies) == recorded
    assert recorded_input_bytes(cfg, shard, dict.fromkeys(strategies, "materialise")) == 0
    mem = memory(cfg, shard, V)
    block = 4 * D * 8 + (5 * D + (4 * 80 if arch else 2 * 4 * D)) * 8
    after_head = B * S * (L * D * 8 + block + (L - 1) * recorded + 2 * D * 8)  # the logits' gradient: in the buffers
    held = mem.backward_peak - (mem.weights + mem.copies + mem.gradients + mem.optimizer + mem.runtime)
    assert held == max(mem.activations, after_head + mem.norm_buffers)


def test_llama_activations_and_copies_by_hand():
    cfg, shard = tiny(*LLAMA, "model.dtype=float32", "train.precision=bf16")
    block = 2 * D * 4 + 2 * D * 2 + (5 * D + 4 * 80) * 2  # fp32 residual stream, bf16 norm outputs and the rest
    head = D * 4 + D * 2 + 3 * V * 4
    mem = memory(cfg, shard, V)
    assert mem.activations == B * S * (L * block + head)
    assert mem.copies == 2 * shard.params  # the autocast casts each layer keeps for its backward
    fsdp = memory(load_config(None, TINY + LLAMA + ["model.dtype=float32", "train.precision=bf16", "train.backend=fsdp"]),
                  shard, V)
    root = shard.params - L * shard.block_params  # embeddings and final norm, gathered for the whole step
    assert fsdp.copies == 2 * (root + 2 * shard.block_params)  # and two gathered blocks, in bf16


@pytest.mark.parametrize("budget", [None, 0.05])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_norm_buffers_and_flop_floor_are_the_engines(budget, clipping):
    overrides = [f"privacy.clipping={clipping}"] + ([f"privacy.memory_budget_mb={budget}"] if budget else [])
    out = plan(None, TINY + overrides, "cpu")
    cfg = load_config(None, TINY + overrides)
    model = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": V}))
    step = native_step(model, clip_norm=1.0, expected_batch_size=8.0, clipping=clipping, micro_batch_size=B, seq_len=S,
                       memory_budget_bytes=budget * 2**20 if budget else None)
    run = out["run"]
    assert run["memory_bytes"]["norm_buffers"] == step.plan.kept_bytes(clipping == "per_layer")
    base = nonprivate_step_flops(BenchConfig(layers=L, d_model=D, heads=H, vocab=V, seq_len=S, batch=B))
    assert run["flops"]["flop_floor_ratio"] == pytest.approx((base + step.plan.extra_flops) / base, rel=1e-12)
    assert run["flops"]["micro_batches"] == 2 and run["flops"]["nonprivate"] == 2 * base


def test_flop_floor_matches_dpdist_bench_for_its_model():
    from dpdist.bench.steps import setup_dp

    bench = BenchConfig()
    _, info = setup_dp(bench, "flat", "none")
    base = nonprivate_step_flops(bench)
    out = plan(None, [f"model.n_layers={bench.layers}", f"model.d_model={bench.d_model}", f"model.n_heads={bench.heads}",
                      f"data.vocab_size={bench.vocab}", f"model.max_seq_len={bench.seq_len}", f"data.seq_len={bench.seq_len}",
                      f"train.micro_batch_size={bench.batch}", f"train.batch_size={bench.batch}",
                      "privacy.noise_multiplier=1.0"], "cpu")
    assert out["run"]["flops"]["flop_floor_ratio"] == pytest.approx((base + info["extra_flops"]) / base, rel=1e-12)


def test_a_run_that_does_not_fit_names_the_largest_term_and_a_change_that_fits(capsys):
    overrides = ["train.micro_batch_size=256"]
    code = main(["plan", "--config", str(ROOT / "configs/gpt2-small.yaml"), *overrides, "--hardware", "h100-80gb"])
    text = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in text and "largest term: activations" in text and "smallest change that fits:" in text
    out = plan(str(ROOT / "configs/gpt2-small.yaml"), overrides, "h100-80gb")
    assert not out["fits"] and out["largest_term"] == "activations"
    change = out["suggestion"]
    assert change["row"]["fits"]
    again = plan(str(ROOT / "configs/gpt2-small.yaml"), overrides + change["command"].split(), "h100-80gb")
    assert again["fits"] and again["run"]["memory_bytes"]["peak"] == change["row"]["memory_bytes"]["peak"]


def test_a_run_that_fits_says_so(capsys):
    assert main(["plan", *TINY, "--hardware", "h100-80gb"]) == 0
    assert "fits: peak" in capsys.readouterr().out


def test_json_schema(capsys):
    assert main(["plan", *TINY, "parallel.data=2", "--hardware", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == 1 and out["vocab_size"] == V and out["params"] == gpt_params(1)
    assert set(out) == {"schema", "hardware", "efficiency", "vocab_size", "params", "fits", "largest_term", "run",
                        "suggestion", "layouts"}
    terms = {"weights", "copies", "gradients", "optimizer", "activations", "norm_buffers", "noise", "runtime"}
    assert set(out["run"]["memory_bytes"]) == terms | {"backward_peak", "release_peak", "peak", "nonprivate_peak"}
    assert set(out["run"]["time_s"]) == {"step", "compute", "memory", "noise", "communication", "nonprivate_step"}
    assert {r["layout"] for r in out["layouts"]} == {"native 2x1", "fsdp 2x1", "deepspeed ZeRO-1 2x1",
                                                      "deepspeed ZeRO-2 2x1", "native 1x2", "fsdp 1x2"}
    assert out["run"]["collective_bytes"]["data"] == 8 * gpt_params(1)  # one all-reduce of the float64 sums


def test_refused_inputs_are_one_line(capsys):
    assert main(["plan", *TINY, "--efficiency", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --efficiency must be in (0, 1]; got 1.5"
    assert main(["plan", *TINY, "model.n_heads=3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_gpt2_small_plans_in_under_ten_seconds():
    start = time.perf_counter()
    out = plan(str(ROOT / "configs/gpt2-small.yaml"), [], "h100-80gb")
    assert time.perf_counter() - start < 10
    assert out["fits"] and out["vocab_size"] == 32000


def test_a_70b_llama_plans_in_under_ten_seconds():
    """The largest shape the project plans for: 80 blocks of its 70B Llama, every layout of 8 devices."""
    start = time.perf_counter()
    out = plan(str(ROOT / "configs/shapes/llama-3.1-70b.yaml"), [], "h100-80gb")
    assert time.perf_counter() - start < 10
    # fp32 weights, gradients and AdamW need 16 bytes a parameter: no layout of 8 holds them
    assert not out["fits"] and out["params"] > 70e9 and out["largest_term"] == "optimizer" and out["suggestion"] is None


def memory_cases() -> list[tuple[str, str, int, int, str]]:
    """(arch, backend, data, tensor, checkpointing): each model and backend at each layout it runs at
    (ZeRO-2 shards over the data group: 2 x 1 only), and with and without checkpointing; the two models
    take opposite settings at each layout, so each layout is measured both ways too."""
    layouts = {"native": [(1, 1), (2, 1), (1, 2)], "deepspeed": [(2, 1), (2, 1)], "fsdp": [(1, 1), (2, 1), (1, 2)]}
    return [(arch, backend, data, tensor, ("none", "blocks")[(first + k) % 2])
            for first, arch in enumerate(("gpt", "llama")) for backend, shapes in layouts.items()
            for k, (data, tensor) in enumerate(shapes)]


@pytest.mark.slow
@pytest.mark.parametrize("arch, backend, data, tensor, checkpointing", memory_cases(),
                         ids=lambda value: str(value))
def test_predicted_memory_per_rank_is_within_15_percent_of_dpdist_bench(arch, backend, data, tensor, checkpointing):
    """One DP case of ``dpdist bench --backend`` (the DP peak holds every term of the non-private one and
    the norm buffers), its own launch: the measured MB from start (peak RSS over the RSS before the model
    is built, largest rank) against the plan of the same model, batch share, backend and checkpointing.
    Two steps: the second holds AdamW's state, as every later one does."""
    from dpdist.bench.backend import run_case

    bench = BenchConfig(arch=arch, steps=2)
    stage = 2 if backend == "deepspeed" else None
    measured = run_case(dataclasses.asdict(bench), data=data, tensor=tensor, clipping="flat", backend=backend,
                        stage=stage, private=True, activation_checkpointing=checkpointing)["from_start_mb"]
    predicted = planned_peak_mb(bench, data, tensor, backend, stage, True, checkpointing=checkpointing)
    assert predicted == pytest.approx(measured, rel=0.15), (
        f"{arch} {backend} {data}x{tensor} checkpointing={checkpointing}: predicted {predicted:.0f} MiB, "
        f"measured {measured:.0f} MiB")


def test_the_pre_launch_check_refuses_with_the_plans_numbers():
    from dpdist.config import ConfigError
    from dpdist.plan.check import check_fits
    from dpdist.plan.hardware import hardware

    check_fits(load_config(None, TINY), hardware("cpu"))  # fits: nothing raised
    check_fits(load_config(None, TINY), None)  # no device to check against
    big = load_config(str(ROOT / "configs/gpt2-small.yaml"), ["train.micro_batch_size=256"])
    with pytest.raises(ConfigError) as refused:
        check_fits(big, hardware("h100-80gb"))
    message = str(refused.value)
    suggestion = plan(str(ROOT / "configs/gpt2-small.yaml"), ["train.micro_batch_size=256"], "h100-80gb")["suggestion"]
    assert "\n" not in message and "does not fit h100-80gb" in message and "largest term activations" in message
    assert f"set {suggestion['command']} (peak" in message


def test_dpdist_train_refuses_a_run_its_device_cannot_hold(tmp_path, capsys):
    """Before preparing anything: the one-line error, exit 2, no run directory."""
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(ROOT / "configs/gpt2-small.yaml"), "parallel.device=cpu",
                 "parallel.data=1", "train.micro_batch_size=512", f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "the run does not fit" in err and "dpdist plan predicts a peak" in err
    assert len(err.strip().splitlines()) == 1 and not run_dir.exists()
