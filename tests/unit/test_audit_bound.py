"""The one-run audit's bound (Steinke, Nasr & Jagielski 2023, Theorem 5.2): closed forms, the paper's own
search procedure, the formula taken literally, and its validity on a mechanism whose ε is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dptrain.audit.bound import GuessCount, best_lower_bound, epsilon_lower_bound, p_value


def _paper_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 5.2 taken literally, max over i ∈ {1..m} as the paper states it, f by direct summation."""
    q = math.exp(epsilon) / (1.0 + math.exp(epsilon))

    def f(k: int) -> float:
        return 1.0 if k <= 0 else sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(k, r + 1))

    spread = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(f(v) + 2 * m * delta * spread, 1.0)


def _paper_search(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """The paper's appendix procedure: grow an upper end by 1 until not rejected, then 30 bisection steps."""
    low, high = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=high, delta=delta) < beta:
        high += 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if p_value(m=m, r=r, v=v, epsilon=middle, delta=delta) < beta:
            low = middle
        else:
            high = middle
    return low


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "epsilon"),
    [(12, 8, 7, 1e-2, 0.7), (30, 30, 30, 1e-3, 2.0), (25, 10, 9, 0.0, 1.5), (40, 20, 14, 1e-2, 0.3), (5, 5, 1, 0.1, 0)],
)
def test_p_value_is_the_theorem_taken_literally(m: int, r: int, v: int, delta: float, epsilon: float) -> None:
    assert p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) == pytest.approx(
        _paper_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15
    )


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_right_with_pure_dp_has_a_closed_form(r: int) -> None:
    # δ = 0 and v = r: p = q^r, so ε̂ = logit(β^(1/r)).
    beta = 0.05
    q = beta ** (1 / r)
    assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0, confidence=0.95) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-6
    )


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [
        # (m, r, v, δ) → ε̂ at 95 %: the values the paper's procedure gives (pinned, and recomputed below)
        (1000, 1000, 1000, 1e-5, 5.782283),
        (1000, 600, 600, 1e-5, 5.270399),
        (100, 100, 100, 1e-5, 3.490216),
        (1000, 100, 95, 1e-5, 2.165176),
        (1000, 200, 180, 1e-5, 1.796285),
        (1000, 1000, 900, 1e-5, 2.020646),
        (1000, 1000, 550, 1e-5, 0.093988),
        (10000, 1000, 1000, 1e-5, 5.529350),
    ],
)
def test_matches_the_papers_search_procedure(m: int, r: int, v: int, delta: float, expected: float) -> None:
    ours = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=0.95)
    assert ours == pytest.approx(expected, abs=2e-6)
    assert ours == pytest.approx(_paper_search(m, r, v, delta, 0.05), abs=2e-6)
    assert p_value(m=m, r=r, v=v, epsilon=ours, delta=delta) <= 0.05  # the bound itself is rejected


def test_every_epsilon_below_the_bound_is_rejected_and_the_next_is_not() -> None:
    m, r, v, delta = 300, 120, 100, 1e-3
    bound = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=0.9)
    grid = np.linspace(0, 8, 1601)
    rejected = [p_value(m=m, r=r, v=v, epsilon=float(e), delta=delta) <= 0.1 for e in grid]
    first_kept = rejected.index(False)
    assert all(rejected[:first_kept])
    assert grid[first_kept - 1] <= bound < grid[first_kept] + 1e-9
    assert not any(rejected[first_kept:])  # the p-value grows with ε: nothing is rejected above the bound either


def test_the_p_value_grows_with_epsilon() -> None:
    """So the first ε that is not rejected is also the largest that is (the paper's bisection assumes it)."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        m = int(rng.integers(2, 2000))
        r = int(rng.integers(1, m + 1))
        v = int(rng.integers(0, r + 1))
        delta = float(rng.choice([0.0, 1e-6, 1e-5, 1e-3, 1e-2, 0.1]))
        values = [p_value(m=m, r=r, v=v, epsilon=float(e), delta=delta) for e in np.linspace(0, 10, 101)]
        assert np.all(np.diff(values) >= -1e-12), (m, r, v, delta)


def test_edges_and_monotonicity() -> None:
    assert epsilon_lower_bound(m=100, r=0, v=0, delta=1e-5, confidence=0.95) == 0.0
    assert epsilon_lower_bound(m=100, r=50, v=25, delta=1e-5, confidence=0.95) == 0.0  # chance level
    assert p_value(m=10, r=10, v=0, epsilon=3.0, delta=0.0) == 1.0
    more_right = [epsilon_lower_bound(m=500, r=200, v=v, delta=1e-5, confidence=0.95) for v in (120, 150, 180, 200)]
    assert more_right == sorted(more_right)
    by_delta = [epsilon_lower_bound(m=500, r=500, v=500, delta=d, confidence=0.95) for d in (0.0, 1e-5, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True)  # a larger δ explains more
    for bad in ({"m": 5, "r": 6, "v": 1}, {"m": 5, "r": 4, "v": 5}, {"m": 5, "r": 4, "v": -1}):
        with pytest.raises(ValueError, match="need 0"):
            epsilon_lower_bound(**bad, delta=0.0, confidence=0.95)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(m=5, r=5, v=5, delta=0.0, confidence=1.0)
    with pytest.raises(ValueError, match="delta"):
        p_value(m=5, r=5, v=5, epsilon=1.0, delta=2.0)


def test_several_rules_are_corrected_for_multiple_testing() -> None:
    counts = [GuessCount("a", 1000, 100, 90), GuessCount("b", 1000, 400, 300), GuessCount("c", 1000, 20, 20)]
    best, rule, each = best_lower_bound(counts, delta=1e-5, confidence=0.95)

    def bound(count: GuessCount, confidence: float) -> float:
        return epsilon_lower_bound(m=1000, r=count.guesses, v=count.correct, delta=1e-5, confidence=confidence)

    singles = [bound(count, 1 - 0.05 / 3) for count in counts]
    assert each == singles
    assert best == max(singles)
    assert rule == counts[int(np.argmax(singles))]
    assert best < max(bound(count, 0.95) for count in counts)
    assert best_lower_bound([GuessCount("none", 10, 10, 5)], delta=0.0, confidence=0.95)[1] is None
    assert best_lower_bound([], delta=0.0, confidence=0.95) == (0.0, None, [])


def test_the_bound_is_valid_for_randomized_response() -> None:
    """Randomized response on each canary's bit is exactly ε₀-DP and the worst case of the theorem: the audit
    must stay below ε₀ in at least 95 % of runs, and still find most of it."""
    epsilon0, m, runs = 1.0, 400, 300
    rng = np.random.default_rng(0)
    flip = 1 / (1 + math.exp(epsilon0))
    bounds = []
    for _ in range(runs):
        correct = int(stats.binom.rvs(m, 1 - flip, random_state=rng))  # guess = the released bit
        bounds.append(epsilon_lower_bound(m=m, r=m, v=correct, delta=0.0, confidence=0.95))
    assert np.mean(np.array(bounds) <= epsilon0) >= 0.95
    assert np.median(bounds) > 0.6 * epsilon0
