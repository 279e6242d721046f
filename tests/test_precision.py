"""``train.precision=bf16``: bf16 forward and backward on fp32 master weights (issue 16, item 2).

- The model's matmuls run in bf16, in the forward and in the backward's input gradients; the tap's norm
  and clipped-sum matmuls run in fp32.
- The per-example norms and clipped sums are fp32, within bf16 rounding of an fp32 run's and not
  equal to them (bf16 did compute them).
- An update below a bf16 ulp of the weights still moves the fp32 master weights, through the DP step
  and the optimizer, and through ``dpdist train`` with a tiny learning rate; bf16 weights would not move.
- Pure bf16 weights (``model.dtype=bfloat16``) and the combinations bf16 compute cannot serve are refused.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpdist import ModelConfig, audit, build_model
from dpdist.commands.train import prepare_run
from dpdist.config import ConfigError, load_config
from dpdist.parallel.layers import ColumnParallelLinear, RowParallelLinear
from dpdist.privacy.step import native_step
from dpdist.train.precision import apply_precision

from helpers.runs import final_model, prepared, train_in_process

MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
VOCAB, SEQ = 37, 8


def tiny(arch="gpt", precision="fp32", dtype="float32"):
    model = build_model(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=SEQ, arch=arch,
                                    dtype=dtype, tie_embeddings=arch == "gpt"))
    apply_precision(precision, model, "cpu")
    return model


def batch(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (size, SEQ), generator=generator),
            torch.randint(0, VOCAB, (size, SEQ), generator=generator))


class MatmulDtypes(TorchDispatchMode):
    """The operand dtypes of every matmul dispatched while active (after autocast has cast them)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS:
            self.dtypes.append({a.dtype for a in args if torch.is_tensor(a)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_matmuls_run_in_bf16_and_the_tap_in_fp32(arch):
    model = tiny(arch, "bf16")
    engine = native_step(model, clip_norm=0.1, strategy="materialise")
    input_ids, labels = batch()
    with MatmulDtypes() as forward:
        losses = engine.loss(input_ids, labels)
    assert losses.dtype == torch.float32  # the logits leave the forward in fp32: the loss is fp32
    assert forward.dtypes and all(d == {torch.bfloat16} for d in forward.dtypes)
    with MatmulDtypes() as backward:
        torch.autograd.grad(losses.sum(), list(engine.names), allow_unused=True)
        sq_norms = engine.tap.take_sq_norms()
        engine.tap.accumulate_clipped(torch.ones_like(sq_norms))
    lowered = [d for d in backward.dtypes if d == {torch.bfloat16}]
    widened = [d for d in backward.dtypes if d == {torch.float32}]
    assert len(lowered) + len(widened) == len(backward.dtypes)  # no matmul mixes dtypes
    linears = sum(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules())
    assert len(lowered) == linears + model.cfg.tie_embeddings  # each linear's input gradient, the tied output's
    assert widened  # the norms and the clipped sums
    assert sq_norms.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in engine.clipped_sums().values())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_bf16_norms_and_clipped_sums_are_fp32_near_the_fp32_run(arch, strategy):
    input_ids, labels = batch(6)
    fp32, bf16 = tiny(arch), tiny(arch, "bf16")  # the same initial weights
    norms = audit.per_example_norms(bf16, input_ids, labels, strategy=strategy)
    want = audit.per_example_norms(fp32, input_ids, labels, strategy=strategy)
    assert norms.dtype == torch.float32
    assert 1e-5 < _relative(norms, want) < 3e-2  # bf16 rounding (8 bits), not fp32's and not worse
    for clipping in ("flat", "per_layer"):
        clip = float(want.median()) / 2  # every example clipped
        sums = audit.clipped_sum(bf16, input_ids, labels, clip, clipping=clipping, strategy=strategy)
        reference = audit.clipped_sum(fp32, input_ids, labels, clip, clipping=clipping, strategy=strategy)
        assert all(s.dtype == torch.float32 for s in sums.values())
        total = torch.cat([s.flatten() for s in sums.values()])
        assert 1e-5 < _relative(total, torch.cat([s.flatten() for s in reference.values()])) < 5e-2


def half_bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bf16 numbers (8 significant bits) at ``x``: a smaller update of a bf16 weight
    rounds back to it."""
    return 2.0 ** (torch.floor(torch.log2(x.abs())) - 8)


def test_an_update_below_the_bf16_ulp_moves_the_fp32_master_weights():
    model = tiny(precision="bf16")
    engine = native_step(model, clip_norm=1.0, noise_multiplier=1.0, secret=5, expected_batch_size=4.0)
    lr = 1e-5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine.microbatch(*batch())
    engine.release(0)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    moved = large = 0
    for name, p in model.named_parameters():
        old, new, update = before[name], p.detach(), lr * grads[name]
        assert new.dtype == torch.float32 and update.dtype == torch.float32
        assert torch.equal(new, torch.add(old, grads[name], alpha=-lr)), name  # SGD's fp32 update, exactly
        big = old.abs() > 1e-2  # the weights whose bf16 ulp is far above the update
        bf16 = old.bfloat16()
        assert torch.equal((bf16 - update.bfloat16())[big], bf16[big]), name  # bf16 weights would lose it
        moved, large = moved + int((new != old)[big].sum()), large + int(big.sum())
    assert large > 1000 and moved > 0.99 * large


@pytest.mark.slow
def test_a_bf16_run_moves_its_weights_by_less_than_a_bf16_ulp(tmp_path, cache):
    """Through ``dpdist train``'s loop: AdamW at lr 1e-6 moves each weight by about 1e-6 a step, below
    half a bf16 ulp of any weight above 1e-2 in size (bf16 weights would not move), and the fp32 master
    weights move: nearly all of them, by less than half a bf16 ulp in all 6 steps together."""
    run = prepared(cache, tmp_path / "bf16", 1, 1, "float32", "train.precision=bf16", "train.lr=1e-6")
    summary = train_in_process(run)
    assert summary["val_loss"] is not None and summary["val_loss"] == summary["val_loss"]  # finite, validated in bf16
    initial = build_model(load_config(run / "config.yaml").model).state_dict()
    moved = large = 0
    for name, new in final_model(run).items():
        assert new.dtype == torch.float32, name
        old = initial[name][: new.shape[0]]
        big = old.abs() > 1e-2
        assert bool(((new - old).abs() < half_bf16_ulp(old))[big].all()), name
        moved, large = moved + int((new != old)[big].sum()), large + int(big.sum())
    assert large > 1000 and moved > 0.99 * large


@pytest.mark.parametrize("overrides, message", [
    (["train.precision=bf16", "model.dtype=float64"], "train.precision=bf16 keeps fp32 master weights"),
    (["train.precision=bf16", "privacy.mode=two_pass"], "privacy.mode=two_pass"),
    (["train.precision=bf16", "train.backend=deepspeed"], "implemented for train.backend=native and fsdp"),
    (["train.precision=fp16"], "train.precision must be one of fp32, bf16"),
])
def test_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.noise_multiplier=1.0", *overrides])


def test_training_pure_bf16_weights_is_refused(tmp_path):
    """Refused where a run is prepared for training; a finished run's config still loads (export, eval)."""
    cfg = load_config(None, ["privacy.noise_multiplier=1.0", "model.dtype=bfloat16", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 trains bf16 weights.*set train.precision=bf16"):
        prepare_run(cfg)
    assert not (tmp_path / "run").exists()


def test_the_default_is_fp32_and_bf16_loads():
    assert load_config(None, ["privacy.noise_multiplier=1.0"]).train.precision == "fp32"
    assert load_config(None, ["privacy.noise_multiplier=1.0", "train.precision=bf16"]).train.precision == "bf16"


def test_bf16_compute_needs_fp32_weights():
    with pytest.raises(ValueError, match="set model.dtype=float32"):
        tiny(precision="bf16", dtype="float64")
