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

from dptrain.errors import ConfigurationError, PlanMismatchError
from dptrain_accounting import AccountingError, MechanismPlan, MechanismSegment, plan_mechanism
from dptrain_api import DPTrainingJob, PodEnv, PrivateDataset, ReservedMechanisms, plan_inputs

__all__ = ["SAMPLE_RATE_TOLERANCE", "TrainingPlan", "make_plan", "reserved_from_env"]

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
    """Expected training records, from the public declared size (the true count is never used)."""
    eval_size: int
    """Expected held-out records, from the public declared size."""
    planned_epsilon: float
    """ε of the whole plan: max over the training partition and the holdout (parallel composition)."""
    holdout_fraction: float = 0.0
    """Share of the records held out (by a keyed hash of each record)."""
    holdout_noise_multiplier: float | None = None
    """σ of the DP releases of held-out metrics (noise std / their L2 sensitivity)."""
    releases: int = 0
    """Planned DP releases of held-out metrics."""
    reserved: bool = False
    """True when σ and the step ceiling came from the operator's ledger reservation."""
    unit_records: int = 0
    """k, the most records of one privacy unit (patient) that count, when the dataset declares a privacyUnit; 0: the
    unit is the record. Sizes, q and the batch size then count units."""
    unit_column: str = ""
    """The privacyUnit's column (public: a column name), when the unit is not the record."""

    @property
    def unit(self) -> str:
        """The privacy unit in words: "record", or "individual (patient_id, ≤4 records)"."""
        return f"individual ({self.unit_column}, ≤{self.unit_records} records)" if self.unit_records else "record"

    def __post_init__(self) -> None:
        if self.unit_records > self.physical_batch_size:
            raise ConfigurationError(
                f"a privacy unit may bring {self.unit_records} records (privacyUnit.maxRecordsPerUnit), more than "
                f"training.maxPhysicalBatchSize={self.physical_batch_size}: a unit is never split across "
                "micro-batches; raise maxPhysicalBatchSize"
            )

    @property
    def segment(self) -> MechanismSegment:
        """The DP-SGD steps of the plan (training partition) as one mechanism segment."""
        return MechanismSegment(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def holdout_segment(self) -> MechanismSegment | None:
        """The planned releases of held-out metrics (holdout partition: Gaussian, sample rate 1)."""
        if self.holdout_noise_multiplier is None or self.releases == 0:
            return None
        return MechanismSegment(self.holdout_noise_multiplier, 1.0, self.releases)

    def mechanisms(self) -> dict[str, MechanismSegment]:
        """Partition → the most it may ever be charged (the journal's header)."""
        mechanisms = {"train": self.segment}
        if self.holdout_segment is not None:
            mechanisms["holdout"] = self.holdout_segment
        return mechanisms

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
        keys = (
            "noise_multiplier",
            "sample_rate",
            "steps",
            "delta",
            "accountant",
            "max_grad_norm",
            "batch_size",
            "holdout_fraction",
            "holdout_noise_multiplier",
            "releases",
            "unit_records",
        )
        key = {_camel(name): getattr(self, name) for name in keys}
        key["trainSize"] = self.train_size
        return key


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def reserved_from_env(environ: Mapping[str, str] | None = None) -> ReservedMechanisms | None:
    """What the operator reserved, from ``DPTRAIN_RESERVED_MECHANISM`` (JSON :class:`ReservedMechanisms`)."""
    env = os.environ if environ is None else environ
    text = env.get(PodEnv.RESERVED_MECHANISM, "").strip()
    if not text:
        return None
    try:
        return ReservedMechanisms.model_validate_json(text)
    except (ValidationError, ValueError) as error:
        raise ConfigurationError(
            f"{PodEnv.RESERVED_MECHANISM} must be JSON {{train: {{noiseMultiplier, sampleRate, steps}}, holdout}}: "
            f"{error}"
        ) from None


def _check_reserved(plan: MechanismPlan, reserved: ReservedMechanisms, batch_size: int) -> None:
    relative = abs(plan.sample_rate - reserved.train.sample_rate) / reserved.train.sample_rate
    if relative > SAMPLE_RATE_TOLERANCE:
        raise PlanMismatchError(
            f"the plan gives sample rate q={plan.sample_rate:.12g} (batchSize {batch_size} / "
            f"{plan.train_size} training examples) but the operator reserved q={reserved.train.sample_rate:.12g}; "
            "refusing to train (nothing was charged)"
        )
    if plan.steps > reserved.train.steps:
        raise PlanMismatchError(
            f"the plan needs {plan.steps} steps but only {reserved.train.steps} were reserved; refusing to train "
            "(nothing was charged)"
        )
    holdout = plan.holdout_segment
    reserved_holdout = reserved.holdout
    if holdout is not None and (reserved_holdout is None or holdout.steps > reserved_holdout.steps):
        raise PlanMismatchError(
            f"the plan releases held-out metrics {holdout.steps} times at σ={holdout.noise_multiplier:.6g}, which the "
            f"operator did not reserve ({reserved_holdout}); refusing to train (nothing was charged)"
        )


def make_plan(
    job: DPTrainingJob,
    *,
    num_examples: int | None = None,
    reserved: ReservedMechanisms | None = None,
    dataset: PrivateDataset | None = None,
) -> TrainingPlan:
    """The plan for ``job`` on ``dataset`` from its PUBLIC declared size (``num_examples`` overrides it).

    With ``reserved`` (what the operator reserved in the dataset ledger), σ is the reserved one and the plan
    must give the reserved sample rate and at most the reserved steps and releases; otherwise
    :class:`PlanMismatchError` is raised before anything is charged.
    """
    try:
        inputs = plan_inputs(job, dataset, num_examples=num_examples)
        kwargs = inputs.as_kwargs()
        if reserved is not None:
            kwargs["noise_multiplier"] = reserved.train.noise_multiplier
            if reserved.holdout is not None:
                kwargs["holdout_noise_multiplier"] = reserved.holdout.noise_multiplier
        mechanism = plan_mechanism(**kwargs)
    except (AccountingError, ValueError) as error:
        if reserved is not None:
            raise PlanMismatchError(f"{error}; refusing to train (nothing was charged)") from None
        raise ConfigurationError(str(error)) from None
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
        eval_size=inputs.num_examples - mechanism.train_size,
        planned_epsilon=mechanism.epsilon,
        holdout_fraction=inputs.eval_fraction,
        holdout_noise_multiplier=mechanism.holdout_noise_multiplier,
        releases=mechanism.releases,
        reserved=reserved is not None,
        unit_records=unit_records(dataset),
        unit_column=unit_column(dataset),
    )


def unit_column(dataset: PrivateDataset | None) -> str:
    """The dataset's privacyUnit column ("": the unit is the record)."""
    unit = dataset.spec.privacy_unit if dataset is not None else None
    return unit.column if unit is not None else ""


def unit_records(dataset: PrivateDataset | None) -> int:
    """k of the dataset's privacyUnit (0: the unit is the record)."""
    unit = dataset.spec.privacy_unit if dataset is not None else None
    return unit.max_records_per_unit if unit is not None else 0
