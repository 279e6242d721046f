"""Epsilon of Poisson-subsampled DP-SGD, from ``dp_accounting`` only (no formulas of our own).

PLD gives the headline number (tight, with a pessimistic discretisation); RDP is reported alongside
as the looser, widely quoted bound.  Adjacency is add/remove-one, the one Poisson sampling's
analysis uses.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from typing import Iterator, Sequence

import dp_accounting

ACCOUNTANTS = ("pld", "rdp")
PLD_GRID = 1e-4  # dp_accounting's default PLD value discretisation: the reported epsilon
# A coarser PLD grid for progress displays: about 10x faster and still an upper bound (the
# discretisation is pessimistic), but looser over many steps, so never the reported number.
DISPLAY_PLD_GRID = 1e-3
Prior = Sequence[tuple[float, float, int]]  # releases before the first step, run-length encoded like a ledger
# How far the accountants reach: PLD's grid spans the privacy loss, so its memory and time grow with
# epsilon / PLD_GRID (tens of seconds and gigabytes from here on), and a bound of e^100 on a likelihood
# ratio says nothing anyway.  A run is planned only within this epsilon (RDP's, the cheap one).
MAX_EPSILON = 100.0


class OutOfReach(Exception):
    """The accountant ran out of memory: the parameters' epsilon is far past ``MAX_EPSILON``."""


class _NonConvergence(logging.Filter):
    """Drops RDP's warning that an order's series did not converge (dozens per calibration at large
    sampling rates), remembering that one came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "failed to converge" in record.getMessage():
            self.seen = True
            return False
        return True


_explained_non_convergence = False


@contextlib.contextmanager
def _dp_accounting() -> Iterator[None]:
    """Around each dp_accounting computation: its RDP non-convergence warnings are replaced by one
    note per process in our words, and an allocation failure of an extreme PLD becomes OutOfReach."""
    global _explained_non_convergence
    absl_logger = logging.getLogger("absl")
    dropped = _NonConvergence()
    absl_logger.addFilter(dropped)
    try:
        yield
    except (MemoryError, ValueError) as exc:  # numpy: out of memory, or an array past its size limit
        if isinstance(exc, ValueError) and "Maximum allowed size exceeded" not in str(exc):
            raise
        raise OutOfReach(f"the privacy accountant ran out of memory: these parameters spend an epsilon far past "
                         f"{MAX_EPSILON:g}, where no guarantee is left; use more noise or a smaller epsilon") from None
    finally:
        absl_logger.removeFilter(dropped)
    if dropped.seen and not _explained_non_convergence:
        _explained_non_convergence = True
        # An order left out only removes a candidate from RDP's minimum over orders: the bound stays valid.
        print("note: the RDP accountant left out some Renyi orders whose series did not converge at this sampling "
              "rate; its epsilon is still an upper bound, if possibly a looser one (PLD is not affected)",
              file=sys.stderr, flush=True)


def _accountant(name: str, pld_grid: float = PLD_GRID) -> dp_accounting.PrivacyAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}; got {name!r}")
    if name == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant(value_discretization_interval=pld_grid)


def dp_sgd_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` releases of the Poisson-subsampled Gaussian mechanism."""
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon_for_history(history: list[tuple[float, float, int]], delta: float, accountant: str = "pld",
                        pld_grid: float = PLD_GRID) -> float:
    """Epsilon of a run whose steps are given run-length encoded as (sample_rate, noise_multiplier, count).

    A one-off Gaussian release at sensitivity one (the token-frequency release of Re-Attention) is the
    entry (1.0, its noise multiplier, 1): Poisson sampling at rate 1 is no sampling."""
    fresh = _accountant(accountant, pld_grid)
    history = run_lengths(history)
    if not history:
        return 0.0
    if any(sigma == 0 for _, sigma, _ in history):
        return math.inf  # a noiseless release of a sampled example
    event = dp_accounting.ComposedDpEvent([dp_sgd_event(q, sigma, count) for q, sigma, count in history])
    with _dp_accounting():
        return float(fresh.compose(event).get_epsilon(delta))


def run_lengths(history) -> list[tuple[float, float, int]]:
    """(q, sigma, count) runs with adjacent runs of the same (q, sigma) as one: a history composes to
    the same event however it was split (a ledger and a plan, a run and its resumed part), so its
    epsilon is the same to the bit."""
    runs: list[list] = []
    for q, sigma, count in history:
        if count <= 0:
            continue
        if runs and runs[-1][:2] == [q, sigma]:
            runs[-1][2] += count
        else:
            runs.append([q, sigma, count])
    return [tuple(run) for run in runs]


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "pld",
            pld_grid: float = PLD_GRID, prior: Prior = ()) -> float:
    """``prior``: releases made before the steps, as a ledger history, that the run's epsilon includes."""
    return epsilon_for_history([*prior, (sample_rate, noise_multiplier, steps)], delta, accountant, pld_grid)


def calibrate_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                               accountant: str = "pld", prior: Prior = ()) -> float:
    """The smallest sigma (to 1e-6) whose epsilon after ``steps`` steps, composed with the ``prior``
    releases, is at most ``target_epsilon``.

    PLD is slow at small sigma (tens of seconds at sigma 0.1), where the default search bracket
    [0, 1] starts, so PLD searches near the cheap RDP answer first: PLD's sigma is a few percent
    below RDP's.  Should that bracket miss, the default search runs.
    """
    if steps == 0:
        return 0.0  # nothing is released
    prior = [(q, sigma, count) for q, sigma, count in prior if count > 0]
    spent = epsilon_for_history(prior, delta, accountant)
    if spent >= target_epsilon:
        raise ValueError(f"the releases before training already spend epsilon {spent:.4g} >= the target "
                         f"{target_epsilon:g}; no noise multiplier leaves room for a step")
    earlier = [dp_sgd_event(q, sigma, count) for q, sigma, count in prior]

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        steps_event = dp_sgd_event(sample_rate, sigma, steps)
        return dp_accounting.ComposedDpEvent([*earlier, steps_event]) if earlier else steps_event

    def calibrate(bracket=None) -> float:
        with _dp_accounting():
            return float(dp_accounting.calibrate_dp_mechanism(lambda: _accountant(accountant), make_event,
                                                              target_epsilon, delta, bracket_interval=bracket))

    if accountant != "pld":
        return calibrate()
    try:  # RDP is looser: its prior alone may exceed a target that PLD's does not
        sigma_rdp = calibrate_noise_multiplier(target_epsilon, sample_rate, steps, delta, accountant="rdp",
                                               prior=prior)
    except ValueError:
        return calibrate()
    try:
        return calibrate(dp_accounting.ExplicitBracketInterval(0.85 * sigma_rdp, sigma_rdp))
    except ValueError:  # eps(0.85 sigma_rdp) and eps(sigma_rdp) lie on the same side of the target
        return calibrate()


def noise_floor(sample_rate: float, steps: int, delta: float, prior: Prior = ()) -> float:
    """The least noise multiplier whose RDP epsilon is within ``MAX_EPSILON``, rounded up to four
    significant digits so that the value printed in a refusal is accepted."""
    sigma = calibrate_noise_multiplier(MAX_EPSILON, sample_rate, steps, delta, accountant="rdp", prior=prior)
    unit = 10.0 ** (math.floor(math.log10(sigma)) - 3)
    return math.ceil(sigma / unit) * unit


def max_steps_within(epsilon_budget: float, sample_rate: float, noise_multiplier: float, delta: float,
                     accountant: str = "pld", upper: int = 10**7, prior: Prior = ()) -> int:
    """The largest T <= ``upper`` whose epsilon, composed with the ``prior`` releases, is at most the
    budget (epsilon grows with T); 0 also when the prior releases alone exceed it.

    Doubling from T = 1 before bisecting keeps every evaluation below twice the answer: PLD is
    several times slower far beyond it (about 3 s at T = 5e6 against 0.4 s at T = 1e3), and out of
    memory where epsilon is far past ``MAX_EPSILON``, so T = ``upper`` is tried first only when RDP
    (milliseconds, and looser than PLD) puts it within that.
    """
    def within(steps: int) -> bool:
        return epsilon(sample_rate, noise_multiplier, steps, delta, accountant, prior=prior) <= epsilon_budget

    # the common case: a run calibrated for its budget
    if epsilon(sample_rate, noise_multiplier, upper, delta, "rdp", prior=prior) <= MAX_EPSILON and within(upper):
        return upper
    good, bad = 0, 1  # invariant: within(good), and bad > upper or not within(bad)
    while bad <= upper and within(bad):
        good, bad = bad, 2 * bad
    bad = min(bad, upper + 1)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if within(middle) else (good, middle)
    return good
