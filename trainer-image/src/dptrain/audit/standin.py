"""What an audit trains on instead of the job's private records: public data, or synthetic data of its shape.

An audit never reads a PrivateDataset's file: its records are the ones the budget protects, and the audit is
not charged to any ledger. For a file source it trains on synthetic records with the declared features (all
scaled to [0, 1], as prepared data always is), classes and training-set size. For a built-in dataset the public
data itself is used: the job's own training partition (same holdout key), so the audit sees what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch

from dptrain.data import load_builtin, split_holdout
from dptrain.errors import AuditError, ConfigurationError
from dptrain.plan import TrainingPlan
from dptrain_api import BUILTIN_DATASETS, BuiltinDataset, DPTrainingJob, PrivateDataset, dataset_identity, holdout_key

__all__ = ["DATA_CHOICES", "StandIn", "stand_in_data"]

DataChoice = Literal["auto", "public", "synthetic"]
DATA_CHOICES: Final = ("auto", "public", "synthetic")


@dataclass(frozen=True)
class StandIn:
    """Training records for the audit (never a PrivateDataset's own)."""

    features: torch.Tensor
    labels: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    source: Literal["public", "synthetic"]
    description: str


def _builtin_name(job: DPTrainingJob, dataset: PrivateDataset | None) -> str | None:
    if job.spec.dataset.builtin is not None:
        return job.spec.dataset.builtin.value
    if dataset is None:
        raise ConfigurationError(
            f"dataset.datasetRef names PrivateDataset {job.spec.dataset.dataset_ref.name!r}, but no PrivateDataset "
            "was given; add it to the manifest"
            if job.spec.dataset.dataset_ref is not None
            else "dataset: set exactly one of builtin or datasetRef"
        )
    builtin = dataset.spec.source.builtin
    return builtin.value if builtin is not None else None


def _synthetic(
    count: int, input_shape: tuple[int, ...], num_classes: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform features in [0, 1] and labels from a random linear teacher (learnable, so training behaves like
    training: gradients shrink as the model fits, and clipping matters less over time)."""
    features = rng.random((count, *input_shape))
    flat = features.reshape(count, -1) - 0.5
    teacher = rng.normal(size=(flat.shape[1], num_classes)) * 3.0 / np.sqrt(flat.shape[1])
    labels = np.argmax(flat @ teacher + rng.gumbel(size=(count, num_classes)) * 0.5, axis=1)
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def stand_in_data(
    job: DPTrainingJob,
    plan: TrainingPlan,
    *,
    dataset: PrivateDataset | None,
    choice: DataChoice,
    rng: np.random.Generator,
) -> StandIn:
    """The audit's training records: ``public`` (built-in datasets only), ``synthetic``, or ``auto`` (public for a
    built-in dataset, synthetic for a file). Asking for ``public`` on a file source is :class:`AuditError`."""
    if choice not in DATA_CHOICES:
        raise AuditError(f"audit data must be one of {', '.join(DATA_CHOICES)}, got {choice!r}")
    builtin = _builtin_name(job, dataset)
    if builtin is None:
        assert dataset is not None
        assert dataset.spec.source.file is not None
        source = dataset.spec.source.file
        if choice == "public":
            raise AuditError(
                f"PrivateDataset {dataset.metadata.name!r} reads {source.path}: its records are private, and an audit "
                "never trains on them (it is not charged to the dataset's budget). Audit with synthetic stand-in data "
                "of the declared features and classes (the default for file sources)."
            )
        shape: tuple[int, ...] = (len(source.features),)
        features, labels = _synthetic(plan.train_size, shape, source.num_classes, rng)
        return StandIn(
            features, labels, shape, source.num_classes, "synthetic", f"synthetic, shaped like {source.path}"
        )
    facts = BUILTIN_DATASETS[BuiltinDataset(builtin)]
    if choice == "synthetic":
        features, labels = _synthetic(plan.train_size, facts.input_shape, facts.num_classes, rng)
        return StandIn(
            features, labels, facts.input_shape, facts.num_classes, "synthetic", f"synthetic, shaped like {builtin}"
        )
    data = load_builtin(builtin)
    train, _ = split_holdout(data, fraction=plan.holdout_fraction, key=holdout_key(dataset_identity(job, dataset)))
    features, labels = train.tensors
    return StandIn(
        features,
        labels,
        data.input_shape,
        data.num_classes,
        "public",
        f"builtin {builtin} (public), training partition",
    )
