"""The public numbers a job's privacy plan is a function of, read from the resources in one place.

The operator (to reserve budget) and the trainer (to run) both hand these to
``dptrain_accounting.plan_mechanism``, so the two sides plan identically by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dptrain_api.common import BUILTIN_DATASETS, BuiltinDataset
from dptrain_api.dataset import PrivateDataset
from dptrain_api.job import DPTrainingJob

__all__ = ["DEFAULT_EVAL_FRACTION", "PlanInputs", "declared_num_examples", "holdout_fraction", "plan_inputs"]

DEFAULT_EVAL_FRACTION = 0.2


def declared_num_examples(job: DPTrainingJob, dataset: PrivateDataset | None) -> int:
    """The PUBLIC number of privacy units the plan uses: a built-in's declared size, the PrivateDataset's numUnits
    when it declares a privacyUnit, else its numExamples (the planner's ``num_examples`` counts units)."""
    builtin: BuiltinDataset | None = job.spec.dataset.builtin
    if dataset is not None:
        declared = dataset.spec.declared_units
        if declared is None:  # the schema requires numExamples for file sources
            raise ValueError("the dataset declares no numExamples")
        return declared
    if builtin is None:
        raise ValueError("the dataset declares no numExamples")
    return BUILTIN_DATASETS[builtin].num_examples


def holdout_fraction(job: DPTrainingJob, dataset: PrivateDataset | None) -> float:
    """The share of records held out: the PrivateDataset's (fixed per dataset), else the job's, else 0.2.

    Raises ValueError when a job asks for another holdout than its PrivateDataset's.
    """
    asked = job.spec.training.eval_fraction
    if dataset is None:
        return DEFAULT_EVAL_FRACTION if asked is None else asked
    fixed = dataset.spec.holdout_fraction
    if asked is not None and asked != fixed:
        raise ValueError(
            f"training.evalFraction={asked:g} differs from the holdout of PrivateDataset {dataset.metadata.name!r} "
            f"(spec.holdoutFraction={fixed:g}), which is fixed for every job on it; leave training.evalFraction unset"
        )
    return fixed


@dataclass(frozen=True)
class SharedPlanInputs:
    """What a job's and a federation site's plans are computed from alike: public numbers only (hashable: plans
    are cached on them)."""

    num_examples: int
    eval_fraction: float
    batch_size: int
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float | None
    eval_releases: int

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanInputs(SharedPlanInputs):
    """Keyword arguments of ``dptrain_accounting.plan_mechanism``: the shared inputs and the epochs."""

    epochs: float


def plan_inputs(job: DPTrainingJob, dataset: PrivateDataset | None, *, num_examples: int | None = None) -> PlanInputs:
    """The plan inputs of ``job`` on ``dataset`` (``num_examples`` overrides the declared count)."""
    spec = job.spec
    return PlanInputs(
        num_examples=declared_num_examples(job, dataset) if num_examples is None else num_examples,
        eval_fraction=holdout_fraction(job, dataset),
        batch_size=spec.training.batch_size,
        epochs=spec.training.epochs,
        target_epsilon=spec.privacy.target_epsilon,
        delta=spec.privacy.delta,
        accountant=spec.privacy.accountant.value,
        noise_multiplier=spec.privacy.noise_multiplier,
        eval_releases=spec.training.eval_releases,
    )
