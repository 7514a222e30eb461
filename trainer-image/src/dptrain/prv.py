"""Opacus' PRV accountant (Gopi et al. 2021), registered as accountant "prv" in dptrain_accounting.

Importing this module registers it (idempotently). The value returned is Opacus' ``eps_upper``: the
upper end of the PRV error bracket, so a valid upper bound on ε, never the point estimate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from dptrain_accounting import MechanismSegment, available_accountants, compact, register_accountant

__all__ = ["PRV_EPS_ERROR", "prv_epsilon", "register"]

PRV_EPS_ERROR = 0.01
"""Opacus' ``eps_error``: width of the ε error bracket; the upper end is reported."""


def prv_epsilon(segments: Sequence[MechanismSegment], delta: float) -> float:
    """ε(δ) of the composed segments by Opacus' PRVAccountant (upper bound of its error bracket)."""
    from opacus.accountants import PRVAccountant

    history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in compact(segments)]
    if not history:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        # Opacus sizes the PRV domain with RDP and warns when its alpha grid is too small for that
        # (a looser domain bound, not a wrong ε).
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def register() -> None:
    """Register "prv" unless it already is (safe to call any number of times, from any thread)."""
    if "prv" in available_accountants():
        return
    try:
        register_accountant("prv", prv_epsilon)
    except ValueError:  # another thread registered it between the check and the call
        if "prv" not in available_accountants():
            raise


register()
