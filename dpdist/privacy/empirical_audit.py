"""The one-run empirical lower bound on epsilon (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy
Auditing with One (1) Training Run"), abstention version.

m canaries are each put into the training set by an independent fair coin.  From the trained model
alone the auditor guesses "in" for the k+ canaries with the highest membership scores, "out" for the
k- lowest, and abstains on the rest: r = k+ + k- guesses, v of them correct.  If training is
(epsilon, delta)-DP with respect to each canary, the paper's Theorem 3 (delta = 0) and its extension
to delta > 0 (the p-value of its Algorithm 2) bound the chance of v or more correct guesses:

    P[V >= v] <= P[Binom(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Binom(r, q) < v] / i,
    q = e^epsilon / (1 + e^epsilon)   (the accuracy of epsilon-DP randomised response).

Every epsilon whose p-value is at most beta is rejected with confidence 1 - beta; the largest such
epsilon is the reported lower bound.  k+ and k- must be fixed before the scores are seen: choosing
them to maximise the bound afterwards would need a correction (e.g. Bonferroni over the choices).
"""
from __future__ import annotations

import numpy as np
from scipy import optimize, special, stats

EPSILON_TOLERANCE = 1e-6


def guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the k+ highest scores, -1 ("out") for the k- lowest, 0 (abstain) elsewhere; ties
    are broken by index so the guesses depend on the scores only."""
    scores = np.asarray(scores, dtype=np.float64)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {len(scores)} canaries; "
                         f"got {k_plus} and {k_minus}")
    order = np.argsort(scores, kind="stable")
    result = np.zeros(len(scores), dtype=np.int64)
    result[order[:k_minus]] = -1
    result[order[len(scores) - k_plus:]] = 1
    return result


def count_correct(guessed: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses) of +1/-1/0 guesses against the canaries' true coins."""
    guessed, included = np.asarray(guessed), np.asarray(included, dtype=bool)
    made = int(np.count_nonzero(guessed))
    correct = int(np.count_nonzero((guessed == 1) & included) + np.count_nonzero((guessed == -1) & ~included))
    return made, correct


def p_value(m: int, made: int, correct: int, epsilon: float, delta: float) -> float:
    """The chance, under (epsilon, delta)-DP, of ``correct`` or more right among ``made`` guesses about
    m canaries (the module's formula)."""
    _check_counts(m, made, correct)
    q = special.expit(epsilon)
    tail = float(stats.binom.sf(correct - 1, made, q))  # P[Binom(made, q) >= correct]
    if delta == 0 or correct == 0:
        return tail
    i = np.arange(1, correct + 1)
    windows = stats.binom.sf(correct - i - 1, made, q) - tail  # P[correct - i <= Binom < correct]
    return min(tail + 2 * m * delta * float(np.max(windows / i)), 1.0)


def epsilon_lower_bound(m: int, made: int, correct: int, beta: float = 0.05, delta: float = 0.0) -> float:
    """The largest epsilon that (epsilon, delta)-DP is rejected at with confidence 1 - beta (0 when
    even epsilon = 0 is not rejected).

    The p-value rises with epsilon (its first term, a binomial tail, rises with q and dominates at an
    audit's small 2 m delta; the tests check the whole of it on a grid), so the bound is where it
    crosses beta: bracketed by doubling, then found by Brent's method."""
    _check_counts(m, made, correct)
    if not 0 < beta < 1 or not 0 <= delta < 1:
        raise ValueError(f"need 0 < beta < 1 and 0 <= delta < 1; got {beta} and {delta}")

    def excess(epsilon: float) -> float:
        return p_value(m, made, correct, epsilon, delta) - beta

    if excess(0.0) > 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) <= 0:  # tends to 1 - beta > 0: P[Binom >= correct] -> 1 as q -> 1
        low, high = high, 2 * high
    return float(optimize.brentq(excess, low, high, xtol=EPSILON_TOLERANCE))


def _check_counts(m: int, made: int, correct: int) -> None:
    if not 0 <= correct <= made <= m:
        raise ValueError(f"need 0 <= correct <= guesses made <= canaries; got {correct}, {made}, {m}")
