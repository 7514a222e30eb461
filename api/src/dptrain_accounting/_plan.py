"""The privacy plan of a training job, made by this one function for the operator (to reserve budget) and the
trainer (to run): training-set size, Poisson sample rate, step count, noise multiplier, and the noise of the
DP releases of held-out metrics.

Every record of a dataset is in exactly one of two partitions, decided by a keyed hash of the record alone:
the training partition (DP-SGD steps) or the holdout (evaluation releases). Adding or removing one record
changes one partition only, so the job is (max(ε_train, ε_holdout), δ)-DP: the two partitions compose in
parallel, and each partition's mechanisms compose sequentially.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ._accountants import compute_epsilon
from ._calibration import calibrate_noise_multiplier
from ._errors import AccountingError, CalibrationError
from ._mechanism import NOISE_SAMPLER_RADIUS, MechanismSegment, plan_steps, sampler_tail_mass

__all__ = [
    "MAX_PLANNED_STEPS",
    "MechanismPlan",
    "PlanError",
    "partitioned_epsilon",
    "plan_fixed_steps",
    "plan_mechanism",
    "training_set_size",
]

MAX_PLANNED_STEPS = 1_000_000
"""The most DP-SGD steps a job may plan; more is refused (raise batchSize or lower epochs). It bounds the
operator's planning and accounting work, and a million steps is far beyond any useful DP-SGD run."""


class PlanError(AccountingError, ValueError):
    """The job cannot be planned as written (its message says what to change)."""


def training_set_size(num_examples: int, eval_fraction: float) -> int:
    """Expected examples left for training after holding out ``num_examples * eval_fraction`` (rounded down).

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


def partitioned_epsilon(
    train: Sequence[MechanismSegment], holdout: Sequence[MechanismSegment], *, delta: float, accountant: str = "pld"
) -> float:
    """ε of a job (or a dataset's ledger) whose mechanisms touch either the training partition or the holdout:
    each partition composes sequentially, the two in parallel (one record is in one partition only)."""
    return max(
        compute_epsilon(train, delta=delta, accountant=accountant),
        compute_epsilon(holdout, delta=delta, accountant=accountant),
    )


@dataclass(frozen=True)
class MechanismPlan:
    """What a job will spend: ``steps`` Poisson-subsampled Gaussian steps at (σ, q) on the training partition, and
    ``releases`` Gaussian releases of held-out metrics at σ_holdout on the holdout; ε = max of the two."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    train_size: int
    """Expected training records, from the PUBLIC record count."""
    delta: float
    target_epsilon: float
    accountant: str
    epsilon: float
    """ε of the whole plan: max(train_epsilon, holdout_epsilon)."""
    train_epsilon: float
    holdout_noise_multiplier: float | None = None
    """σ of the held-out metric releases (noise std / L2 sensitivity); None without a holdout."""
    releases: int = 0
    """Number of DP releases of held-out metrics."""
    holdout_epsilon: float = 0.0

    @property
    def segment(self) -> MechanismSegment:
        """The DP-SGD steps (training partition)."""
        return MechanismSegment(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def holdout_segment(self) -> MechanismSegment | None:
        """The held-out metric releases (holdout partition): Gaussian mechanisms, i.e. sample rate 1."""
        if self.holdout_noise_multiplier is None or self.releases == 0:
            return None
        return MechanismSegment(self.holdout_noise_multiplier, 1.0, self.releases)


def _calibrate(*, target: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    try:
        return calibrate_noise_multiplier(
            target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
        )
    except CalibrationError as error:
        raise PlanError(
            f"cannot calibrate the noise for ε={target:g}, δ={delta:g}, q={sample_rate:.4g}, {steps} steps: {error}"
        ) from None


def _check_sampler_reach(sigma: float, steps: int, delta: float) -> None:
    """The noise sampler reaches ±13.2σC (NOISE_SAMPLER_RADIUS): with very little noise over many steps the chance of
    a neighbouring output beyond its reach would no longer be negligible next to δ (at most δ/1000 is allowed)."""
    missing = sampler_tail_mass(sigma, steps)
    if missing > delta / 1000:
        raise PlanError(
            f"σ={sigma:.3g} over {steps} steps is too little noise for the noise sampler's reach (±"
            f"{NOISE_SAMPLER_RADIUS:.1f}σ: an uncovered tail of up to {missing:.2g} next to δ={delta:g}); lower "
            "targetEpsilon, or plan fewer steps"
        )


def _check_sizes(*, num_examples: int, eval_fraction: float, train_size: int, batch_size: int, delta: float) -> None:
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
    eval_releases: int = 0,
    holdout_noise_multiplier: float | None = None,
) -> MechanismPlan:
    """Plan a job: q = batch / training examples, T = ceil(epochs / q), σ minimal with ε(σ, q, T, δ) ≤ target, and
    σ_holdout minimal with ε of ``eval_releases`` Gaussian releases ≤ target (none without a holdout).

    With a fixed ``noise_multiplier`` (or ``holdout_noise_multiplier``) the plan is refused when its ε would
    exceed the target.
    Cached: a pure function of public numbers, and calibration costs about a second.
    """
    train_size = training_set_size(num_examples, eval_fraction)
    _check_sizes(
        num_examples=num_examples,
        eval_fraction=eval_fraction,
        train_size=train_size,
        batch_size=batch_size,
        delta=delta,
    )
    sample_rate, steps = plan_steps(dataset_size=train_size, batch_size=batch_size, epochs=epochs)
    if steps > MAX_PLANNED_STEPS:
        raise PlanError(
            f"the plan needs {steps} steps (epochs {epochs:g} at q={sample_rate:.3g}), more than the maximum "
            f"{MAX_PLANNED_STEPS}; raise training.batchSize or lower training.epochs"
        )
    return _calibrated_plan(
        sample_rate=sample_rate,
        steps=steps,
        train_size=train_size,
        eval_fraction=eval_fraction,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        eval_releases=eval_releases,
        holdout_noise_multiplier=holdout_noise_multiplier,
    )


@functools.lru_cache(maxsize=1024)
def plan_fixed_steps(
    *,
    num_examples: int,
    eval_fraction: float,
    batch_size: int,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
    noise_multiplier: float | None = None,
    eval_releases: int = 0,
    holdout_noise_multiplier: float | None = None,
) -> MechanismPlan:
    """Plan exactly ``steps`` DP-SGD steps (a federated site: rounds × local steps) at q = batch / training examples,
    with σ and σ_holdout calibrated as :func:`plan_mechanism` does (same checks, same refusals)."""
    train_size = training_set_size(num_examples, eval_fraction)
    _check_sizes(
        num_examples=num_examples,
        eval_fraction=eval_fraction,
        train_size=train_size,
        batch_size=batch_size,
        delta=delta,
    )
    if not 1 <= steps <= MAX_PLANNED_STEPS:
        raise PlanError(f"the plan needs {steps} steps; a plan has between 1 and {MAX_PLANNED_STEPS}")
    return _calibrated_plan(
        sample_rate=batch_size / train_size,
        steps=steps,
        train_size=train_size,
        eval_fraction=eval_fraction,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        eval_releases=eval_releases,
        holdout_noise_multiplier=holdout_noise_multiplier,
    )


def _calibrated_plan(
    *,
    sample_rate: float,
    steps: int,
    train_size: int,
    eval_fraction: float,
    target_epsilon: float,
    delta: float,
    accountant: str,
    noise_multiplier: float | None,
    eval_releases: int,
    holdout_noise_multiplier: float | None,
) -> MechanismPlan:
    sigma = noise_multiplier
    if sigma is None:
        sigma = _calibrate(
            target=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
        )
    _check_sampler_reach(sigma, steps, delta)
    train_epsilon = compute_epsilon([MechanismSegment(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    if train_epsilon > target_epsilon:
        raise PlanError(
            f"privacy.noiseMultiplier={sigma:g} gives ε={train_epsilon:.4f} after {steps} steps (q={sample_rate:.4g}, "
            f"δ={delta:g}, {accountant}), above targetEpsilon={target_epsilon:g}: raise noiseMultiplier, lower "
            "epochs, or leave noiseMultiplier unset to calibrate it"
        )
    releases = eval_releases if eval_fraction > 0.0 else 0
    holdout_sigma: float | None = None
    holdout_epsilon = 0.0
    if releases > 0:
        holdout_sigma = holdout_noise_multiplier or _calibrate(
            target=target_epsilon, delta=delta, sample_rate=1.0, steps=releases, accountant=accountant
        )
        _check_sampler_reach(holdout_sigma, releases, delta)
        holdout_epsilon = compute_epsilon(
            [MechanismSegment(holdout_sigma, 1.0, releases)], delta=delta, accountant=accountant
        )
        if holdout_epsilon > target_epsilon:
            raise PlanError(
                f"the held-out metric releases (σ={holdout_sigma:g}, {releases} releases) give "
                f"ε={holdout_epsilon:.4f}, above targetEpsilon={target_epsilon:g}"
            )
    return MechanismPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        train_size=train_size,
        delta=delta,
        target_epsilon=target_epsilon,
        accountant=accountant,
        epsilon=max(train_epsilon, holdout_epsilon),
        train_epsilon=train_epsilon,
        holdout_noise_multiplier=holdout_sigma,
        releases=releases,
        holdout_epsilon=holdout_epsilon,
    )
