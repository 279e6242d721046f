"""LSG low-rank + sparse gradients (issue 6).

- Full rank, density 1, no clipping active, no noise: the update equals plain DP-SGD's.
- The noise actually added: round(rho p r) + round(rho r d) coordinates per matrix (the support),
  nothing elsewhere, and the reconstructed update has rank <= 2r.
- Sensitivity: one example's contribution to everything released (dense clipped sums and carrier
  sums) has norm at most C, and close to C when it is clipped (not vacuous).
- The carriers and supports a step uses do not depend on that step's batch (perturb it: identical),
  while the support does move between steps (it follows the previous noisy carrier gradient).
- Tensor parallelism: 2 steps at tensor degree 2 equal the single-process run (float64, 1e-10).
- A resumed run equals the uninterrupted one (carriers, supports and W_0 are checkpointed).
"""
import pytest
import torch

from dpdist import build_model
from dpdist.config import ConfigError, LsgConfig, load_config
from dpdist.privacy.sampling import PoissonSampler
from helpers.steps import private_step

from helpers.method_steps import CFG, DATA, N, Q, SECRET, assert_tensor_degree_two_is_one_process
from helpers.runs import assert_resume_is_exact


def engine_for(model, lsg: LsgConfig | None, clip=0.5, sigma=1.0):
    return private_step(model, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=Q * N, secret=SECRET,
                        micro_batch_size=4, seq_len=8, lsg=lsg)


def one_batch(engine, rows: torch.Tensor) -> None:
    engine.microbatch(rows[:, :-1], rows[:, 1:])


def test_full_rank_and_density_one_is_plain_dp_sgd():
    plain_model, lsg_model = build_model(CFG), build_model(CFG)
    plain, lsg = engine_for(plain_model, None, clip=1e6, sigma=0.0), engine_for(
        lsg_model, LsgConfig(enabled=True, rank=16), clip=1e6, sigma=0.0)
    for engine in (plain, lsg):
        one_batch(engine, DATA[:6])
        engine.release(0)
    for (name, a), b in zip(plain_model.named_parameters(), lsg_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-9 * float(a.grad.abs().max())), name


def test_noise_goes_only_on_the_support():
    model = build_model(CFG)
    rank, density = 2, 0.25
    engine = engine_for(model, LsgConfig(enabled=True, rank=rank, density=density))
    dims = engine.parametrization.noise_dimension()
    engine.release(0)  # an empty batch: what is released is the noise alone
    assert len(dims) == 8  # qkv, proj, fc, proj in two blocks
    for weight, layer in engine.parametrization.layers.items():
        p, d = weight.shape
        expected = round(density * p * rank) + round(density * rank * d)
        assert dims[layer.name] == expected < p * d, layer.name
        assert torch.linalg.matrix_rank(weight.grad) <= 2 * rank
    # the released noisy carrier values are nonzero exactly on the support of step 0
    engine2 = engine_for(build_model(CFG), LsgConfig(enabled=True, rank=rank, density=density))
    masks = {c: m.clone() for layer in engine2.parametrization.layers.values() for c, m in layer.masks.items()}
    captured = {}
    original = engine2.parametrization.observe
    engine2.parametrization.observe = lambda step, noisy: captured.update(noisy) or original(step, noisy)
    engine2.release(0)
    for carrier, mask in masks.items():
        assert torch.equal(captured[carrier] != 0, mask), carrier.carrier_name


def test_one_example_moves_everything_released_by_at_most_c():
    clip = 1e-3
    engine = engine_for(build_model(CFG), LsgConfig(enabled=True, rank=2, density=0.5), clip=clip, sigma=0.0)
    one_batch(engine, DATA[:1])
    sums = engine.tap.pop_grad_sums()
    carried = set(engine.parametrization.layers)
    assert not carried & set(sums), "a carried weight's own gradient was summed"
    total = sum(float(g.double().pow(2).sum()) for g in sums.values()) ** 0.5
    assert total <= clip * (1 + 1e-9)
    assert total > 0.99 * clip


def test_carriers_and_support_ignore_the_current_batch():
    lsg = LsgConfig(enabled=True, rank=2, density=0.3, refresh_every=2)

    def used_at_step(last_rows: torch.Tensor, steps: int = 4):
        engine = engine_for(build_model(CFG), lsg)
        sampler = PoissonSampler(N, Q, SECRET, micro_batch_size=4)
        history = []
        for step in range(steps):
            rows = last_rows if step == steps - 1 else DATA[sampler.plan(step).micro_batches[0].indices]
            one_batch(engine, rows)
            history.append({layer.name: (layer.left.clone(), layer.right.clone(),
                                         *(m.clone() for m in layer.masks.values())) for layer in engine.parametrization.layers.values()})
            engine.release(step)
        return history

    a = used_at_step(DATA[:4])
    b = used_at_step(torch.randint(0, 37, (4, 9), generator=torch.Generator().manual_seed(123)))
    for name in a[-1]:
        assert all(torch.equal(x, y) for x, y in zip(a[-1][name], b[-1][name])), name
    name = next(iter(a[0]))
    assert not torch.equal(a[0][name][2], a[1][name][2]), "the support never moved"
    assert not torch.equal(a[1][name][0], a[2][name][0]), "the carriers were never refreshed"


def test_lsg_refuses_per_layer_clipping_and_two_pass():
    with pytest.raises(ConfigError, match="lsg.enabled"):
        load_config(None, ["privacy.noise_multiplier=1", "lsg.enabled=true", "privacy.clipping=per_layer"])
    with pytest.raises(ConfigError, match="book-keeping"):
        load_config(None, ["privacy.noise_multiplier=1", "lsg.enabled=true", "privacy.mode=two_pass"])
    with pytest.raises(ValueError, match="exceeds"):
        private_step(build_model(CFG), clip_norm=1.0, lsg=LsgConfig(enabled=True, rank=17))


@pytest.mark.slow
def test_tensor_parallel_lsg_equals_one_process(tmp_path):
    assert_tensor_degree_two_is_one_process(tmp_path, "lsg")


@pytest.mark.slow
def test_exact_resume_with_lsg(tmp_path, cache):
    assert_resume_is_exact(tmp_path, cache, "lsg.enabled=true", "lsg.rank=2", "lsg.density=0.5", "lsg.refresh_every=2")
