"""``train.activation_checkpointing=blocks`` (issue 16, item 3): each transformer block is recomputed in
the backward, its module tree and parameter names are unchanged, and recomputation does not disturb
the tap: float64 training through ``dpdist train``'s loop, noise on, ends in the weights of the run
without checkpointing (rel 1e-9) for ghost and materialised norms, per-layer clipping, two-pass
clipping, a Llama, and at tensor degree 2 (one launch).
"""
import pytest
import torch

from dpdist import ModelConfig, build_model
from dpdist.privacy.step import native_step
from dpdist.train.activation_checkpointing import apply_activation_checkpointing
from dpdist.train.precision import apply_precision

from helpers.compare import assert_close_at_scale
from helpers.launch import torchrun
from helpers.runs import final_model, prepared, train_in_process

VOCAB, SEQ = 37, 8


def tiny(arch="gpt", checkpointing="none"):
    model = build_model(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=SEQ, arch=arch,
                                    dtype="float64", tie_embeddings=arch == "gpt"))
    apply_activation_checkpointing(checkpointing, model)
    return model


def batch(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (size, SEQ), generator=generator),
            torch.randint(0, VOCAB, (size, SEQ), generator=generator))


def mlp_calls(model) -> list:
    """A list that grows by one as every forward of a block's MLP starts (a recomputation stops as soon
    as it has refilled the last saved tensor, before the MLP's forward returns)."""
    calls = []
    for block in model.blocks if model.cfg.arch == "gpt" else model.layers:
        block.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_blocks_are_recomputed_in_the_backward_while_training(arch):
    for checkpointing, forwards in (("none", 2), ("blocks", 4)):  # 2 blocks, each once more when recomputed
        model = tiny(arch, checkpointing)
        calls = mlp_calls(model)
        engine = native_step(model, clip_norm=0.1)
        engine.microbatch(*batch())
        assert len(calls) == forwards, checkpointing
        calls.clear()
        model.eval()
        model(batch()[0]).sum().backward()  # not training: nothing recomputed
        assert len(calls) == 2


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_names_and_modules_are_unchanged(arch):
    plain, checkpointed = tiny(arch), tiny(arch, "blocks")
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    assert [type(m) for m in plain.modules()] == [type(m) for m in checkpointed.modules()]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("options", [{"strategy": "ghost"}, {"strategy": "materialise"}, {"clipping": "per_layer"},
                                     {"mode": "two_pass"}, {"clipping": "automatic"}])
def test_checkpointed_clipped_sums_equal_plain_ones(arch, options):
    sums = {}
    for checkpointing in ("none", "blocks"):
        engine = native_step(tiny(arch, checkpointing), clip_norm=0.05, **options)
        engine.microbatch(*batch())
        sums[checkpointing] = engine.clipped_sums()
    assert_close_at_scale(sums["blocks"], sums["none"], rel=1e-9)


# "mixed": the planner's default, ghost norms on some layers and materialised ones on the others; "ghost":
# the least memory, ghost norms on every layer.  (Every layer materialised is checked above.)
def test_checkpointing_under_bf16_recomputes_in_bf16():
    sums = {}
    for checkpointing in ("none", "blocks"):
        model = build_model(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=SEQ))
        apply_precision("bf16", model, "cpu")
        apply_activation_checkpointing(checkpointing, model)
        engine = native_step(model, clip_norm=0.05)
        engine.microbatch(*batch())
        sums[checkpointing] = engine.clipped_sums()
    for name, value in sums["none"].items():
        assert torch.equal(sums["blocks"][name], value), name  # the recomputed forward is the same bf16 forward


SETTINGS = {"mixed": (), "ghost": ("privacy.memory_budget_mb=0",), "per_layer": ("privacy.clipping=per_layer",),
            "two_pass": ("privacy.mode=two_pass",), "llama": ("model.arch=llama", "model.tie_embeddings=false")}


def assert_same_weights(run_dir, checkpointed_dir, what):
    assert_close_at_scale(final_model(checkpointed_dir), final_model(run_dir), rel=1e-9, what=what)


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS)
def test_training_with_checkpointing_ends_in_the_same_weights(tmp_path, cache, setting):
    runs = {}
    for checkpointing in ("none", "blocks"):
        runs[checkpointing] = prepared(cache, tmp_path / checkpointing, 1, 1, "float64", *SETTINGS[setting],
                                       f"train.activation_checkpointing={checkpointing}")
        train_in_process(runs[checkpointing])
    assert_same_weights(runs["none"], runs["blocks"], f"{setting}: ")


@pytest.mark.slow
def test_training_with_checkpointing_at_tensor_degree_two(tmp_path, cache):
    pairs = {setting: [prepared(cache, tmp_path / f"{setting}-{c}", 1, 2, "float64", *SETTINGS[setting],
                                f"train.activation_checkpointing={c}") for c in ("none", "blocks")]
             for setting in ("mixed", "per_layer", "two_pass")}
    torchrun("checkpointing_steps.py", 2, *(run for pair in pairs.values() for run in pair))
    for setting, (plain, checkpointed) in pairs.items():
        assert_same_weights(plain, checkpointed, f"tensor 2, {setting}: ")
