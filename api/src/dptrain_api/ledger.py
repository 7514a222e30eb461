"""PrivacyLedger: the privacy budget of one dataset identity, kept by the operator (cluster-scoped).

Job authors cannot write it (the chart grants them nothing on it), so deleting and re-creating a
PrivateDataset, or editing its status, changes no budget: the ledger is keyed by the dataset's identity (its
namespace and source) and outlives the PrivateDataset objects that describe it.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from dptrain_api._base import ApiModel
from dptrain_api.common import GROUP_VERSION, Condition, ObjectMeta
from dptrain_api.dataset import LedgerEntry, PrivacyBudget

__all__ = ["BoundDataset", "BudgetChange", "PrivacyLedger", "PrivacyLedgerSpec", "PrivacyLedgerStatus"]


class PrivacyLedgerSpec(ApiModel):
    """Whose budget this is."""

    identity: str
    """The dataset identity: `<namespace>/builtin/<name>`, `<namespace>/file/<claim>/<path>`, or
    `<namespace>/job-data/<builtin>` for jobs on a built-in dataset without a PrivateDataset (no budget)."""
    namespace: str
    """Namespace of the datasets (and jobs) this ledger serves."""


class BoundDataset(ApiModel):
    """The PrivateDataset that currently describes this identity (one at a time)."""

    name: str
    uid: str


class BudgetChange(ApiModel):
    """One accepted change of the budget (an evented act of the dataset's steward)."""

    time: datetime
    epsilon: float
    delta: float
    reason: Literal["Initial", "Raised", "Lowered", "DeltaChanged"]
    dataset_uid: str | None = None
    """UID of the PrivateDataset whose spec set it."""


class PrivacyLedgerStatus(ApiModel):
    """The ledger: every job ever charged, and the budget in force."""

    budget: PrivacyBudget | None = None
    """The budget in force; None: no budget (jobs on a public built-in dataset)."""
    holdout_fraction: float | None = None
    """The share of records held out, fixed when the ledger was created."""
    dataset: BoundDataset | None = None
    """The PrivateDataset that describes this identity now (None after it was deleted)."""
    entries: list[LedgerEntry] = Field(default_factory=list)
    """Every job ever admitted or refused. Entries are never removed."""
    budget_history: list[BudgetChange] = Field(default_factory=list)
    """Every accepted budget change."""
    epsilon_spent: float | None = None
    epsilon_reserved: float | None = None
    epsilon_remaining: float | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class PrivacyLedger(ApiModel):
    """The privacy budget of one dataset, kept by the dptrain operator: the source of truth of every charge."""

    KIND: ClassVar[str] = "PrivacyLedger"

    api_version: Literal["dptrain.io/v1alpha1"] = GROUP_VERSION  # type: ignore[assignment]
    kind: Literal["PrivacyLedger"] = "PrivacyLedger"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PrivacyLedgerSpec
    status: PrivacyLedgerStatus | None = None
