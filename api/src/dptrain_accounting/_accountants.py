"""Accountant registry and the epsilon/delta computations (PLD and RDP via Google's ``dp_accounting``).

``dp_accounting`` is imported lazily, so :class:`~dptrain_accounting.MechanismSegment` and the
registry stay importable without the ``[accounting]`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._errors import AccountingError, UnsupportedAccountantError
from ._mechanism import MechanismSegment, compact

__all__ = [
    "PLD_DISCRETIZATION",
    "PLD_SAFETY_MARGIN",
    "PRV_EPS_ERROR",
    "RDP_ORDERS",
    "EpsilonFunction",
    "available_accountants",
    "compute_delta",
    "compute_epsilon",
    "get_accountant",
    "register_accountant",
]

EpsilonFunction = Callable[[Sequence[MechanismSegment], float], float]
"""``fn(segments, delta) -> epsilon``: an (ε, δ) accountant for composed subsampled Gaussian steps."""

PLD_DISCRETIZATION: float = 1e-4
"""Value discretization interval of the reported PLD epsilon (pessimistic rounding: a valid upper bound)."""

PLD_SAFETY_MARGIN: tuple[float, float] = (1e-5, 1e-5)
"""(absolute, relative) margin added to every PLD epsilon. Pessimistic discretization is not monotone in the
interval: at 1e-4 it can print an epsilon a few 1e-6 BELOW the one a finer pessimistic discretization proves
(seen at ε ≈ 8 over thousands of steps), so the reported value is raised by this much more than that gap."""

PRV_EPS_ERROR: float = 0.01
"""``eps_error`` of the PRV accountant: the width of its error bracket; the upper end is reported."""

_PLD_BRACKETING_DISCRETIZATION: float = 1e-3  # ~10x cheaper; only ever used to bracket a calibration

RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.0 + x / 10.0 for x in range(1, 100)}
        | {float(x) for x in range(11, 64)}
        | {float(x) for x in (64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)}
        | {float(x) for x in (640, 768, 1024, 1536, 2048, 3072, 4096)}
    )
)
"""RDP orders: ``dp_accounting``'s default grid (1.1 ... 63, 128 ... 1024) densified above 64 and
extended to 4096 for very small epsilons."""


class _DropRdpConvergenceWarnings(logging.Filter):
    """Drops dp_accounting's "_compute_log_a_frac failed to converge" warnings.

    They are benign (the order is excluded from the minimum, which keeps the bound valid) but a
    calibration would log dozens of them for large sample rates.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


_rdp_filter = _DropRdpConvergenceWarnings()
_rdp_filter_users = 0
_rdp_filter_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_rdp_convergence_warnings() -> Iterator[None]:
    global _rdp_filter_users  # noqa: PLW0603 -- a reference count shared by threads
    absl_logger = logging.getLogger("absl")
    with _rdp_filter_lock:
        if _rdp_filter_users == 0:
            absl_logger.addFilter(_rdp_filter)
        _rdp_filter_users += 1
    try:
        yield
    finally:
        with _rdp_filter_lock:
            _rdp_filter_users -= 1
            if _rdp_filter_users == 0:
                absl_logger.removeFilter(_rdp_filter)


_REFUSED: dict[str, str] = {
    "gdp": (
        "the 'gdp' accountant (Gaussian DP via the central limit theorem, as in Opacus) is refused: "
        "it is an approximation that can under-report epsilon, so its result is not a valid privacy "
        "guarantee"
    ),
}

_registry: dict[str, EpsilonFunction] = {}
_registry_lock = threading.Lock()


def _normalise_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UnsupportedAccountantError(f"accountant name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def register_accountant(name: str, fn: EpsilonFunction, *, replace: bool = False) -> None:
    """Register ``fn`` as accountant ``name`` (case-insensitive).

    Raises ``ValueError`` when the name is taken and ``replace`` is false, and
    :class:`UnsupportedAccountantError` for a refused name such as ``"gdp"``.
    """
    key = _normalise_name(name)
    if key in _REFUSED:
        raise UnsupportedAccountantError(f"{_REFUSED[key]}; it cannot be registered")
    if not callable(fn):
        raise TypeError(f"accountant {key!r} must be callable, got {type(fn).__name__}")
    with _registry_lock:
        if key in _registry and not replace:
            raise ValueError(f"accountant {key!r} is already registered (pass replace=True to override)")
        _registry[key] = fn


def available_accountants() -> tuple[str, ...]:
    """Names of the registered accountants, sorted."""
    with _registry_lock:
        return tuple(sorted(_registry))


def get_accountant(name: str) -> EpsilonFunction:
    """The epsilon function registered as ``name``; :class:`UnsupportedAccountantError` otherwise."""
    key = _normalise_name(name)
    supported = ", ".join(available_accountants())
    if key in _REFUSED:
        raise UnsupportedAccountantError(f"{_REFUSED[key]}; supported accountants: {supported}")
    with _registry_lock:
        fn = _registry.get(key)
    if fn is None:
        raise UnsupportedAccountantError(f"unknown accountant {name!r}; supported accountants: {supported}")
    return fn


def _validate_segments(segments: Sequence[MechanismSegment]) -> tuple[MechanismSegment, ...]:
    if isinstance(segments, MechanismSegment):
        raise TypeError("segments must be a sequence of MechanismSegment, not a single segment")
    return tuple(compact(segments))


def _validate_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _dp_event(segments: Sequence[MechanismSegment]) -> Any:
    from dp_accounting import dp_event

    events = [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(s.sample_rate, dp_event.GaussianDpEvent(s.noise_multiplier)),
            s.steps,
        )
        for s in segments
    ]
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)


def _pld_accountant(segments: Sequence[MechanismSegment], discretization: float) -> Any:
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(_dp_event(segments))
    return accountant


def _pld_epsilon(
    segments: Sequence[MechanismSegment], delta: float, discretization: float = PLD_DISCRETIZATION
) -> float:
    segments = compact(segments)
    if not segments:
        return 0.0
    return float(_pld_accountant(segments, discretization).get_epsilon(delta))


def _rdp_epsilon(segments: Sequence[MechanismSegment], delta: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    segments = compact(segments)
    if not segments:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    with _quiet_rdp_convergence_warnings():
        accountant.compose(_dp_event(segments))
    return float(accountant.get_epsilon(delta))


def with_pld_margin(epsilon: float) -> float:
    """``epsilon`` raised by :data:`PLD_SAFETY_MARGIN` (0 stays 0: nothing ran)."""
    absolute, relative = PLD_SAFETY_MARGIN
    return epsilon + absolute + relative * epsilon if epsilon > 0.0 else 0.0


def pld_epsilon(segments: Sequence[MechanismSegment], delta: float) -> float:
    """Privacy Loss Distribution accountant (tight; pessimistic discretization ``PLD_DISCRETIZATION``, plus
    :data:`PLD_SAFETY_MARGIN`)."""
    return with_pld_margin(_pld_epsilon(segments, delta, PLD_DISCRETIZATION))


def prv_epsilon(segments: Sequence[MechanismSegment], delta: float) -> float:
    """Privacy Random Variable accountant (Gopi, Lee & Wutschitz 2021, their ``prv_accountant`` package): the
    upper end of its error bracket, so a valid upper bound, never the point estimate."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    segments = compact(segments)
    if not segments:
        return 0.0
    accountant = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(s.sample_rate, s.noise_multiplier) for s in segments],
        max_self_compositions=[s.steps for s in segments],
        eps_error=PRV_EPS_ERROR,
        delta_error=delta / 1000.0,
    )
    _, _, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[s.steps for s in segments])
    return float(upper)


def rdp_epsilon(segments: Sequence[MechanismSegment], delta: float) -> float:
    """Rényi DP accountant over :data:`RDP_ORDERS` (valid but looser than PLD)."""
    return _rdp_epsilon(segments, delta)


register_accountant("pld", pld_epsilon)
register_accountant("prv", prv_epsilon)
register_accountant("rdp", rdp_epsilon)


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(fn: EpsilonFunction, segments: tuple[MechanismSegment, ...], delta: float) -> float:
    epsilon = float(fn(segments, delta))
    if math.isnan(epsilon) or epsilon < 0.0:
        raise AccountingError(f"accountant returned an invalid epsilon {epsilon!r}")
    return epsilon


@functools.lru_cache(maxsize=1024)
def _cached_delta(segments: tuple[MechanismSegment, ...], epsilon: float) -> float:
    return float(_pld_accountant(segments, PLD_DISCRETIZATION).get_delta(epsilon))


def compute_epsilon(segments: Sequence[MechanismSegment], *, delta: float, accountant: str = "pld") -> float:
    """Epsilon of the composition of ``segments`` at ``delta`` under the named accountant.

    Segments are compacted first (the cache key is the compacted tuple), so repeated questions
    about the same history are answered from an LRU cache.  Returns ``0.0`` when there are no steps.
    """
    delta = _validate_delta(delta)
    fn = get_accountant(accountant)
    key = _validate_segments(segments)
    if not key:
        return 0.0
    return _cached_epsilon(fn, key, delta)


def compute_delta(segments: Sequence[MechanismSegment], *, epsilon: float) -> float:
    """Delta of the composition of ``segments`` at ``epsilon``, via PLD (``PLD_DISCRETIZATION``)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= float(epsilon) < math.inf:
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    key = _validate_segments(segments)
    if not key:
        return 0.0
    return _cached_delta(key, float(epsilon))
