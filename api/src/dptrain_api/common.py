"""Pieces both resources share: object metadata, standard conditions, dataset references."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

from dptrain_api._base import ApiModel

API_GROUP = "dptrain.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# RFC 1123 subdomain, as Kubernetes requires of object names.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 2, 500m, 4Gi)")
    if isinstance(value, int) and value < 0:
        raise ValueError("must not be negative")
    return value


def _float_to_quantity(value: Any) -> Any:
    # YAML reads `cpu: 0.5` as a float; Kubernetes quantities are int-or-string.
    return repr(value) if isinstance(value, float) else value


Quantity = Annotated[
    int | str,
    BeforeValidator(_float_to_quantity),
    AfterValidator(_check_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int ? self >= 0 : isQuantity(self)",
                    "message": "must be a Kubernetes quantity (examples: 2, 500m, 4Gi)",
                }
            ]
        }
    ),
]
"""A Kubernetes resource quantity such as `2`, `500m`, `4Gi`."""


class BuiltinDataset(StrEnum):
    """Real healthcare datasets that ship inside pip packages, so they work offline."""

    FLCHAIN = "flchain"
    BREAST_CANCER = "breast-cancer"
    DIGITS = "digits"


@dataclass(frozen=True)
class BuiltinDatasetFacts:
    """Public facts of a built-in dataset, declared here once: the operator plans (and reserves budget) from
    them without loading any data, and the trainer's loaders check the data they load against them."""

    num_examples: int
    input_shape: tuple[int, ...]
    """Shape of one example (without the batch dimension)."""
    num_classes: int
    eval_metric: Literal["accuracy", "auc"]
    """Headline evaluation metric: AUC for (imbalanced) binary outcomes, else accuracy."""
    unit: str = "record"
    """The privacy unit, stated: what one record is (its guarantee is per record)."""


BUILTIN_DATASETS: Mapping[BuiltinDataset, BuiltinDatasetFacts] = MappingProxyType(
    {
        BuiltinDataset.FLCHAIN: BuiltinDatasetFacts(7874, (7,), 2, "auc", "record (one per patient)"),
        BuiltinDataset.BREAST_CANCER: BuiltinDatasetFacts(569, (30,), 2, "accuracy", "record (one per patient)"),
        BuiltinDataset.DIGITS: BuiltinDatasetFacts(
            1797, (1, 8, 8), 10, "accuracy", "record (one image; its writer wrote others, unidentified)"
        ),
    }
)


class ObjectMeta(ApiModel):
    """The subset of Kubernetes object metadata dptrain reads; other metadata fields pass through."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: ResourceName | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition shape)."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=316)]
    """Condition type in CamelCase, e.g. Admitted, Running, Succeeded, Failed."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    ]
    """Machine-readable CamelCase reason for the last transition, e.g. BudgetExceeded."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """Human-readable explanation: what happened and, for failures, what to fix."""
    last_transition_time: datetime
    """When the condition last changed status."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation the condition was set for."""


class LocalObjectReference(ApiModel):
    """A reference to another object in the same namespace."""

    name: ResourceName
    """Name of the referenced object."""


class Toleration(ApiModel):
    """A Kubernetes pod toleration, copied onto trainer pods."""

    key: str | None = None
    """Taint key the toleration applies to; empty matches all keys (with operator Exists)."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches `value`."""
    value: str | None = None
    """Taint value to match when operator is Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""
