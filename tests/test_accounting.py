"""Accounting against the reference numbers of algorithms.md Appendix B (dp-accounting 0.6.0)."""
import math

import pytest

from dpdist.privacy import accounting

# sigma, q, steps, delta, RDP epsilon, PLD epsilon
APPENDIX_B = [
    (1.1, 256 / 60000, 14062, 1e-5, 2.5966, 2.3817),
    (1.0, 0.01, 1000, 1e-5, 2.1014, 1.8282),
    (0.8, 0.005, 10000, 1e-6, 5.6156, 5.1349),
    (2.0, 0.001, 100000, 1e-6, 0.7528, 0.6988),  # 0.1 s with either accountant: not slow
]
# target epsilon, RDP sigma, PLD sigma; for q = 0.01, 1000 steps, delta = 1e-5
CALIBRATION = [(1.0, 1.5131, 1.4146), (3.0, 0.8646, 0.8136), (8.0, 0.6159, 0.5863)]


@pytest.mark.parametrize("sigma, q, steps, delta, eps_rdp, eps_pld", APPENDIX_B)
def test_appendix_b_epsilons(sigma, q, steps, delta, eps_rdp, eps_pld):
    assert accounting.epsilon(q, sigma, steps, delta, accountant="rdp") == pytest.approx(eps_rdp, rel=0.01)
    assert accounting.epsilon(q, sigma, steps, delta, accountant="pld") == pytest.approx(eps_pld, rel=0.01)


def test_display_grid_never_shows_less_than_the_reported_epsilon():
    fine = accounting.epsilon(0.01, 1.0, 1000, 1e-5)
    coarse = accounting.epsilon(0.01, 1.0, 1000, 1e-5, pld_grid=accounting.DISPLAY_PLD_GRID)
    assert fine <= coarse <= 1.01 * fine


def test_no_step_spends_nothing_and_no_noise_spends_everything():
    for name in ("pld", "rdp"):
        assert accounting.epsilon(0.01, 1.0, 0, 1e-5, accountant=name) == 0.0
        assert accounting.epsilon(0.01, 0.0, 10, 1e-5, accountant=name) == math.inf
    with pytest.raises(ValueError, match="accountant must be one of"):
        accounting.epsilon(0.01, 1.0, 10, 1e-5, accountant="prv")


def _check_calibration(target, accountant, expected):
    sigma = accounting.calibrate_noise_multiplier(target, 0.01, 1000, 1e-5, accountant=accountant)
    assert sigma == pytest.approx(expected, abs=1e-4)
    achieved = accounting.epsilon(0.01, sigma, 1000, 1e-5, accountant=accountant)
    assert target * (1 - 1e-3) <= achieved <= target  # round trip, never over the target


@pytest.mark.parametrize("target, sigma_rdp, sigma_pld", CALIBRATION)
def test_calibration_rdp_round_trips(target, sigma_rdp, sigma_pld):
    _check_calibration(target, "rdp", sigma_rdp)


# A PLD evaluation at sigma ~0.6 takes about 1 s: eps 3 and 8 take 6-9 s each.
@pytest.mark.parametrize("target, sigma_rdp, sigma_pld",
                         [CALIBRATION[0]] + [pytest.param(*row, marks=pytest.mark.slow) for row in CALIBRATION[1:]])
def test_calibration_pld_round_trips(target, sigma_rdp, sigma_pld):
    _check_calibration(target, "pld", sigma_pld)


def test_calibration_for_no_step_needs_no_noise():
    assert accounting.calibrate_noise_multiplier(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("pld", marks=pytest.mark.slow)])  # pld: 9 s
def test_max_steps_within_is_the_last_step_under_budget(accountant):
    steps = accounting.max_steps_within(2.0, 0.01, 1.0, 1e-5, accountant=accountant)
    assert accounting.epsilon(0.01, 1.0, steps, 1e-5, accountant=accountant) <= 2.0
    assert accounting.epsilon(0.01, 1.0, steps + 1, 1e-5, accountant=accountant) > 2.0


def test_max_steps_within_respects_its_bounds():
    assert accounting.max_steps_within(1e-3, 0.01, 1.0, 1e-5, accountant="rdp") == 0  # not even one step
    assert accounting.max_steps_within(100.0, 0.01, 1.0, 1e-5, accountant="rdp", upper=500) == 500
    assert accounting.max_steps_within(100.0, 0.01, 1.0, 1e-5, accountant="rdp", upper=0) == 0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_history_composes_like_one_run(accountant):
    single = accounting.epsilon(0.01, 1.0, 1000, 1e-5, accountant=accountant)
    assert accounting.epsilon_for_history([(0.01, 1.0, 1000)], 1e-5, accountant) == single
    split = accounting.epsilon_for_history([(0.01, 1.0, 400), (0.01, 1.0, 600)], 1e-5, accountant)
    assert split == pytest.approx(single, rel=1e-6)
    assert accounting.epsilon_for_history([(0.01, 1.0, 1000), (0.02, 0.5, 0)], 1e-5, accountant) == single
    assert accounting.epsilon_for_history([], 1e-5, accountant) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_history_of_two_mechanisms_lies_between_its_parts_and_the_worse_mechanism(accountant):
    first, second = (0.01, 1.0, 500), (0.02, 1.5, 300)
    both = accounting.epsilon_for_history([first, second], 1e-5, accountant)
    assert both == pytest.approx(accounting.epsilon_for_history([second, first], 1e-5, accountant), rel=1e-6)
    assert both > max(accounting.epsilon(*first, 1e-5, accountant), accounting.epsilon(*second, 1e-5, accountant))
    assert both < accounting.epsilon(0.02, 1.0, 800, 1e-5, accountant)  # every step at the larger q, smaller sigma
    assert accounting.epsilon_for_history([first, (0.02, 0.0, 1)], 1e-5, accountant) == math.inf
