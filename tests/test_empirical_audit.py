"""The one-run empirical lower bound on epsilon (Steinke, Nasr & Jagielski 2023) and ``dpdist audit
--empirical``: the bound against independent computations, and real audits of a noisy and a noiseless
run of the project's DP step."""
import math

import numpy as np
import pytest

from dpdist.cli import main
from dpdist.commands.audit_empirical import report
from dpdist.config import load_config
from dpdist.eval.canary_audit import AuditResult, audit_one_run
from dpdist.privacy.empirical_audit import count_correct, epsilon_lower_bound, guesses, p_value

BETA = 0.05


def binomial_pmf(k: int, n: int, q: float) -> float:
    return math.comb(n, k) * q**k * (1 - q) ** (n - k)


def paper_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The p-value by direct summation of binomial probabilities, as the paper's Algorithm 2 states it."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    tail = sum(binomial_pmf(k, r, q) for k in range(v, r + 1))
    alpha = max(sum(binomial_pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1))
    return min(tail + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize("m, r, v, epsilon, delta", [(20, 12, 11, 1.3, 1e-3), (50, 40, 30, 0.4, 1e-4),
                                                      (30, 30, 30, 2.0, 0.0), (100, 60, 59, 3.0, 1e-2)])
def test_p_value_matches_the_papers_formula_summed_directly(m, r, v, epsilon, delta):
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(paper_p_value(m, r, v, epsilon, delta), rel=1e-9)


@pytest.mark.parametrize("m, r, v, delta", [(20, 12, 11, 1e-3), (200, 100, 80, 1e-4), (1000, 500, 400, 1e-5)])
def test_the_bound_is_where_the_p_value_reaches_beta_and_it_rises_below(m, r, v, delta):
    bound = epsilon_lower_bound(m, r, v, BETA, delta)
    assert bound > 0
    assert paper_p_value(m, r, v, bound, delta) == pytest.approx(BETA, abs=1e-6)
    grid = [p_value(m, r, v, e, delta) for e in np.linspace(0, bound, 200)]
    assert all(a <= b for a, b in zip(grid, grid[1:]))  # so no smaller epsilon escapes rejection


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_correct_at_delta_zero_gives_the_closed_form(r):
    q = BETA ** (1 / r)  # P[Binom(r, q) >= r] = q^r = beta
    assert epsilon_lower_bound(r, r, r, BETA) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_many_correct_guesses_give_a_large_bound_and_chance_level_gives_zero():
    assert epsilon_lower_bound(1000, 1000, 1000, BETA, 1e-5) > 5.5
    assert epsilon_lower_bound(1000, 1000, 500, BETA, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 1000, 530, BETA, 1e-5) < 0.05  # 3 % above chance: within the noise


def test_the_bound_rises_with_correct_guesses_and_falls_with_delta():
    bounds = [epsilon_lower_bound(200, 100, v, BETA, 1e-4) for v in range(50, 101)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] == 0 and bounds[-1] > 3
    positive = [b for b in bounds if b > 0]
    assert all(a < b for a, b in zip(positive, positive[1:]))
    assert epsilon_lower_bound(200, 100, 95, BETA, 1e-3) < epsilon_lower_bound(200, 100, 95, BETA, 0.0)


def test_guesses_take_the_top_as_in_and_the_bottom_as_out():
    scores = np.array([0.3, 2.0, -1.0, 0.5, 1.5, -0.2])
    guessed = guesses(scores, k_plus=2, k_minus=1)
    assert guessed.tolist() == [0, 1, -1, 0, 1, 0]
    included = np.array([True, True, True, False, False, False])
    assert count_correct(guessed, included) == (3, 1)  # 1 is in (right), 4 is out (wrong), 2 is in (wrong)
    with pytest.raises(ValueError):
        guesses(scores, 4, 3)


# The audits: 256 canaries, 256 ordinary sequences, expected batch 64 (q = 1/8), 80 steps.  At sigma = 2 the
# accountant's epsilon (2.1) sits below what 128 guesses can show (3.6), so the noisy audit could fail; the
# noiseless run shows it would.
AUDIT = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.vocab_size=64", "model.max_seq_len=16",
         "data.seq_len=8", "train.steps=80", "train.batch_size=64", "train.lr=0.01", "train.progress=false",
         "privacy.seed=1"]


def audit(*overrides: str) -> AuditResult:
    cfg = load_config(None, [*AUDIT, *overrides])
    return audit_one_run(cfg, canaries=256, ordinary=256, seed=0, k_plus=64, k_minus=64, beta=BETA)


@pytest.fixture(scope="module")
def noisy():
    return audit("privacy.noise_multiplier=2", "privacy.clip_norm=1")


def test_a_noisy_run_stays_below_its_accountant_epsilon(noisy):
    assert noisy.made == 128 and 2.0 < noisy.epsilon < noisy.ceiling
    assert noisy.lower_bound < noisy.epsilon and not noisy.violated


def test_a_noiseless_run_gives_a_clearly_positive_bound_above_the_noisy_runs_epsilon(noisy):
    result = audit("privacy.noise_multiplier=0", "privacy.clip_norm=1000")
    assert result.epsilon == math.inf  # sigma = 0: no guarantee, so no violation either
    assert result.correct > 120 and result.lower_bound > 1
    assert result.lower_bound > noisy.epsilon  # the audit has the power to refute the noisy run's claim


def test_the_command_prints_the_comparison_and_exits_zero(capsys):
    code = main(["audit", "--empirical", *AUDIT[:6], "train.steps=5", "train.batch_size=8", "train.progress=false",
                 "privacy.noise_multiplier=1", "--canaries", "16", "--ordinary", "8", "--beta", "0.1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "16 random-token canaries" in out and "'in' for the 4 largest loss drops" in out
    assert "accountant epsilon (pld" in out and "empirical lower bound (90% confidence" in out
    assert out.strip().splitlines()[-1].startswith("ok:")


def test_a_bound_above_the_accountant_epsilon_is_reported_as_a_failure(noisy):
    refuted = AuditResult(**{**vars(noisy), "lower_bound": noisy.epsilon + 0.5})
    assert refuted.violated
    assert report(refuted).splitlines()[-1].startswith("FAIL: the lower bound exceeds the accountant's epsilon")


@pytest.mark.parametrize("args", [["--beta", "1.5"], ["--ordinary", "0"],
                                  ["--canaries", "8", "--k-plus", "5", "--k-minus", "4"],
                                  ["--canaries", "8", "--k-plus", "0", "--k-minus", "0"],
                                  ["privacy.enabled=false"], ["model.vocab_size=2", "data.seq_len=2"]])
def test_bad_input_is_one_error_line_and_exit_code_two(capsys, args):
    assert main(["audit", "--empirical", "privacy.noise_multiplier=1", "model.max_seq_len=16", "data.seq_len=8",
                 *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
