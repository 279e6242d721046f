"""ANADP adaptive noise allocation (issue 6): the privacy invariant, the uniform case, the whitened
sensitivity of an adversarial example, importance from released gradients only, exact resume.

- The invariant sum_k C_k^2 / s_k^2 <= 1 / sigma^2 holds on every step of a run whose weights really
  move away from uniform after the warm-up (so the check is not vacuous), and a broken allocation is
  refused at run time.
- With uniform importance (a warm-up longer than the run, or temperature 0) the parameters equal plain
  DP-SGD with per-layer clipping bit for bit.
- One example with a huge gradient: sigma * sqrt(sum_k ||g_k||^2 / s_k^2) <= 1 under a skewed allocation
  (and close to 1, since every group is clipped).
- The weights used at step t are a function of the released gradients before t: replacing the batch of
  step t changes nothing about the weights step t uses.
- A run resumed from a checkpoint equals the uninterrupted run (the importance state is checkpointed).
"""
import pytest
import torch

from dpdist import build_model
from dpdist.config import AnadpConfig, ConfigError, load_config
from dpdist.privacy.sampling import PoissonSampler
from helpers.steps import private_step

from helpers.method_steps import CFG, N, Q, assert_tensor_degree_two_is_one_process
from helpers.poisson_step import noisy_sgd_run, noisy_sgd_step
from helpers.runs import assert_resume_is_exact

SIGMA, CLIP, SECRET, VOCAB = 1.5, 0.5, 5, CFG.vocab_size
DATA = torch.randint(0, VOCAB, (N, 9), generator=torch.Generator().manual_seed(3))


def engine_for(model, anadp: AnadpConfig | None, clip=CLIP, sigma=SIGMA):
    return private_step(model, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=Q * N, secret=SECRET,
                        clipping="per_layer", micro_batch_size=4, seq_len=8, anadp=anadp)


def run(anadp: AnadpConfig | None, steps: int = 8, record=None):
    model = build_model(CFG)
    engine = engine_for(model, anadp)
    noisy_sgd_run(engine, model, PoissonSampler(N, Q, SECRET, micro_batch_size=4), DATA, steps, lr=0.3,
                  before_release=record)
    return model, engine


def whitened_sum(engine) -> float:
    """sum_k C_k^2 / s_k^2 for the allocation the next release will use."""
    return sum(engine.noise_scales.layer_clip ** 2 / s ** 2 for s in engine.noise_scales.group_stds())


def test_invariant_holds_on_every_step_while_the_noise_moves():
    sums, weights = [], []

    def record(engine, step):
        sums.append(whitened_sum(engine))
        weights.append(engine.noise_scales.weights.clone())

    run(AnadpConfig(enabled=True, warmup_steps=2, min_weight=0.05), steps=10, record=record)
    assert all(s <= (1 + 1e-9) / SIGMA ** 2 for s in sums), sums
    assert all(abs(s * SIGMA ** 2 - 1) < 1e-9 for s in sums)  # the budget is spent, not wasted
    uniform = torch.full_like(weights[0], 1 / len(weights[0]))
    assert torch.equal(weights[0], uniform) and torch.equal(weights[1], uniform)  # warm-up
    assert float((weights[-1] - uniform).abs().max()) > 0.2 / len(uniform), "the allocation never moved"


def test_a_broken_allocation_is_refused():
    _, engine = run(AnadpConfig(enabled=True, warmup_steps=1), steps=2)
    engine.noise_scales.weights = engine.noise_scales.weights * 1.01  # sums to 1.01: too little noise
    with pytest.raises(RuntimeError, match="privacy invariant"):
        engine.release(2)


@pytest.mark.parametrize("anadp", [AnadpConfig(enabled=True, warmup_steps=100),
                                   AnadpConfig(enabled=True, warmup_steps=1, temperature=0.0)],
                         ids=["warm-up", "temperature-0"])
def test_uniform_importance_is_plain_per_layer_dp_sgd(anadp):
    plain, _ = run(None)
    allocated, _ = run(anadp)
    for (name, a), b in zip(plain.named_parameters(), allocated.parameters()):
        assert torch.equal(a, b), name


def test_whitened_sensitivity_of_an_adversarial_example_is_at_most_one():
    model = build_model(CFG)
    engine = engine_for(model, AnadpConfig(enabled=True), clip=1e-4)
    k = len(engine.noise_scales.groups)
    skew = torch.linspace(1.0, 20.0, k, dtype=torch.float64)
    engine.noise_scales.weights = skew / skew.sum()  # a strongly uneven allocation
    ids = torch.full((1, 8), 3)
    engine.microbatch(ids, (ids + 11) % VOCAB)  # one example, far from the model's prediction
    sums = engine.clipped_sums()
    stds = engine.noise_scales.group_stds()
    names = {p: name for name, p in model.named_parameters()}
    whitened = 0.0
    for group, std in zip(engine.noise_scales.groups, stds):
        whitened += sum(float(sums[names[p]].pow(2).sum()) for p in group) / std ** 2
    sensitivity = SIGMA * whitened ** 0.5
    assert sensitivity <= 1 + 1e-9
    assert sensitivity > 0.99  # every group clipped to its C_k: the bound is tight, the check not vacuous


def test_weights_depend_only_on_earlier_releases():
    seen = {}

    def record(engine, step):
        seen.setdefault(step, engine.noise_scales.weights.clone())

    cfg = AnadpConfig(enabled=True, warmup_steps=1)
    run(cfg, steps=4, record=record)
    first = dict(seen)
    seen.clear()
    other = torch.randint(0, VOCAB, DATA.shape, generator=torch.Generator().manual_seed(99))
    model = build_model(CFG)
    engine = engine_for(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    sampler = PoissonSampler(N, Q, SECRET, micro_batch_size=4)
    for step in range(4):
        data = DATA if step < 3 else other  # only the batch of the last step differs
        noisy_sgd_step(engine, optimizer, sampler, data, step, before_release=record)
    assert torch.equal(seen[3], first[3]), "step 3's allocation looked at step 3's batch"


def test_anadp_needs_per_layer_clipping():
    with pytest.raises(ConfigError, match="privacy.clipping=per_layer"):
        load_config(None, ["privacy.noise_multiplier=1", "anadp.enabled=true"])


@pytest.mark.slow
def test_tensor_parallel_anadp_equals_one_process(tmp_path):
    assert_tensor_degree_two_is_one_process(tmp_path, "anadp")


@pytest.mark.slow
def test_exact_resume_with_anadp(tmp_path, cache):
    assert_resume_is_exact(tmp_path, cache, "privacy.clipping=per_layer", "anadp.enabled=true", "anadp.warmup_steps=1")
