"""DP-LoRA (``dpdist.model.lora``): adapters from outside, exact per-example norms, noise on adapters only.

- B = 0 at init: the adapted model computes the base model's logits bit for bit.
- Per-example norms and clipped sums (flat and per-layer clipping, ghost and materialised) equal a
  brute-force ``vmap(grad)`` over the adapter parameters alone, float64, 1e-9.
- A DP step leaves every base parameter without a gradient; the adapters get clipped sum + noise of
  std sigma C (a statistical check).
- Merged weights W + (alpha / r) B A, loaded into the plain model, give the adapted model's logits.
- Tensor degree 2 equals one process (tests/dist/lora_parallel.py); ``dpdist train`` with
  lora.enabled trains only the adapters, resumes exactly, and ``dpdist export`` writes the merged model.
"""
import json

import pytest
import torch
from safetensors import safe_open

from dpdist import ModelConfig, build_model
from dpdist import audit
from dpdist.cli import main
from dpdist.commands.export import MODEL_KEY
from dpdist.config import AnadpConfig, ConfigError, load_config
from dpdist.eval.weights import load_model
from dpdist.model.lora import LoraLinear, adapter_state_dict, add_adapters, merged_state_dict
from dpdist.parallel.state import full_state_dict
from dpdist.privacy.step import NonPrivateStep, native_step
from helpers import ROOT, oracle
from helpers.launch import torchrun
from helpers.runs import assert_resume_is_exact
from helpers.steps import noisy_sgd_steps, private_step

RANK, ALPHA, SEQ = 4, 8.0, 9
ADAPTED = ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
           "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj")


def adapted(seed: int = 0, **overrides):
    """A perturbed tiny float64 model with adapters whose B is perturbed too, so no norm term is 0."""
    model = oracle.tiny_model(max_seq_len=SEQ, seed=seed, **overrides)
    add_adapters(model, rank=RANK, alpha=ALPHA, seed=seed)
    generator = torch.Generator().manual_seed(500 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def trainable(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_adapters_wrap_every_block_linear_and_start_as_the_base_model():
    model = oracle.tiny_model(max_seq_len=SEQ, tie_embeddings=False)
    ids, _ = oracle.tiny_batch(5, SEQ)
    before = model(ids)
    assert tuple(add_adapters(model, rank=RANK, alpha=ALPHA, seed=3)) == ADAPTED
    assert torch.equal(model(ids), before)  # B = 0
    assert trainable(model) == [f"{name}.lora_{part}.weight" for name in ADAPTED for part in "AB"]
    assert not isinstance(model.lm_head, LoraLinear)  # never the output layer
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_A.weight.shape == (RANK, 16) and qkv.lora_B.weight.shape == (48, RANK)
    bound = 16 ** -0.5  # peft's Kaiming-uniform A: U(-1/sqrt(in), 1/sqrt(in))
    a = qkv.lora_A.weight.detach()
    assert float(a.abs().max()) <= bound and float(a.std()) > 0.4 * bound
    assert qkv.lora_A.weight.dtype == torch.float64 and not qkv.lora_B.weight.any()
    again = oracle.tiny_model(max_seq_len=SEQ, tie_embeddings=False)
    add_adapters(again, rank=RANK, alpha=ALPHA, seed=3)
    assert torch.equal(again.blocks[1].mlp.proj.lora_A.weight, model.blocks[1].mlp.proj.lora_A.weight)


def test_targets_select_leaf_names():
    model = oracle.tiny_model(max_seq_len=SEQ)
    assert add_adapters(model, rank=2, alpha=2.0, targets="qkv, fc") == [
        "blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    assert type(model.blocks[0].attn.proj).__name__ == "RowParallelLinear"


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_norms_and_clipped_sums_equal_brute_force_over_the_adapters(clipping, strategy):
    model = adapted()
    ids, labels = oracle.tiny_batch(5, SEQ)  # ignored labels, one example with none
    reference = oracle.per_example_norms(model, ids, labels)
    assert reference[2] == 0 and float(reference.max()) > 0.1
    got = audit.per_example_norms(model, ids, labels, strategy=strategy)
    assert torch.allclose(got, reference, rtol=1e-9, atol=1e-12)
    clip = 0.5 * float(reference.max())  # some examples clipped, some not
    want = oracle.clipped_sum(model, ids, labels, clip, clipping=clipping)
    sums = audit.clipped_sum(model, ids, labels, clip, clipping=clipping, strategy=strategy)
    assert set(sums) == set(want) == set(trainable(model))
    err, name = oracle.dict_rel_err(sums, want)
    assert err < 1e-9, name


def test_two_pass_and_the_non_private_step_train_the_adapters_alone():
    model = adapted(seed=3)
    ids, labels = oracle.tiny_batch(5, SEQ)
    clip = 0.05
    want = oracle.clipped_sum(model, ids, labels, clip)
    err, name = oracle.dict_rel_err(audit.clipped_sum(model, ids, labels, clip, mode="two_pass"), want)
    assert err < 1e-9, name
    step = NonPrivateStep(model, expected_batch_size=5.0)
    step.microbatch(ids, labels)
    step.release(0)
    assert [name for name, p in model.named_parameters() if p.grad is not None] == trainable(model)


def test_a_dp_step_noises_only_the_adapters():
    model = adapted(seed=1, d_model=32, n_heads=2)
    ids, labels = oracle.tiny_batch(5, SEQ)
    sigma, clip, expected = 1.5, 0.2, 4.0
    want = oracle.clipped_sum(model, ids, labels, clip)
    engine = native_step(model, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, secret=5,
                         micro_batch_size=5, seq_len=SEQ)
    engine.microbatch(ids, labels)
    engine.release(0)
    engine.detach()
    noise = []
    for name, p in model.named_parameters():
        if name in want:
            noise.append((p.grad * expected - want[name]).flatten())
        else:
            assert p.grad is None and not p.requires_grad, name
    noise = torch.cat(noise)
    # N(0, (sigma C)^2) on 4096 coordinates: the sample std within 5% is 4.5 standard errors (false
    # alarm 7e-6), the mean within 5 (6e-7)
    assert noise.numel() == 4096
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.05
    assert abs(float(noise.mean())) < 5 * sigma * clip / noise.numel() ** 0.5


def test_anadp_allocates_over_the_adapter_layers():
    model = adapted(seed=2)
    ids, labels = oracle.tiny_batch(5, SEQ)
    engine = private_step(model, clip_norm=0.5, noise_multiplier=1.0, micro_batch_size=5, seq_len=SEQ,
                          clipping="per_layer", anadp=AnadpConfig(enabled=True, warmup_steps=0))
    assert len(engine.noise_scales.groups) == 16  # lora_A and lora_B of 8 layers
    engine.microbatch(ids, labels)
    engine.release(0)
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_merged_weights_give_the_adapted_models_logits_after_noisy_steps():
    model = oracle.tiny_model(max_seq_len=SEQ, perturb=0.0)
    add_adapters(model, rank=RANK, alpha=ALPHA)
    ids, labels = oracle.tiny_batch(5, SEQ)
    engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0, secret=2,
                         micro_batch_size=5, seq_len=SEQ)
    noisy_sgd_steps(engine, model, ids, labels, releases=3)
    engine.detach()
    state = full_state_dict(model, None)
    plain = build_model(model.cfg)
    plain.load_state_dict(merged_state_dict(state, rank=RANK, alpha=ALPHA))  # strict: the plain model's names
    assert float(model.blocks[0].mlp.fc.lora_B.weight.detach().abs().max()) > 1e-3  # the adapters moved
    with torch.no_grad():
        reference = model(ids)
        assert torch.allclose(plain(ids), reference, rtol=0, atol=1e-12 * float(reference.abs().max()))
    adapters = adapter_state_dict(state)
    assert sorted(adapters) == sorted(trainable(model))
    with pytest.raises(ValueError, match="lora.rank"):
        merged_state_dict(state, rank=RANK + 1, alpha=ALPHA)


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets="nope"), "qkv, proj, fc"),
    (dict(targets="lm_head"), "not a linear layer of the model.arch=gpt blocks"),
    (dict(targets=" , "), "names nothing"),
    (dict(rank=0), "lora.rank"),
    (dict(dropout=1.0), "lora.dropout"),
    (dict(dropout=-0.1), "lora.dropout"),
])
def test_bad_adapters_are_refused(kwargs, message):
    model = oracle.tiny_model(max_seq_len=SEQ)
    with pytest.raises(ValueError, match=message) as info:
        add_adapters(model, **{"rank": RANK, "alpha": ALPHA, **kwargs})
    assert "\n" not in str(info.value)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen


def test_wrapping_twice_finds_nothing_left_to_wrap():
    model = oracle.tiny_model(max_seq_len=SEQ)
    add_adapters(model, rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_adapters(model, rank=RANK, alpha=ALPHA)


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=0"], "lora.rank must be >= 1"),
    (["lora.alpha=0"], "lora.alpha must be > 0"),
    (["lora.dropout=1.0"], r"lora.dropout must be in \[0, 1\)"),
    (["lora.targets=qkv,,fc"], "lora.targets"),
    (["lora.enabled=true", "lora.targets=q_proj,fc"], "names q_proj, not a linear layer of the model.arch=gpt blocks"),
    (["lora.enabled=true", "lsg.enabled=true"], "enable one"),
    (["lora.enabled=true", "reattention.enabled=true", "reattention.frequencies=uniform"], "reattention.enabled"),
    (["lora.enabled=true", "train.backend=deepspeed"], "train.backend=native"),
    (["lora.enabled=true", "lora.dropout=0.1", "parallel.tensor=2"], "parallel.tensor=1"),
])
def test_config_refusals_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, ["privacy.noise_multiplier=1", *overrides])
    assert "\n" not in str(info.value)


def test_config_accepts_lora_with_anadp_and_tensor_parallelism():
    cfg = load_config(None, ["privacy.noise_multiplier=1", "lora.enabled=true", "lora.targets=qkv,proj",
                             "anadp.enabled=true", "privacy.clipping=per_layer", "parallel.tensor=2"])
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 16.0


@pytest.mark.slow
def test_tensor_degree_two_equals_one_process(tmp_path):
    out = tmp_path / "verdict.json"
    torchrun("lora_parallel.py", 2, out)
    verdict = json.loads(out.read_text())
    for clipping in ("flat", "per_layer"):
        assert verdict[clipping]["norms_max_rel_diff"] < 1e-10, clipping
        assert verdict[clipping]["params_max_rel_diff"] < 1e-10, clipping
        assert verdict[clipping]["adapters_moved"] > 1e-3, clipping  # the update compared is not vacuous


@pytest.mark.slow
def test_exact_resume_with_lora(tmp_path, cache):
    assert_resume_is_exact(tmp_path, cache, "lora.enabled=true", "lora.rank=2")


@pytest.mark.slow
def test_dpdist_train_with_lora_moves_only_the_adapters_and_exports_the_merged_model(tmp_path, cache, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(ROOT / "configs/default.yaml"), f"data.cache_dir={cache}",
            "data.max_corpus_mb=0.5", "data.vocab_size=512", "data.seq_len=32", "model.d_model=32",
            "model.max_seq_len=32", "train.steps=3", "train.batch_size=16", "train.progress=false",
            "parallel.data=1", "lora.enabled=true", "lora.rank=4", "lora.targets=qkv,fc", f"train.run_dir={run_dir}"]
    assert main(args) == 0
    assert "epsilon =" in capsys.readouterr().out
    cfg = load_config(run_dir / "config.yaml")
    final = torch.load(run_dir / "final" / "model.pt")
    initial = build_model(cfg.model)
    wrapped = add_adapters(initial, rank=4, alpha=cfg.lora.alpha, targets="qkv,fc", seed=cfg.model.init_seed)
    start = {name: p.detach() for name, p in initial.named_parameters()}
    assert final.keys() == start.keys()
    for name, value in final.items():
        moved = not torch.equal(value, start[name])
        assert moved == (".lora_" in name), name  # the base, embeddings and norms are untouched
    assert len(wrapped) == 4
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as exported:
        plain = build_model(ModelConfig(**json.loads(exported.metadata()[MODEL_KEY])))
        plain.load_state_dict({name: exported.get_tensor(name) for name in exported.keys()})  # strict: plain names
    evaluated = load_model(cfg, run_dir / "final" / "model.pt", torch.device("cpu"))  # what dpdist eval loads
    assert isinstance(evaluated.blocks[0].mlp.fc, LoraLinear)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = evaluated(ids)
        assert torch.allclose(plain(ids), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
