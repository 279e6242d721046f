"""The pre-noise sum holds its sensitivity bound in every precision and on every input (issue 13, 2-3).

- bf16: removing one of 512 near-duplicate examples moves the clipped sum by at most C (1 + 1e-3),
  for every clipping method (it moved by 1.6-1.7 C when the sums were bf16 GEMM outputs), and
  ``dpdist audit`` checks that in the config's precision.  DeepSpeed's bf16 under DP is refused.
- A poisoned example (an inf activation) is dropped: clip factor 0, counted, and the release is the
  clean sum plus exactly the keyed noise; padding rows hold a public dummy, never example data.
- A layer called twice in one forward is an error naming it (its cross term would be lost).
- Squared norms are clamped at 0.
"""
import math

import pytest
import torch
from torch import nn

from dpdist import ModelConfig, audit, build_model
from dpdist.cli import main
from dpdist.config import ConfigError, load_config
from dpdist.privacy.noise import keyed_normal
from dpdist.privacy.sampling import PAD_TOKEN, public_padding
from dpdist.privacy.tap import PerExampleTap
from dpdist.privacy.step import native_step

CLIPPINGS = ("flat", "automatic", "per_layer")
VOCAB, SEQ = 50, 8
POISON = VOCAB - 1


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_bf16_sums_keep_the_sensitivity_bound(clipping):
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=SEQ,
                                    dtype="bfloat16"))
    input_ids, labels = audit.near_duplicates(64, 512, SEQ, seed=0)
    sums = audit.clipped_sum(model, input_ids, labels, 0.01, clipping=clipping)
    assert all(s.dtype == torch.float32 for s in sums.values())
    shift = audit.removal_shift(model, input_ids, labels, 0.01, range(3), clipping=clipping)
    assert 0.9 < shift <= 1 + 1e-3


def test_audit_checks_sensitivity_in_the_training_precision(capsys):
    args = ["audit", "train.precision=bf16", "model.vocab_size=64", "model.d_model=16", "model.n_layers=1",
            "model.n_heads=2", "data.seq_len=8", "model.max_seq_len=8", "privacy.noise_multiplier=1.0",
            "privacy.clip_norm=0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "in bf16 compute, 512 near-duplicates" in line]
    assert len(rows) == 3 and all(line.endswith("ok") for line in rows)


def test_deepspeed_bf16_is_refused_under_dp():
    with pytest.raises(ConfigError, match="DeepSpeed reduces the clipped sums in bf16"):
        load_config(None, ["privacy.noise_multiplier=1.0", "train.backend=deepspeed", "deepspeed.bf16=true"])
    with pytest.raises(ConfigError, match="two_pass"):
        load_config(None, ["privacy.noise_multiplier=1.0", "privacy.mode=two_pass", "train.precision=bf16"])


def _poisoned_model(dtype="float64"):
    """An untied model whose token POISON embeds to inf: only the examples that use it are poisoned."""
    model = build_model(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=SEQ,
                                    tie_embeddings=False, dtype=dtype))
    with torch.no_grad():
        model.tok_emb.weight[POISON] = math.inf
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, POISON, (6, SEQ), generator=generator)
    labels = torch.randint(0, POISON, (6, SEQ), generator=generator)
    input_ids[0, 3] = POISON
    return model, input_ids, labels


def _sums(model, input_ids, labels, mask=None, **options):
    engine = native_step(model, clip_norm=0.1, micro_batch_size=input_ids.shape[0], seq_len=SEQ, **options)
    try:
        stats = engine.microbatch(input_ids, labels, mask)
        return engine.clipped_sums(), stats
    finally:
        engine.detach()


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_a_poisoned_example_is_dropped(clipping):
    model, input_ids, labels = _poisoned_model()
    clean, _ = _sums(model, input_ids[1:], labels[1:], clipping=clipping)
    poisoned, stats = _sums(model, input_ids, labels, clipping=clipping)
    assert stats.nonfinite == 1 and stats.examples == 6 and math.isfinite(stats.loss_sum)
    masked, stats = _sums(model, input_ids, labels, torch.arange(6) > 0, clipping=clipping)
    assert stats.nonfinite == 0 and stats.examples == 5
    for name, value in clean.items():
        assert torch.isfinite(poisoned[name]).all() and torch.isfinite(masked[name]).all()
        assert torch.allclose(poisoned[name], value, rtol=0, atol=1e-12), name
        assert torch.allclose(masked[name], value, rtol=0, atol=1e-12), name


def test_the_release_of_a_poisoned_batch_is_the_clean_sum_plus_the_keyed_noise():
    model, input_ids, labels = _poisoned_model()
    clean, _ = _sums(model, input_ids[1:], labels[1:])
    sigma, secret, release, expected = 2.0, 5, 7, 4.0
    engine = native_step(model, clip_norm=0.1, noise_multiplier=sigma, expected_batch_size=expected,
                         secret=secret, micro_batch_size=6, seq_len=SEQ)
    engine.microbatch(input_ids, labels)
    engine.release(release)
    engine.detach()
    for name, p in model.named_parameters():
        noise = keyed_normal(secret, release, name, tuple(p.shape), dtype=torch.float64)
        assert torch.allclose(p.grad * expected, clean[name] + sigma * 0.1 * noise, rtol=0, atol=1e-12), name


def test_two_pass_refuses_a_poisoned_example():
    model, input_ids, labels = _poisoned_model()
    with pytest.raises(FloatingPointError, match="privacy.mode=bookkeeping"):
        _sums(model, input_ids, labels, mode="two_pass")


def test_padding_rows_hold_the_public_dummy():
    input_ids = torch.arange(12).view(3, 4)
    labels = input_ids + 1
    mask = torch.tensor([True, False, True])
    padded_ids, padded_labels = public_padding(input_ids, labels, mask)
    assert torch.equal(padded_ids[1], torch.full((4,), PAD_TOKEN)) and torch.equal(padded_labels[1], torch.full((4,), -100))
    assert torch.equal(padded_ids[mask], input_ids[mask]) and torch.equal(padded_labels[mask], labels[mask])


class Twice(nn.Module):
    """Runs the wrapped module twice, sharing its weights: a custom model a user may build."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(self.inner(x))


def test_a_layer_called_twice_is_an_error_that_names_it():
    model = build_model(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=SEQ,
                                    dtype="float64"))
    model.blocks[0].mlp = Twice(model.blocks[0].mlp)
    input_ids = torch.randint(0, VOCAB, (3, SEQ))
    with pytest.raises(RuntimeError, match=r"layer blocks\.0\.mlp\.inner\.\w+ ran its backward twice"):
        _sums(model, input_ids, input_ids)


def test_squared_norms_are_clamped_at_zero():
    tap = PerExampleTap([], {})
    tap._sq_norms = torch.tensor([-1e-9, 0.25])
    assert torch.equal(tap.take_sq_norms(), torch.tensor([0.0, 0.25]))
