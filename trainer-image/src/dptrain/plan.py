"""The privacy plan: noise multiplier σ, Poisson sample rate q and step count T, fixed before training.

The plan is made by ``dptrain_accounting.plan_mechanism`` from PUBLIC numbers only (the job spec and
the dataset's declared size), exactly as the operator makes it to reserve budget; this module adds
what only the trainer needs (batch sizes, the clipping norm) and the one check only the trainer can
make: that it runs what the operator reserved. The plan's ε is what the job will have spent if it
runs uninterrupted; the engine never charges more steps than ``steps``, so it is also the most the
job can ever spend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from dptrain import prv
from dptrain.errors import ConfigurationError, PlanMismatchError
from dptrain_accounting import AccountingError, MechanismPlan, MechanismSegment, plan_mechanism
from dptrain_api import DPTrainingJob, Mechanism, PodEnv, PrivateDataset, plan_inputs

__all__ = ["SAMPLE_RATE_TOLERANCE", "TrainingPlan", "make_plan", "reserved_from_env"]

prv.register()

SAMPLE_RATE_TOLERANCE = 1e-9
"""Largest relative difference between the reserved and the actual sample rate that is accepted."""


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
        """camelCase JSON-ready form (stored in checkpoints and reports)."""
        return {_camel(key): value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingPlan:
        """Inverse of :meth:`to_dict`."""
        fields = cls.__dataclass_fields__
        return cls(**{name: d[_camel(name)] for name in fields if _camel(name) in d})

    def mechanism_key(self) -> dict[str, Any]:
        """The fields that define the privacy mechanism: a resumed run must match them exactly."""
        keys = ("noise_multiplier", "sample_rate", "steps", "delta", "accountant", "max_grad_norm", "batch_size")
        key = {_camel(name): getattr(self, name) for name in keys}
        key["trainSize"] = self.train_size
        return key


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def reserved_from_env(environ: Mapping[str, str] | None = None) -> MechanismSegment | None:
    """The reserved mechanism from ``DPTRAIN_RESERVED_MECHANISM`` (JSON {noiseMultiplier, sampleRate, steps})."""
    env = os.environ if environ is None else environ
    text = env.get(PodEnv.RESERVED_MECHANISM, "").strip()
    if not text:
        return None
    try:
        mechanism = Mechanism.model_validate_json(text)
        return MechanismSegment(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)
    except (ValidationError, ValueError) as error:
        raise ConfigurationError(
            f"{PodEnv.RESERVED_MECHANISM} must be JSON {{noiseMultiplier, sampleRate, steps}}: {error}"
        ) from None


def _check_reserved(mechanism: MechanismPlan, reserved: MechanismSegment, batch_size: int) -> None:
    relative = abs(mechanism.sample_rate - reserved.sample_rate) / reserved.sample_rate
    if relative > SAMPLE_RATE_TOLERANCE:
        raise PlanMismatchError(
            f"the data gives sample rate q={mechanism.sample_rate:.12g} (batchSize {batch_size} / "
            f"{mechanism.train_size} training examples) but the operator reserved q={reserved.sample_rate:.12g}; "
            "refusing to train (nothing was charged)"
        )
    if mechanism.steps > reserved.steps:
        raise PlanMismatchError(
            f"the plan needs {mechanism.steps} steps but only {reserved.steps} were reserved; refusing to train "
            "(nothing was charged)"
        )


def make_plan(
    job: DPTrainingJob,
    *,
    num_examples: int,
    reserved: MechanismSegment | None = None,
    dataset: PrivateDataset | None = None,
) -> TrainingPlan:
    """The plan for ``job`` on a dataset of ``num_examples`` (public) records.

    With ``reserved`` (the mechanism the operator reserved in the dataset ledger), σ is the reserved
    one and the data must give the reserved sample rate and at most the reserved steps; otherwise
    :class:`PlanMismatchError` is raised before anything is charged.
    """
    inputs = plan_inputs(job, dataset, num_examples=num_examples)
    if reserved is not None:
        inputs = type(inputs)(**{**inputs.as_kwargs(), "noise_multiplier": reserved.noise_multiplier})
    try:
        mechanism = plan_mechanism(**inputs.as_kwargs())
    except (AccountingError, ValueError) as error:
        kind = PlanMismatchError if reserved is not None else ConfigurationError
        raise kind(f"{error}{'; refusing to train (nothing was charged)' if reserved is not None else ''}") from None
    training = job.spec.training
    if reserved is not None:
        _check_reserved(mechanism, reserved, training.batch_size)
    return TrainingPlan(
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=mechanism.steps,
        delta=mechanism.delta,
        target_epsilon=mechanism.target_epsilon,
        accountant=mechanism.accountant,
        max_grad_norm=job.spec.privacy.max_grad_norm,
        batch_size=training.batch_size,
        physical_batch_size=training.physical_batch_size,
        train_size=mechanism.train_size,
        eval_size=num_examples - mechanism.train_size,
        planned_epsilon=mechanism.epsilon,
        reserved=reserved is not None,
    )
