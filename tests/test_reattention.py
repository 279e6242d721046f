"""Re-Attention (algorithms.md section 4): exactness when off, the Monte-Carlo bias and its correction
through the real attention layer, the planted rare token, the charged DP frequency release, exact
per-example norms, and tensor-parallel equivalence.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpdist import ModelConfig, audit, build_model
from dpdist.config import ConfigError, ReattentionConfig, RunConfig
from dpdist.model import reattention
from dpdist.model.gpt import CausalSelfAttention
from dpdist.privacy import accounting, frequencies
from dpdist.privacy.ledger import PrivacyLedger
from dpdist.runtime.mesh import Mesh
from dpdist.train.plan import RunPlan
from dpdist.train.reattention import reattention_for_training, reattention_of_finished_run, release_history

from helpers import oracle
from helpers.launch import torchrun

VOCAB, SEQ = 37, 10


def _frequencies(seed: int = 0, low: float = 0.05) -> torch.Tensor:
    """Token frequencies spread over [low, 1], so token variances differ by up to (1/low)^2."""
    return low + (1 - low) * torch.rand(VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reattention(noise_std: float, expected_batch: float, p: torch.Tensor, variance_scale: float = 1.0,
                 layers=(0, 1), padding_idx: int | None = None) -> reattention.Reattention | None:
    """What a model is built with for sigma C, qN and p (None: nothing to correct), as a run makes it."""
    noise = reattention.weight_noise(noise_std, expected_batch, p, variance_scale, padding_idx)
    return None if noise is None else reattention.Reattention(noise, frozenset(layers))


def _pair(built_with: reattention.Reattention | None, **overrides):
    """A plain tiny float64 model and a model built with ``built_with``, with the same weights."""
    plain = oracle.tiny_model(vocab_size=VOCAB, max_seq_len=SEQ, **overrides)
    corrected = oracle.tiny_model(vocab_size=VOCAB, max_seq_len=SEQ, reattention=built_with, **overrides)
    corrected.load_state_dict(plain.state_dict())
    return plain, corrected


# --------------------------------------------------------------------------------- exactness when off

def test_lambda_zero_is_plain_attention_bit_for_bit():
    ids, _ = oracle.tiny_batch(4, SEQ, VOCAB)
    plain, on = _pair(_reattention(1.0, 4.0, _frequencies(), variance_scale=1.0))
    assert not torch.allclose(on(ids), plain(ids), atol=1e-6)  # lambda = 1 does correct
    off = _reattention(1.0, 4.0, _frequencies(), variance_scale=0.0)
    noiseless = _reattention(0.0, 4.0, _frequencies())  # no DP noise: nothing to correct either
    assert off is None and noiseless is None
    assert torch.equal(_pair(off)[1](ids), plain(ids))


def test_a_model_refuses_a_reattention_that_does_not_fit_it():
    fitting = _reattention(1.0, 4.0, _frequencies())
    short = reattention.WeightNoise(fitting.noise.shared, fitting.noise.tokens[:-1])
    with pytest.raises(ValueError, match="one entry per token id"):
        _pair(reattention.Reattention(short, fitting.layers))
    with pytest.raises(ValueError, match=r"at least one block, all in \[0, 2\)"):
        _pair(reattention.Reattention(fitting.noise, frozenset({0, 2})))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        _reattention(1.0, 4.0, torch.zeros(VOCAB, dtype=torch.float64))


def test_uncorrected_attention_is_causal_sdpa():
    q, k, v = torch.randn(3, 2, 2, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, weights = reattention.attend(q, k, v)
    assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-13)
    assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # no query sees a later key


def test_linear_variance_matches_sampled_noisy_weights():
    """Rule 4.3.2 against simulation: noisy inputs through a layer whose weights and bias are noisy."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(6, 3, dtype=torch.float64)
    x, var = torch.randn(6, dtype=torch.float64, generator=gen), torch.rand(6, dtype=torch.float64, generator=gen)
    shared, samples = 0.3, 400_000
    noise = reattention.WeightNoise(shared, torch.zeros(1))
    predicted = reattention.linear_variance(layer, x, var, noise)
    with torch.no_grad():
        W = layer.weight + math.sqrt(shared) * torch.randn(samples, 3, 6, dtype=torch.float64, generator=gen)
        b = layer.bias + math.sqrt(shared) * torch.randn(samples, 3, dtype=torch.float64, generator=gen)
        xs = x + var.sqrt() * torch.randn(samples, 6, dtype=torch.float64, generator=gen)
        simulated = ((W @ xs.unsqueeze(-1)).squeeze(-1) + b).var(0)
    assert torch.allclose(predicted, simulated, rtol=0.02)


# ------------------------------------------------------------------- the Monte-Carlo check, real layer

def _probe_attention(d: int) -> CausalSelfAttention:
    """A real attention layer of three heads of size d whose head 0 reads its query, key and value from
    the three thirds of its input and writes its output to the first third: then the input holds the
    reference's query and keys directly, and one-hot values make the output the attention weights."""
    cfg = ModelConfig(d_model=3 * d, n_heads=3, bias=False, dtype="float64")
    layer = CausalSelfAttention(cfg, None, lambda shape: torch.zeros(shape), lambda shape: torch.zeros(shape))
    with torch.no_grad():
        eye = torch.eye(d, dtype=torch.float64)
        layer.double()
        for third in range(3):  # head 0's rows: q, then k, then v
            layer.qkv.weight[third * d:(third + 1) * d, third * d:(third + 1) * d] = eye
        layer.proj.weight[:d, :d] = eye
    return layer


def test_monte_carlo_noisy_keys_through_the_real_layer():
    """verify_reattention.py with the layer: keys K_i ~ N(k_i, v_i I), v = (0, 0, 0, 0, 0.5, 2).  The
    noise draws attention to the high-variance token (reference: 0.158 clean, 0.186 noisy) and the
    layer's correction takes it back (reference: 0.143; the slight over-correction is Jensen's gap)."""
    d, n, samples, chunk = 16, 6, 100_000, 25_000
    rng = np.random.default_rng(1)  # the reference's query and keys, drawn as it draws them
    q, k = torch.from_numpy(rng.normal(size=d)), torch.from_numpy(rng.normal(size=(n, d)) * 0.3)
    key_var = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    layer, noise = _probe_attention(d), reattention.WeightNoise(0.0, torch.zeros(1))
    x = torch.cat([q.expand(n, d), k, torch.eye(n, d, dtype=torch.float64)], dim=1)  # [n, 3d]; query = last position
    var = torch.zeros_like(x)
    var[:, d:2 * d] = key_var[:, None]  # the layer's key variance: W_k^2 var = key_var (W_k = I)
    gen = torch.Generator().manual_seed(0)
    noisy, corrected, mgf_ratio = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
    with torch.no_grad():
        clean = layer(x[None])[0, -1, :n]
        for _ in range(samples // chunk):
            xs = x.repeat(chunk, 1, 1)
            xs[:, :, d:2 * d] += key_var.sqrt()[:, None] * torch.randn(chunk, n, d, dtype=torch.float64, generator=gen)
            noisy += layer(xs)[:, -1, :n].sum(0)
            corrected += layer.forward_with_variance(xs, var.expand_as(xs), noise, correct=True)[0][:, -1, :n].sum(0)
            logits = xs[:, -1, :d].unsqueeze(1) @ xs[:, :, d:2 * d].transpose(1, 2) / math.sqrt(d)
            correction = reattention.key_correction(xs[:, -1:, :d], key_var[:, None].expand(n, d))  # [1, n]
            mgf_ratio += torch.exp(logits[:, 0] - correction[:, 0]).sum(0)  # E[exp(l_i - corr_i)] = exp(clean l_i)
    noisy, corrected, mgf_ratio = noisy / samples, corrected / samples, mgf_ratio / samples
    exact = torch.exp(k @ q / math.sqrt(d))
    print("clean", clean.numpy().round(3), "noisy", noisy.numpy().round(3), "corrected", corrected.numpy().round(3),
          "MGF rel err", float((mgf_ratio / exact - 1).abs().max()))
    assert torch.allclose(clean, torch.softmax(k @ q / math.sqrt(d), 0), atol=1e-12)  # the probe is the reference
    assert float((mgf_ratio / exact - 1).abs().max()) < 0.03  # the correction is the exact log-bias of E[exp l]
    assert clean[5] == pytest.approx(0.158, abs=0.001)
    assert noisy[5] == pytest.approx(0.186, abs=0.005) and noisy[5] - clean[5] > 0.02  # distraction
    assert corrected[5] == pytest.approx(0.143, abs=0.005)
    assert abs(corrected[5] - clean[5]) < 0.75 * (noisy[5] - clean[5])  # closer to clean than the noisy one
    assert (corrected[:4] > noisy[:4]).all()  # the certain tokens get their attention back


# -------------------------------------------------------------------------------- planted rare token

def test_a_planted_rare_token_receives_less_attention(monkeypatch):
    rare, position = 11, 2
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))
    ids[ids == rare] = rare + 1
    ids[:, position] = rare
    p = torch.full((VOCAB,), 0.5, dtype=torch.float64)
    p[rare] = 1e-3  # 500x rarer: its embedding row's noise variance is 250000x that of the others
    _, model = _pair(_reattention(1.0, 8.0, p, layers=[0]))
    seen = []

    def spy(q, k, v, correction=None):
        seen.append((q, k, v, correction))
        return real_attend(q, k, v, correction)

    real_attend = reattention.attend
    monkeypatch.setattr(reattention, "attend", spy)
    with torch.no_grad():
        model(ids)
        assert len(seen) == 1  # only block 0 is corrected, and variances stop there
        q, k, v, correction = seen[0]
        on = real_attend(q, k, v, correction)[1][..., position + 1:, position]
        off = real_attend(q, k, v)[1][..., position + 1:, position]
    assert (correction[..., position + 1:, position] > correction[..., position + 1:, :position].amax(-1)).all()
    assert (on < 0.5 * off).all(), f"attention to the rare token: off {off.mean():.3f}, on {on.mean():.3f}"


# ------------------------------------------------------------------------------------ DP frequencies

class _Sequences:
    """A prepared dataset stand-in: chunks of seq_len + 1 tokens, inputs and targets shifted by one."""

    def __init__(self, chunks: torch.Tensor):
        self.chunks = chunks

    def train_batch(self, indices):
        rows = self.chunks[torch.as_tensor(indices)]
        return rows[:, :-1], rows[:, 1:]


def _release_run(num_sequences=300, seq_len=8, noise=2.0):
    cfg = RunConfig(reattention=ReattentionConfig(enabled=True, frequency_noise=noise))
    cfg.model = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=seq_len, dtype="float64")
    cfg.data.seq_len = seq_len
    plan = RunPlan(num_examples=num_sequences, num_val=0, vocab_size=VOCAB, sample_rate=0.05, delta=1e-5,
                   noise_multiplier=1.0, epsilon_budget=None, max_steps=20)
    # a long tail: token v appears with probability ~ 1 / (v + 1)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    chunks = torch.multinomial(weights, num_sequences * (seq_len + 1), replacement=True,
                               generator=torch.Generator().manual_seed(6)).view(num_sequences, seq_len + 1)
    return cfg, plan, _Sequences(chunks)


def _setup(cfg, plan, data, run_dir: Path, secret: int) -> tuple[PrivacyLedger, torch.nn.Module]:
    run_dir.mkdir(exist_ok=True)
    ledger = PrivacyLedger(run_dir / "ledger.jsonl")
    return ledger, build_model(cfg.model, reattention=reattention_for_training(cfg, plan, data, run_dir, Mesh(),
                                                                               secret, ledger))


def test_presence_counts_count_each_sequence_once():
    chunks = torch.tensor([[1, 1, 2, 3], [3, 3, 3, 3], [0, 4, 4, 1]])
    counts = frequencies.presence_counts(_Sequences(chunks), 3, 6)
    assert counts.tolist() == [1, 2, 1, 2, 1, 0]


def test_dp_release_is_charged_once_noisy_keyed_and_reused(tmp_path):
    cfg, plan, data = _release_run()
    ledger, model = _setup(cfg, plan, data, tmp_path / "run", secret=7)
    entries = ledger.entries()
    assert [(e["step"], e["sample_rate"], e["noise_multiplier"], e["kind"]) for e in entries] == [
        (-1, 1.0, 2.0, "token_frequencies")]
    released = json.loads((tmp_path / "run" / frequencies.FILE).read_text())
    noisy = torch.tensor(released["noisy_counts"], dtype=torch.float64)
    raw = frequencies.presence_counts(data, plan.num_examples, VOCAB).to(torch.float64)
    assert released["l_max"] == 9 and (noisy >= 0).all()
    assert not torch.equal(noisy, raw) and (noisy - raw).abs().max() < 6 * 2.0 * 3  # noisy, at scale sigma_h sqrt(9)
    expected_p = (noisy / plan.num_examples).clamp(1 / plan.num_examples, 1)
    sigma_c_over_b = plan.noise_multiplier * cfg.privacy.clip_norm / plan.expected_batch_size
    assert torch.allclose(model.weight_noise.tokens, (sigma_c_over_b / expected_p) ** 2)  # the model uses the release

    for step in range(20):  # the training steps come after it
        ledger.append(step, plan.sample_rate, plan.noise_multiplier)
    steps_only = accounting.epsilon(plan.sample_rate, plan.noise_multiplier, 20, plan.delta, "rdp")
    with_release = ledger.epsilon(plan.delta, "rdp")
    assert with_release > steps_only
    assert with_release == accounting.epsilon(plan.sample_rate, plan.noise_multiplier, 20, plan.delta, "rdp",
                                              prior=release_history(cfg))

    (tmp_path / "run" / frequencies.FILE).write_text(json.dumps({**released, "noisy_counts": [5.0] * VOCAB}))
    resumed_ledger, resumed = _setup(cfg, plan, data, tmp_path / "run", secret=7)  # a resume: reuse, no charge
    assert len(resumed_ledger.entries()) == 21
    from_file = torch.full((VOCAB,), (sigma_c_over_b * plan.num_examples / 5.0) ** 2, dtype=torch.float64)
    assert torch.allclose(resumed.weight_noise.tokens, from_file)

    _setup(cfg, plan, data, tmp_path / "same", secret=7)
    _setup(cfg, plan, data, tmp_path / "other", secret=8)
    counts = {name: json.loads((tmp_path / name / frequencies.FILE).read_text())["noisy_counts"]
              for name in ("same", "other")}
    assert counts["same"] == released["noisy_counts"] and counts["other"] != released["noisy_counts"]


def test_no_release_without_a_correction(tmp_path):
    cfg, plan, data = _release_run()
    cfg.reattention.variance_scale = 0.0
    ledger, model = _setup(cfg, plan, data, tmp_path / "run", secret=7)
    assert ledger.entries() == [] and not (tmp_path / "run" / frequencies.FILE).exists()
    assert model.weight_noise is None and release_history(cfg) == []


def test_an_evaluation_reads_the_release_and_never_draws_one(tmp_path):
    cfg, plan, data = _release_run()
    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="only the training run"):
        reattention_of_finished_run(tmp_path, cfg, plan, cpu)
    _, trained = _setup(cfg, plan, data, tmp_path, secret=7)
    evaluated = build_model(cfg.model, reattention=reattention_of_finished_run(tmp_path, cfg, plan, cpu))
    assert torch.equal(evaluated.weight_noise.tokens, trained.weight_noise.tokens)
    assert len(PrivacyLedger(tmp_path / "ledger.jsonl").entries()) == 1


def test_public_and_uniform_frequencies(tmp_path):
    uniform = frequencies.token_frequencies("uniform", 4, 100, 8, 10.0, tmp_path)
    assert torch.equal(uniform, torch.full((4,), 0.25, dtype=torch.float64))
    path = tmp_path / "counts.json"
    path.write_text(json.dumps([3, 1, 0, 4]))
    public = frequencies.token_frequencies(str(path), 4, 100, 8, 10.0, tmp_path)
    assert public.tolist() == [3 / 8, 1 / 8, 1 / 100, 4 / 8]  # relative frequencies, unseen clamped to 1/N
    path.write_text(json.dumps([3, 1, 0]))
    with pytest.raises(ValueError, match="list of 4 non-negative counts"):
        frequencies.token_frequencies(str(path), 4, 100, 8, 10.0, tmp_path)


def test_the_release_fits_in_the_budget():
    prior = [(1.0, 5.0, 1)]
    sigma = accounting.calibrate_noise_multiplier(2.0, 0.05, 50, 1e-5, accountant="rdp")
    sigma_with = accounting.calibrate_noise_multiplier(2.0, 0.05, 50, 1e-5, accountant="rdp", prior=prior)
    assert sigma_with > sigma
    assert accounting.epsilon(0.05, sigma_with, 50, 1e-5, "rdp", prior=prior) <= 2.0
    assert accounting.max_steps_within(2.0, 0.05, sigma, 1e-5, "rdp", upper=50, prior=prior) < 50
    with pytest.raises(ValueError, match="already spend"):
        accounting.calibrate_noise_multiplier(0.5, 0.05, 50, 1e-5, accountant="rdp", prior=[(1.0, 0.5, 1)])


def test_a_torn_first_step_takes_the_rates_of_a_step_not_of_the_release(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append(-1, 1.0, 10.0, kind="token_frequencies")
    with open(ledger.path, "a") as handle:
        handle.write('{"step": 0, "sam')  # the crash cut the first step's line
    resumed = PrivacyLedger(ledger.path)
    resumed.append(0, 0.01, 0.8)
    assert resumed.history() == [(1.0, 10.0, 1), (0.01, 0.8, 2)]


def test_config_refuses_bad_reattention_settings(tmp_path):
    def validated(**settings) -> RunConfig:
        cfg = RunConfig(reattention=ReattentionConfig(**settings))
        cfg.privacy.noise_multiplier = 1.0
        return cfg.validate()

    with pytest.raises(ConfigError, match="outside"):
        validated(enabled=True, layers="0,2")  # model.n_layers = 2
    with pytest.raises(ConfigError, match="'all' or comma-separated"):
        validated(enabled=True, layers="first")
    with pytest.raises(ConfigError, match="none of these"):
        validated(enabled=True, frequencies=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="reattention.variance_scale must be >= 0"):
        validated(variance_scale=-1.0)
    validated(enabled=False, frequencies="missing.json", layers="first")  # off: not looked at
    assert validated(enabled=True, layers="1").reattention.block_indices(2) == {1}


# ---------------------------------------------------------------------------- per-example norms

@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, padding_idx=3, norm="rmsnorm", bias=False)],
                         ids=["tied-layernorm", "untied-padding-rmsnorm-nobias"])
def test_per_example_norms_match_brute_force(overrides):
    ids, labels = oracle.tiny_batch(5, SEQ, VOCAB, pad_id=overrides.get("padding_idx"))
    plain, model = _pair(_reattention(1.0, 4.0, _frequencies(low=0.02), padding_idx=overrides.get("padding_idx")),
                         **overrides)
    got = audit.per_example_norms(model, ids, labels)
    ref = oracle.per_example_norms(model, ids, labels)
    real = ref > 0
    assert float(((got - ref).abs() / ref)[real].max()) < 1e-9
    moved = ((oracle.per_example_norms(plain, ids, labels) - ref).abs() / ref)[real]
    assert float(moved.max()) > 1e-3  # the correction changes the gradients it is checked on


# ------------------------------------------------------------------------------- tensor parallelism

@pytest.mark.slow
def test_tensor_parallel_reattention_matches_one_process(tmp_path):
    out = tmp_path / "verdict.json"
    torchrun("reattention_tp.py", 2, out, 2)
    verdict = json.loads(out.read_text())
    assert verdict["correction_moves_logits"] > 1e-3
    assert verdict["logits_max_abs_diff"] < 1e-10
    assert verdict["norms_max_rel_diff"] < 1e-9
