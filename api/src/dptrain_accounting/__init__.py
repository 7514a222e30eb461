"""Privacy accounting shared by the dptrain operator and trainer.

DP-SGD training is described as a sequence of :class:`MechanismSegment` (runs of Poisson-subsampled
Gaussian steps).  :func:`compute_epsilon` composes them with a registered accountant ("pld" by
default, tight; "prv", Microsoft's prv_accountant, nearly as tight; "rdp", looser), and
:func:`calibrate_noise_multiplier` finds the smallest noise that meets a target without ever
overshooting it.  "gdp" is refused: it can under-report epsilon.

Only the standard library, numpy, scipy and Google's ``dp_accounting`` are used (the latter lazily).
"""

from __future__ import annotations

from ._accountants import (
    PLD_DISCRETIZATION,
    PLD_SAFETY_MARGIN,
    PRV_EPS_ERROR,
    RDP_ORDERS,
    EpsilonFunction,
    available_accountants,
    compute_delta,
    compute_epsilon,
    get_accountant,
    register_accountant,
)
from ._calibration import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, calibrate_noise_multiplier
from ._errors import AccountingError, CalibrationError, UnsupportedAccountantError
from ._mechanism import NOISE_SAMPLER_RADIUS, MechanismSegment, compact, plan_steps, sampler_tail_mass
from ._plan import (
    MAX_PLANNED_STEPS,
    MechanismPlan,
    PlanError,
    partitioned_epsilon,
    plan_fixed_steps,
    plan_mechanism,
    training_set_size,
)

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MAX_PLANNED_STEPS",
    "MIN_NOISE_MULTIPLIER",
    "NOISE_SAMPLER_RADIUS",
    "PLD_DISCRETIZATION",
    "PLD_SAFETY_MARGIN",
    "PRV_EPS_ERROR",
    "RDP_ORDERS",
    "AccountingError",
    "CalibrationError",
    "EpsilonFunction",
    "MechanismPlan",
    "MechanismSegment",
    "PlanError",
    "UnsupportedAccountantError",
    "available_accountants",
    "calibrate_noise_multiplier",
    "compact",
    "compute_delta",
    "compute_epsilon",
    "get_accountant",
    "partitioned_epsilon",
    "plan_fixed_steps",
    "plan_mechanism",
    "plan_steps",
    "register_accountant",
    "sampler_tail_mass",
    "training_set_size",
]
