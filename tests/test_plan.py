"""Resolving a run's privacy plan: sample rate from the expected batch, default delta, calibration, budget."""
import pytest

from dpdist.config import ConfigError, load_config
from dpdist.privacy import accounting
from dpdist.train.plan import resolve_plan


def cfg(*overrides):
    # RDP keeps these tests fast; the plan's code path is the same for both accountants.
    return load_config("configs/default.yaml", ["privacy.accountant=rdp", *overrides])


def test_sample_rate_delta_and_calibrated_sigma():
    plan = resolve_plan(cfg("train.steps=50", "train.batch_size=100", "privacy.target_epsilon=2"), 10_000, 100, 512)
    assert plan.sample_rate == pytest.approx(0.01) and plan.expected_batch_size == pytest.approx(100)
    assert plan.delta == pytest.approx(1e-5)
    assert plan.max_steps == 50
    assert accounting.epsilon(plan.sample_rate, plan.noise_multiplier, 50, plan.delta, "rdp") == pytest.approx(2, abs=2e-3)


def test_training_stops_before_the_budget_would_be_exceeded():
    plan = resolve_plan(cfg("train.steps=1000", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
                            "privacy.max_epsilon=1.0", "privacy.sample_rate=0.01"), 10_000, 100, 512)
    assert 0 < plan.max_steps < 1000
    assert accounting.epsilon(0.01, 1.0, plan.max_steps, plan.delta, "rdp") <= 1.0
    assert accounting.epsilon(0.01, 1.0, plan.max_steps + 1, plan.delta, "rdp") > 1.0


def test_large_delta_needs_explicit_consent():
    with pytest.raises(ConfigError, match="allow_large_delta"):
        resolve_plan(cfg("privacy.delta=0.001"), 5_000, 10, 512)
    assert resolve_plan(cfg("privacy.delta=0.001", "privacy.allow_large_delta=true", "train.steps=5"),
                        5_000, 10, 512).delta == 0.001


def test_non_private_runs_have_no_noise():
    plan = resolve_plan(cfg("privacy.enabled=false", "train.steps=5"), 5_000, 10, 512)
    assert plan.noise_multiplier == 0.0 and plan.epsilon_budget is None
