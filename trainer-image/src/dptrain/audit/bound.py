"""The one-run audit's statistics: a lower bound on ε from how many canary guesses were right.

Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023), Theorem 5.2:
m canaries are each included with probability ½ independently (S ∈ {−1, +1}^m), one training run
produces an output, and an auditor who sees only that output makes r guesses T_i ∈ {−1, +1} (abstaining
on the other m − r). If the training algorithm is (ε, δ)-DP with respect to each canary, the number of
correct guesses W satisfies, for every v,

    P[W ≥ v]  ≤  f(v) + 2·m·δ · max_{1 ≤ i ≤ v} (f(v − i) − f(v)) / i,
    f(k) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ k]

(the paper states the maximum over i ∈ {1..m}; for i ≥ v, f(v − i) = 1, so those terms are at most the
i = v term and the maximum is the same). The right-hand side is :func:`p_value`: observing v correct
guesses rejects "the algorithm is (ε, δ)-DP" at level β whenever p_value(ε) ≤ β.
:func:`epsilon_lower_bound` returns ε̂ such that every ε below it is rejected at β = 1 − confidence: with
probability at least 1 − β over the canaries' coin flips, the true ε is at least ε̂.

Pure numpy/scipy: no torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy import special, stats

__all__ = ["GuessCount", "best_lower_bound", "epsilon_lower_bound", "p_value"]

_GRID: Final = 200
"""Grid steps scanned for the first ε that is not rejected (a scan does not rely on the p-value being monotone)."""
_TOLERANCE: Final = 1e-7
"""Bisection stops when the bracket is this narrow; the lower end (p-value ≤ β) is returned."""


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m})")


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 5.2's bound on P[at least ``v`` of ``r`` guesses correct] if the algorithm is (ε, δ)-DP (≤ 1)."""
    _check_counts(m, r, v)
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be ≥ 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    # Count WRONG guesses, Binomial(r, 1/(1+e^ε)): expit(-ε) keeps the small failure probability exact at large ε,
    # where e^ε/(1+e^ε) would round to 1.
    wrong = float(special.expit(-epsilon))
    tail = float(stats.binom.cdf(r - v, r, wrong))  # f(v) = P[correct ≥ v] = P[wrong ≤ r − v]
    if delta == 0.0:
        return min(tail, 1.0)
    # f(v − i) − f(v) = P[v − i ≤ correct < v] = Σ_{k = v−i}^{v−1} P[correct = k]  for i = 1..v
    correct_pmf = stats.binom.pmf(r - np.arange(v - 1, -1, -1), r, wrong)  # P[correct = v−1], …, P[correct = 0]
    spread = np.max(np.cumsum(correct_pmf) / np.arange(1, v + 1))
    return min(tail + 2.0 * m * delta * float(spread), 1.0)


def _tail_reaches(beta: float, *, r: int, v: int) -> float:
    """The ε at which f(v) alone equals β: no larger ε has p-value ≤ β (f(v) only grows with ε).

    P[Binomial(r, w) ≤ k] = 1 − F_Beta(k+1, r−k)(w), so f(v) = P[wrong ≤ r − v] = β at the Beta quantile below.
    """
    wrong = float(stats.beta.ppf(1.0 - beta, r - v + 1, v))
    return math.log1p(-wrong) - math.log(wrong) if 0.0 < wrong < 0.5 else 0.0


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """ε̂: every ε below it has :func:`p_value` ≤ β = 1 − ``confidence`` (0 when ε = 0 is not rejected).

    The true ε₀ is below ε̂ only if "(ε₀, δ)-DP" was rejected, which happens with probability at most β. This is
    the smallest ε that is not rejected, found by scanning a grid up to the ε where f(v) alone reaches β and
    bisecting the first step that crosses; the p-value grows with ε (tested), so it is also the largest rejected ε
    that the paper's bisection finds. ε̂ itself is rejected (its p-value is ≤ β).
    """
    _check_counts(m, r, v)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) <= beta

    if v == 0 or not rejected(0.0):
        return 0.0
    ceiling = _tail_reaches(beta, r=r, v=v)
    grid = np.linspace(0.0, ceiling, _GRID + 1)
    first_kept = next((index for index, epsilon in enumerate(grid) if not rejected(float(epsilon))), len(grid))
    if first_kept == len(grid):  # p(ceiling) = β exactly
        return ceiling
    low, high = float(grid[first_kept - 1]), float(grid[first_kept])
    while high - low > _TOLERANCE:
        middle = (low + high) / 2.0
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class GuessCount:
    """One way of guessing: ``guesses`` canaries guessed (the rest abstained), ``correct`` of them right."""

    rule: str
    """How the guesses were made (for the report)."""
    canaries: int
    """m: the canaries this rule guessed on or abstained from (each was included with probability ½)."""
    guesses: int
    correct: int


def best_lower_bound(
    counts: list[GuessCount], *, delta: float, confidence: float
) -> tuple[float, GuessCount | None, list[float]]:
    """The best bound over several guessing rules, each tested at (1 − confidence) / len(counts) (Bonferroni):
    trying several rules and keeping the best must not inflate the confidence.

    Returns (ε̂, the rule that gave it or None when every bound is 0, every rule's ε̂).
    """
    if not counts:
        return 0.0, None, []
    per_rule = 1.0 - (1.0 - confidence) / len(counts)
    bounds = [
        epsilon_lower_bound(m=count.canaries, r=count.guesses, v=count.correct, delta=delta, confidence=per_rule)
        for count in counts
    ]
    best = int(np.argmax(bounds))
    return bounds[best], (counts[best] if bounds[best] > 0.0 else None), bounds
