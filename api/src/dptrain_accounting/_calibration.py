"""Noise calibration: the smallest noise multiplier that meets an (epsilon, delta) target."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._accountants import (
    _PLD_BRACKETING_DISCRETIZATION,
    _pld_epsilon,
    _rdp_epsilon,
    compute_epsilon,
    get_accountant,
)
from ._errors import CalibrationError
from ._mechanism import MechanismSegment

__all__ = ["MAX_NOISE_MULTIPLIER", "MIN_NOISE_MULTIPLIER", "calibrate_noise_multiplier"]

_log = logging.getLogger(__name__)

MAX_NOISE_MULTIPLIER: float = 1e3
"""Largest noise multiplier calibration will consider; a target unreachable with it is an error."""

MIN_NOISE_MULTIPLIER: float = 0.3
"""Smallest noise multiplier calibration returns.  A target so loose that even less noise would meet
it gets this value (still within the target).  It also bounds the cost: PLD accounting slows down
roughly as 1/sigma^2 for tiny noise."""

_LOG_FLOOR = 1e-300


def _log_epsilon(epsilon: float) -> float:
    return math.log(min(max(epsilon, _LOG_FLOOR), 1e300))


@dataclass
class _Point:
    sigma: float
    epsilon: float

    @property
    def x(self) -> float:
        return math.log(self.sigma)


@dataclass
class _Bracket:
    lo: _Point | None  # largest evaluated sigma whose epsilon exceeds the target
    hi: _Point | None  # smallest evaluated sigma whose epsilon meets the target
    slope: float  # d log(epsilon) / d log(sigma) estimate (negative)
    evaluations: int


def _search(  # noqa: C901, PLR0915 - one bracketing-then-bisection loop; its state (bracket, cache, tolerance) would only be passed around if split
    epsilon_of: Callable[[float], float],
    *,
    target: float,
    start_sigma: float,
    slope: float,
    tolerance: float,
    min_sigma: float,
    max_sigma: float,
) -> _Bracket:
    """Bracket the threshold sigma of the decreasing function ``epsilon_of`` in log(sigma).

    Returns the tightest evaluated pair ``lo`` (epsilon > target) and ``hi`` (epsilon <= target) with
    ``log(hi / lo) <= tolerance`` -- or with ``lo`` None when ``min_sigma`` already meets the target,
    or ``hi`` None when ``max_sigma`` does not.  The missing side of the bracket is found by secant
    steps on log(epsilon) against log(sigma) (at most a factor 2 in sigma per step), then Brent's
    method shrinks it; every evaluation is recorded, so the result rests on evaluated points only.
    """
    from scipy.optimize import brentq

    x_min, x_max = math.log(min_sigma), math.log(max_sigma)
    log_target = math.log(target)
    seen: dict[float, _Point] = {}
    lo: _Point | None = None
    hi: _Point | None = None
    slope = min(max(slope, -20.0), -0.05)

    def evaluate(x: float) -> _Point:
        nonlocal lo, hi
        x = min(max(x, x_min), x_max)
        if x in seen:
            return seen[x]
        sigma = math.exp(x)
        point = seen[x] = _Point(sigma, epsilon_of(sigma))
        if point.epsilon > target:
            if lo is None or point.sigma > lo.sigma:
                lo = point
        elif hi is None or point.sigma < hi.sigma:
            hi = point
        return point

    def step_towards_root(point: _Point, previous: _Point | None, margin: float, direction: float) -> float:
        nonlocal slope
        if previous is not None and previous.x != point.x and 0.0 < point.epsilon < math.inf:
            secant = (_log_epsilon(point.epsilon) - _log_epsilon(previous.epsilon)) / (point.x - previous.x)
            if math.isfinite(secant) and secant < 0.0:
                slope = min(max(secant, -20.0), -0.05)
        step = (log_target - _log_epsilon(point.epsilon)) / slope + direction * margin
        step = direction * min(max(direction * step, margin), math.log(2.0))
        return point.x + step

    # 1. Find both sides of the threshold.
    point = evaluate(math.log(start_sigma))
    previous: _Point | None = None
    margin = 0.5 * tolerance
    while lo is None or hi is None:
        if hi is None and point.sigma >= max_sigma:
            break
        if lo is None and point.sigma <= min_sigma:
            break
        direction = 1.0 if hi is None else -1.0
        point, previous = evaluate(step_towards_root(point, previous, margin, direction)), point
        margin *= 4.0

    # 2. One straddle around the log-log interpolated root (enough when the slope is well known, as
    #    when a cheaper stage already located the threshold), then Brent's method on what is left.
    if lo is not None and hi is not None and hi.x - lo.x > tolerance:
        b = (_log_epsilon(hi.epsilon) - _log_epsilon(lo.epsilon)) / (hi.x - lo.x)
        if b < 0.0:
            root = lo.x + (log_target - _log_epsilon(lo.epsilon)) / b
            for candidate in (root + 0.45 * tolerance, root - 0.45 * tolerance):
                if lo.x < candidate < hi.x and hi.x - lo.x > tolerance:
                    evaluate(candidate)
    if lo is not None and hi is not None and hi.x - lo.x > tolerance:
        brentq(
            lambda x: _log_epsilon(evaluate(x).epsilon) - log_target,
            lo.x,
            hi.x,
            xtol=0.9 * tolerance,
            rtol=1e-12,
            maxiter=200,
        )
    # Safety net (e.g. a non-monotone accountant confused Brent): plain bisection on evaluated points.
    while lo is not None and hi is not None and hi.x - lo.x > tolerance:
        evaluate(0.5 * (lo.x + hi.x))
    if lo is not None and hi is not None and hi.x > lo.x and 0.0 < hi.epsilon < lo.epsilon < math.inf:
        local = (_log_epsilon(hi.epsilon) - _log_epsilon(lo.epsilon)) / (hi.x - lo.x)
        slope = min(max(local, -20.0), -0.05)
    return _Bracket(lo, hi, slope, len(seen))


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < math.inf:
        raise CalibrationError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def calibrate_noise_multiplier(  # noqa: C901, PLR0912, PLR0915 - argument checks, the cache and the search in the order an auditor reads them
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    prior: Sequence[MechanismSegment] = (),
    relative_tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier sigma (up to ``relative_tolerance``) such that
    ``compute_epsilon([*prior, MechanismSegment(sigma, sample_rate, steps)], delta=delta,
    accountant=accountant) <= target_epsilon``.

    The returned sigma never overshoots: it has been evaluated with exactly that
    ``compute_epsilon`` call.  It is also minimal: some sigma' >= sigma / (1 + relative_tolerance)
    has been seen to exceed the target (unless sigma is :data:`MIN_NOISE_MULTIPLIER`).  Cheap proxies
    (RDP, then PLD at a coarse discretization) only locate the threshold; the reporting accountant
    decides.  Raises :class:`CalibrationError` for invalid inputs, when ``prior`` alone already
    spends the target, or when even :data:`MAX_NOISE_MULTIPLIER` cannot meet it; and
    :class:`UnsupportedAccountantError` for an unknown accountant.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = _check_positive("delta", delta)
    if delta >= 1.0:
        raise CalibrationError(f"delta must be in (0, 1), got {delta!r}")
    q = _check_positive("sample_rate", sample_rate)
    if q > 1.0:
        raise CalibrationError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or int(steps) < 1:
        raise CalibrationError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    tolerance = _check_positive("relative_tolerance", relative_tolerance)
    if not 1e-6 <= tolerance <= 0.1:
        raise CalibrationError(f"relative_tolerance must be in [1e-6, 0.1], got {relative_tolerance!r}")
    get_accountant(accountant)  # UnsupportedAccountantError before any work
    if isinstance(prior, MechanismSegment):
        raise CalibrationError("prior must be a sequence of MechanismSegment, not a single segment")
    history = tuple(prior)
    if not all(isinstance(s, MechanismSegment) for s in history):
        raise CalibrationError("prior must contain only MechanismSegment instances")
    log_tolerance = math.log1p(tolerance)

    def segments(sigma: float) -> tuple[MechanismSegment, ...]:
        return (*history, MechanismSegment(sigma, q, steps))

    def reported(sigma: float) -> float:
        return compute_epsilon(segments(sigma), delta=delta, accountant=accountant)

    if history:
        spent = compute_epsilon(history, delta=delta, accountant=accountant)
        if spent >= target:
            raise CalibrationError(
                f"the prior segments already spend epsilon={spent:.6g} >= target {target:.6g} "
                f"(delta={delta:g}, accountant={accountant!r})"
            )
    at_max = reported(MAX_NOISE_MULTIPLIER)
    if at_max > target:
        raise CalibrationError(
            f"target epsilon {target:.6g} is unreachable: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} "
            f"gives epsilon={at_max:.6g} (sample_rate={q:g}, steps={steps}, delta={delta:g}, "
            f"accountant={accountant!r}, {len(history)} prior segment(s))"
        )

    proxies: list[tuple[str, Callable[[float], float], float]] = []
    if accountant.strip().lower() != "rdp":
        proxies.append(("rdp", lambda s: _rdp_epsilon(segments(s), delta), math.log(1.02)))
        proxies.append(
            (
                "pld-coarse",
                lambda s: _pld_epsilon(segments(s), delta, _PLD_BRACKETING_DISCRETIZATION),
                log_tolerance,
            )
        )
    proxies.append((accountant, reported, log_tolerance))

    start, slope = 1.0, -1.0
    bracket: _Bracket | None = None
    for name, epsilon_of, stage_tolerance in proxies:
        bracket = _search(
            epsilon_of,
            target=target,
            start_sigma=start,
            slope=slope,
            tolerance=stage_tolerance,
            min_sigma=MIN_NOISE_MULTIPLIER,
            max_sigma=MAX_NOISE_MULTIPLIER,
        )
        _log.debug("calibration stage %s: %d evaluations, bracket %s", name, bracket.evaluations, bracket)
        if bracket.hi is not None and bracket.lo is not None:
            # Start the next stage just inside the bracket, on the side the next stage needs to confirm.
            start = math.sqrt(bracket.lo.sigma * bracket.hi.sigma)
        elif bracket.hi is not None:
            start = bracket.hi.sigma
        else:
            start = MAX_NOISE_MULTIPLIER
        slope = bracket.slope

    # The reporting accountant was verified to meet the target at the maximum, so hi is always set.
    if bracket is None or bracket.hi is None:
        raise CalibrationError(f"calibration failed to find a noise multiplier meeting {target:.6g}")
    sigma = bracket.hi.sigma
    achieved = reported(sigma)  # identical call (and cached value) to the search's evaluation
    if not achieved <= target:
        raise CalibrationError(
            f"internal error: calibrated noise_multiplier={sigma!r} gives epsilon={achieved!r} > {target!r}"
        )
    return sigma
