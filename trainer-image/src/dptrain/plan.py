"""The privacy plan: noise multiplier σ, Poisson sample rate q and step count T, fixed before training.

Everything here is a function of PUBLIC numbers (the job spec and the dataset's size), so the plan
itself leaks nothing. The plan's ε is what the job will have spent if it runs uninterrupted; the
engine never charges more steps than ``steps``, so it is also the most the job can ever spend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dptrain import prv
from dptrain.data import train_size as compute_train_size
from dptrain.errors import ConfigurationError, PlanMismatchError
from dptrain_accounting import (
    AccountingError,
    MechanismSegment,
    calibrate_noise_multiplier,
    compute_epsilon,
    plan_steps,
)
from dptrain_api.job import DPTrainingJob

__all__ = [
    "RESERVED_MECHANISM_ENV",
    "SAMPLE_RATE_TOLERANCE",
    "TrainingPlan",
    "make_plan",
    "reserved_from_env",
]

prv.register()

RESERVED_MECHANISM_ENV = "DPTRAIN_RESERVED_MECHANISM"
"""Env var through which the operator hands over the mechanism it reserved in the dataset ledger."""

SAMPLE_RATE_TOLERANCE = 1e-9
"""Largest relative difference between the reserved and the actual sample rate that is accepted."""

_CALIBRATION_RETRIES = 20


@dataclass(frozen=True)
class TrainingPlan:
    """What will run: ``steps`` DP-SGD steps with Poisson rate ``sample_rate`` and noise ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float
    accountant: str
    max_grad_norm: float
    batch_size: int
    physical_batch_size: int
    train_size: int
    eval_size: int
    planned_epsilon: float
    reserved: bool = False
    """True when σ and the step ceiling came from the operator's ledger reservation."""

    @property
    def segment(self) -> MechanismSegment:
        """The whole plan as one mechanism segment."""
        return MechanismSegment(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def epochs(self) -> float:
        """Expected passes over the training set."""
        return self.steps * self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        """camelCase JSON-ready form (stored in checkpoints, reports and the termination message)."""
        names = {
            "noise_multiplier": "noiseMultiplier",
            "sample_rate": "sampleRate",
            "steps": "steps",
            "delta": "delta",
            "target_epsilon": "targetEpsilon",
            "accountant": "accountant",
            "max_grad_norm": "maxGradNorm",
            "batch_size": "batchSize",
            "physical_batch_size": "physicalBatchSize",
            "train_size": "trainSize",
            "eval_size": "evalSize",
            "planned_epsilon": "plannedEpsilon",
            "reserved": "reserved",
        }
        return {names[key]: value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(
            noise_multiplier=float(d["noiseMultiplier"]),
            sample_rate=float(d["sampleRate"]),
            steps=int(d["steps"]),
            delta=float(d["delta"]),
            target_epsilon=float(d["targetEpsilon"]),
            accountant=str(d["accountant"]),
            max_grad_norm=float(d["maxGradNorm"]),
            batch_size=int(d["batchSize"]),
            physical_batch_size=int(d["physicalBatchSize"]),
            train_size=int(d["trainSize"]),
            eval_size=int(d["evalSize"]),
            planned_epsilon=float(d["plannedEpsilon"]),
            reserved=bool(d.get("reserved", False)),
        )

    def mechanism_key(self) -> dict[str, Any]:
        """The fields that define the privacy mechanism: a resumed run must match them exactly."""
        return {
            "noiseMultiplier": self.noise_multiplier,
            "sampleRate": self.sample_rate,
            "steps": self.steps,
            "delta": self.delta,
            "accountant": self.accountant,
            "maxGradNorm": self.max_grad_norm,
            "batchSize": self.batch_size,
            "trainSize": self.train_size,
        }


def reserved_from_env(environ: Mapping[str, str] | None = None) -> MechanismSegment | None:
    """The reserved mechanism from ``DPTRAIN_RESERVED_MECHANISM`` (JSON {noiseMultiplier, sampleRate, steps})."""
    env = os.environ if environ is None else environ
    text = env.get(RESERVED_MECHANISM_ENV, "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
        if not isinstance(value, Mapping):
            raise ValueError("expected a JSON object")
        return MechanismSegment.from_dict(value)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(
            f"{RESERVED_MECHANISM_ENV} must be JSON {{noiseMultiplier, sampleRate, steps}}: {error}"
        ) from None


def _epsilon(segment: MechanismSegment, *, delta: float, accountant: str) -> float:
    try:
        return compute_epsilon([segment], delta=delta, accountant=accountant)
    except (AccountingError, ValueError) as error:
        raise ConfigurationError(f"cannot account for the plan with accountant {accountant!r}: {error}") from None


def make_plan(job: DPTrainingJob, *, num_examples: int, reserved: MechanismSegment | None = None) -> TrainingPlan:
    """The plan for ``job`` on a dataset of ``num_examples`` (public) records.

    With ``reserved`` (the mechanism the operator reserved in the dataset ledger), σ is the
    reserved one and the data must give the reserved sample rate and at most the reserved steps;
    otherwise :class:`PlanMismatchError` is raised before anything is charged.
    """
    privacy = job.spec.privacy
    training = job.spec.training
    accountant = privacy.accountant.value
    delta = privacy.delta
    target = privacy.target_epsilon

    n_train = compute_train_size(num_examples, training.eval_fraction)
    if delta >= 1.0 / n_train:
        raise ConfigurationError(
            f"privacy.delta={delta:g} must be below 1/(training examples) = 1/{n_train} = {1.0 / n_train:.3g}: "
            "a larger δ allows releasing some records outright; lower delta"
        )
    if training.batch_size > n_train:
        raise ConfigurationError(
            f"training.batchSize={training.batch_size} exceeds the {n_train} training examples "
            f"({num_examples} records minus the evalFraction={training.eval_fraction:g} held out); lower batchSize"
        )
    sample_rate, steps = plan_steps(dataset_size=n_train, batch_size=training.batch_size, epochs=training.epochs)

    if reserved is not None:
        relative = abs(sample_rate - reserved.sample_rate) / reserved.sample_rate
        if relative > SAMPLE_RATE_TOLERANCE:
            raise PlanMismatchError(
                f"the data gives sample rate q={sample_rate:.12g} (batchSize {training.batch_size} / {n_train} "
                f"training examples) but the operator reserved q={reserved.sample_rate:.12g}; refusing to train "
                "(nothing was charged)"
            )
        if steps > reserved.steps:
            raise PlanMismatchError(
                f"the plan needs {steps} steps but only {reserved.steps} were reserved; refusing to train "
                "(nothing was charged)"
            )
        sigma = reserved.noise_multiplier
        # The reserved sample rate is the one charged to the ledger; it equals the data's up to 1e-9.
        planned = _epsilon(MechanismSegment(sigma, sample_rate, steps), delta=delta, accountant=accountant)
        if planned > target:
            raise PlanMismatchError(
                f"the reserved mechanism (σ={sigma:.6g}, q={sample_rate:.6g}, {steps} steps) gives ε={planned:.4f} "
                f"with accountant {accountant}, above targetEpsilon={target:g}; refusing to train (nothing was charged)"
            )
    elif privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
        planned = _epsilon(MechanismSegment(sigma, sample_rate, steps), delta=delta, accountant=accountant)
        if planned > target:
            raise ConfigurationError(
                f"privacy.noiseMultiplier={sigma:g} gives ε={planned:.4f} after {steps} steps (q={sample_rate:.4g}, "
                f"δ={delta:g}, {accountant}), above targetEpsilon={target:g}: raise noiseMultiplier, lower epochs, "
                "or leave noiseMultiplier unset to calibrate it"
            )
    else:
        try:
            sigma = calibrate_noise_multiplier(
                target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
            )
        except (AccountingError, ValueError) as error:
            raise ConfigurationError(
                f"cannot calibrate the noise for ε={target:g}, δ={delta:g}, q={sample_rate:.4g}, {steps} steps: {error}"
            ) from None
        planned = _epsilon(MechanismSegment(sigma, sample_rate, steps), delta=delta, accountant=accountant)
        # Defence in depth: the calibrator promises ε <= target; never trust a float boundary blindly.
        for _ in range(_CALIBRATION_RETRIES):
            if planned <= target:
                break
            sigma = math.nextafter(sigma * (1.0 + 1e-4), math.inf)
            planned = _epsilon(MechanismSegment(sigma, sample_rate, steps), delta=delta, accountant=accountant)
        if planned > target:
            raise ConfigurationError(
                f"calibration returned σ={sigma:.6g} with ε={planned:.4f} above targetEpsilon={target:g}"
            )

    return TrainingPlan(
        noise_multiplier=float(sigma),
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        target_epsilon=target,
        accountant=accountant,
        max_grad_norm=privacy.max_grad_norm,
        batch_size=training.batch_size,
        physical_batch_size=training.physical_batch_size,
        train_size=n_train,
        eval_size=num_examples - n_train,
        planned_epsilon=planned,
        reserved=reserved is not None,
    )
