"""The privacy plan of a training job, computed identically by the operator (to reserve budget) and
the trainer (to run): training-set size, Poisson sample rate, step count and noise multiplier."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ._accountants import compute_epsilon
from ._calibration import calibrate_noise_multiplier
from ._errors import AccountingError, CalibrationError
from ._mechanism import MechanismSegment, plan_steps

__all__ = ["MechanismPlan", "PlanError", "plan_mechanism", "training_set_size"]


class PlanError(AccountingError, ValueError):
    """The job cannot be planned as written (its message says what to change)."""


def training_set_size(num_examples: int, eval_fraction: float) -> int:
    """Examples left for training after holding out ``floor(num_examples * eval_fraction)`` for evaluation.

    A pure function of public numbers: the sample rate (hence ε) must not depend on the data.
    """
    if num_examples <= 0:
        raise PlanError(f"the dataset must have at least one example, got {num_examples}")
    if not 0.0 <= eval_fraction < 1.0:
        raise PlanError(f"evalFraction must be in [0, 1), got {eval_fraction}")
    # A product within floating-point noise of an integer counts as that integer (100 * 0.29 = 29).
    exact = num_examples * eval_fraction
    nearest = round(exact)
    held_out = nearest if abs(exact - nearest) <= 1e-9 * max(1.0, exact) else math.floor(exact)
    remaining = num_examples - held_out
    if remaining < 1:
        raise PlanError(f"evalFraction {eval_fraction} leaves no training examples of {num_examples}; lower it")
    return remaining


@dataclass(frozen=True)
class MechanismPlan:
    """What a job will spend: ``steps`` Poisson-subsampled Gaussian steps at (σ, q), and its ε at δ."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    train_size: int
    delta: float
    target_epsilon: float
    accountant: str
    epsilon: float

    @property
    def segment(self) -> MechanismSegment:
        return MechanismSegment(self.noise_multiplier, self.sample_rate, self.steps)


@functools.lru_cache(maxsize=1024)
def plan_mechanism(
    *,
    num_examples: int,
    eval_fraction: float,
    batch_size: int,
    epochs: float,
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
    noise_multiplier: float | None = None,
) -> MechanismPlan:
    """Plan a job: q = batch / training examples, T = ceil(epochs / q), σ minimal with ε(σ, q, T, δ) ≤ target.

    With a fixed ``noise_multiplier`` the plan is refused when its ε would exceed the target.
    Cached: a pure function of public numbers, and calibration costs about a second.
    """
    train_size = training_set_size(num_examples, eval_fraction)
    if delta >= 1.0 / train_size:
        raise PlanError(
            f"privacy.delta={delta:g} must be below 1/(training examples) = 1/{train_size} = {1.0 / train_size:.3g}: "
            "a larger δ allows releasing some records outright; lower privacy.delta"
        )
    if batch_size > train_size:
        raise PlanError(
            f"training.batchSize={batch_size} exceeds the {train_size} training examples ({num_examples} records "
            f"minus the evalFraction={eval_fraction:g} held out); lower training.batchSize"
        )
    sample_rate, steps = plan_steps(dataset_size=train_size, batch_size=batch_size, epochs=epochs)
    if noise_multiplier is None:
        try:
            sigma = calibrate_noise_multiplier(
                target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
            )
        except CalibrationError as error:
            raise PlanError(
                f"cannot calibrate the noise for ε={target_epsilon:g}, δ={delta:g}, q={sample_rate:.4g}, "
                f"{steps} steps: {error}"
            ) from None
    else:
        sigma = noise_multiplier
    epsilon = compute_epsilon([MechanismSegment(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    if epsilon > target_epsilon:
        raise PlanError(
            f"privacy.noiseMultiplier={sigma:g} gives ε={epsilon:.4f} after {steps} steps (q={sample_rate:.4g}, "
            f"δ={delta:g}, {accountant}), above targetEpsilon={target_epsilon:g}: raise noiseMultiplier, lower "
            "epochs, or leave noiseMultiplier unset to calibrate it"
        )
    return MechanismPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        train_size=train_size,
        delta=delta,
        target_epsilon=target_epsilon,
        accountant=accountant,
        epsilon=epsilon,
    )
