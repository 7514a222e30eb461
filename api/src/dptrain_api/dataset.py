"""PrivateDataset: a sensitive dataset, its public metadata and its total privacy budget."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from dptrain_api._base import IMMUTABLE, ApiModel, kubernetes_rule
from dptrain_api.common import (
    BUILTIN_DATASETS,
    GROUP_VERSION,
    BuiltinDataset,
    Condition,
    ObjectMeta,
    ResourceName,
)
from dptrain_api.contract import Mechanism


class FeatureColumn(ApiModel):
    """A feature column and its PUBLIC bounds: values are clipped to [min, max] and scaled to [0, 1].

    Bounds must come from public knowledge (a clinical range), never from the data itself,
    or the preprocessing would leak outside the privacy budget.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [kubernetes_rule("self.min < self.max", "min must be below max")]
        }
    )

    name: Annotated[str, Field(min_length=1)]
    """Column name in the file."""
    min: float
    """Public lower bound."""
    max: float
    """Public upper bound."""

    @model_validator(mode="after")
    def _ordered(self) -> FeatureColumn:
        if not self.min < self.max:
            raise ValueError(f"feature {self.name!r}: min must be below max")
        return self


def _inside_claim(path: str) -> str:
    if ".." in path.split("/"):
        raise ValueError("path must stay inside the claim (no '..' segments)")
    return path


class FileSource(ApiModel):
    """A CSV or Parquet file on a PersistentVolumeClaim."""

    claim_name: ResourceName
    """PersistentVolumeClaim holding the file (mounted read-only into trainer pods)."""
    path: Annotated[
        str,
        Field(
            min_length=1,
            max_length=4096,
            pattern=r"^[^/].*$",
            json_schema_extra={
                "x-kubernetes-validations": [
                    kubernetes_rule(
                        "!(self == '..' || self.startsWith('../') || self.endsWith('/..') || self.contains('/../'))",
                        "path must stay inside the claim (no '..' segments)",
                    )
                ]
            },
        ),
        AfterValidator(_inside_claim),
    ]
    """Path of the file inside the claim (relative). With `dptrain run`, relative to the manifest's folder."""
    format: Literal["csv", "parquet"] = "csv"
    """File format."""
    label_column: Annotated[str, Field(min_length=1)]
    """Column holding the integer class label (0 .. numClasses-1)."""
    features: Annotated[list[FeatureColumn], Field(min_length=1)]
    """Feature columns with their public bounds; other columns are ignored."""
    num_classes: Annotated[int, Field(ge=2, le=10000)] = 2
    """Number of classes of the label."""


class DatasetSource(ApiModel):
    """Where the data lives: exactly one of `builtin` or `file`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "has(self.builtin) != has(self.file)", "set exactly one of source.builtin or source.file"
                )
            ]
        }
    )

    builtin: BuiltinDataset | None = None
    """A built-in dataset that ships with the trainer."""
    file: FileSource | None = None
    """A CSV or Parquet file on a PersistentVolumeClaim."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DatasetSource:
        if (self.builtin is None) == (self.file is None):
            raise ValueError("set exactly one of source.builtin or source.file")
        return self


_DELTA_RULE = (
    "budget.delta must be below 1/numExamples: a δ of 1/n allows a mechanism that publishes one record outright"
)
_DELTA_UNITS_RULE = "budget.delta must be below 1/numUnits: a δ of 1/n allows publishing one individual outright"
_UNITS_RULE = "numUnits (the public number of individuals) is required with privacyUnit, and only with it"


class PrivacyUnit(ApiModel):
    """Whose privacy the guarantee protects: every record with the same value in ``column`` belongs to one individual
    (a patient), and the guarantee is about adding or removing one individual with ALL of their records."""

    column: Annotated[str, Field(min_length=1)]
    """Column holding the individual's identifier (e.g. patient_id). It is never a feature: it only groups records."""
    max_records_per_unit: Annotated[int, Field(ge=1, le=1024)]
    """k: at most this many records of an individual are used (chosen by a keyed hash of each record, so which ones
    depends on that individual's records alone); an individual's summed gradient is clipped once."""


class PrivacyBudget(ApiModel):
    """The total privacy loss the custodian allows for all jobs on this dataset together."""

    epsilon: Annotated[float, Field(gt=0, le=100)]
    """Total ε for all jobs together, composed tightly (PLD), not summed. It may be raised; lowering it below what
    is already charged is refused."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """Total δ at which the composed ε is measured; below 1/numExamples. It may be lowered while the composed ε
    still fits; raising it once anything is charged is refused (it would shrink what the ledger shows charged)."""


class LedgerEntry(ApiModel):
    """One job's charge against a dataset: DP-SGD steps on the training partition and DP releases of held-out
    metrics on the holdout, each a (composed) Gaussian mechanism; plus what the operator observed of the job."""

    job_name: str
    """DPTrainingJob name."""
    job_namespace: str | None = None
    """DPTrainingJob namespace."""
    job_uid: str
    """DPTrainingJob UID."""
    kind: Literal["DPTrainingJob", "DPFederatedSite"] | None = None
    """What charged: a DPTrainingJob (when unset) or a site of a federation (DPFederatedSite)."""
    federation: str | None = None
    """DPFederatedSite only: the federation, ``<namespace>/<name>`` of its DPFederatedJob."""
    state: Literal["Reserved", "Committed", "Refused"]
    """Reserved while the job may run (charged at its full plan); Committed once final (charged at what its privacy
    journal proves ran, or in full when that is unknown); Refused (charged nothing, never runs)."""
    train: Mechanism | None = None
    """DP-SGD steps: reserved (planned), or committed (charged)."""
    holdout: Mechanism | None = None
    """Releases of held-out metrics: reserved (planned), or committed (charged)."""
    observed_steps: int = 0
    """The most DP-SGD steps the operator has seen charged (scraped or reported); a commit is never lower."""
    observed_releases: int = 0
    """The most held-out releases the operator has seen charged."""
    pods: int = 0
    """Trainer pods created for the job (attempts)."""
    settled_pods: list[str] = Field(default_factory=list)
    """Trainer pods whose end the operator recorded."""
    started_pods: int = 0
    """Settled trainer pods whose container ran: every later pod must find their privacy journal."""
    failed_pods: int = 0
    """Settled trainer pods that failed (counted against the job's backoffLimit)."""
    checkpoint_claim_uid: str | None = None
    """UID of the job's checkpoint claim (a replaced claim means a lost journal)."""
    outcome: str | None = None
    """How the job ended (Succeeded, or the failure reason), once Committed or Refused."""
    message: str | None = None
    """Why the job was refused or how it ended."""
    epsilon: float | None = None
    """This entry alone at the budget's δ (for reading; the total is composed)."""
    time: datetime | None = None
    """When the entry was last changed."""


class FederationGrant(ApiModel):
    """A federation allowed to train on the dataset (in the spirit of Gateway API's ReferenceGrant): the
    coordinator's DPFederatedJob, by namespace and name in the coordinator's cluster."""

    namespace: Annotated[str, Field(min_length=1, max_length=63)]
    """Namespace of the DPFederatedJob."""
    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the DPFederatedJob."""


class PrivateDatasetSpec(ApiModel):
    """A sensitive dataset and its privacy budget."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "!has(self.source.file) || has(self.numExamples)",
                    "numExamples is required for file sources (public metadata the plan depends on)",
                    field_path=".numExamples",
                ),
                kubernetes_rule(
                    "!has(self.numExamples) || self.budget.delta < 1.0 / double(self.numExamples)",
                    _DELTA_RULE,
                    field_path=".budget.delta",
                ),
                kubernetes_rule("has(self.privacyUnit) == has(self.numUnits)", _UNITS_RULE, field_path=".numUnits"),
                kubernetes_rule(
                    "!has(self.privacyUnit) || has(self.source.file)",
                    "privacyUnit is for file sources (a built-in dataset has one record per individual)",
                    field_path=".privacyUnit",
                ),
                kubernetes_rule(
                    "!has(self.numUnits) || self.budget.delta < 1.0 / double(self.numUnits)",
                    _DELTA_UNITS_RULE,
                    field_path=".budget.delta",
                ),
            ]
        }
    )

    source: Annotated[DatasetSource, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """Where the data lives (immutable)."""
    num_examples: Annotated[int, Field(ge=1)] | None = None
    """PUBLIC (approximate) number of records, before the holdout. The plan's sample rate uses it (unless a
    privacyUnit is declared); the true count is never reported (it is private), only checked with DP against gross
    mismatch. Required for file sources."""
    privacy_unit: Annotated[PrivacyUnit, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] | None = None
    """Whose privacy is protected (immutable): unset, one record is the unit ("add or remove one record"); set, all
    records of one individual are ("add or remove one patient with all of their records")."""
    num_units: Annotated[int, Field(ge=1, json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] | None = None
    """PUBLIC (approximate) number of individuals, before the holdout (immutable), required with privacyUnit: the
    plan's sample rate q = batchSize / training individuals comes from it, as from numExamples for records."""
    budget: PrivacyBudget
    """Total privacy budget."""
    holdout_fraction: Annotated[
        float, Field(ge=0, le=0.9, json_schema_extra={"x-kubernetes-validations": IMMUTABLE})
    ] = 0.2
    """Share of the records held out from training for evaluation, the same for every job (immutable): a record is
    held out by a keyed hash of its own content, and held-out metrics are released with their own DP noise."""
    allow_federations: Annotated[list[FederationGrant], Field(max_length=100)] = Field(default=[])
    """Federations whose sites may train on these records (a DPFederatedSite naming another federation is refused
    with FederationNotAllowed). Each site's whole plan is still reserved in this dataset's budget. Removing a grant
    stops a site that is running."""

    @model_validator(mode="after")
    def _file_needs_size(self) -> PrivateDatasetSpec:
        if self.source.file is not None and self.num_examples is None:
            raise ValueError("numExamples is required for file sources (public metadata the plan depends on)")
        if (self.privacy_unit is None) != (self.num_units is None):
            raise ValueError(_UNITS_RULE)
        if self.privacy_unit is not None and self.source.file is None:
            raise ValueError("privacyUnit is for file sources (a built-in dataset has one record per individual)")
        if self.privacy_unit is not None and self.source.file is not None:
            file = self.source.file
            if self.privacy_unit.column in {file.label_column, *(f.name for f in file.features)}:
                raise ValueError(f"privacyUnit.column {self.privacy_unit.column!r} is a feature or the label column")
        size = self.num_examples
        if size is None and self.source.builtin is not None:
            size = BUILTIN_DATASETS[self.source.builtin].num_examples
        if size is not None and self.budget.delta >= 1.0 / size:
            raise ValueError(f"{_DELTA_RULE} (δ={self.budget.delta:g}, {size} records)")
        if self.num_units is not None and self.budget.delta >= 1.0 / self.num_units:
            raise ValueError(f"{_DELTA_UNITS_RULE} (δ={self.budget.delta:g}, {self.num_units} individuals)")
        return self

    @property
    def declared_units(self) -> int | None:
        """The PUBLIC number of privacy units: numUnits with a privacyUnit, else the records (numExamples, or a
        built-in's published size)."""
        if self.num_units is not None:
            return self.num_units
        if self.num_examples is not None:
            return self.num_examples
        return BUILTIN_DATASETS[self.source.builtin].num_examples if self.source.builtin is not None else None

    @property
    def unit_description(self) -> str:
        """The privacy unit in words (status, `kubectl get pds`, the report)."""
        if self.privacy_unit is None:
            return BUILTIN_DATASETS[self.source.builtin].unit if self.source.builtin is not None else "record"
        return f"{self.privacy_unit.column} (≤{self.privacy_unit.max_records_per_unit} records)"


class PrivateDatasetStatus(ApiModel):
    """A copy of the dataset's PrivacyLedger, for reading; the ledger itself (cluster-scoped, written by the
    operator only) is the source of truth, so editing this status changes nothing."""

    ledger_name: str | None = None
    """Name of the cluster-scoped PrivacyLedger that keeps this dataset's budget."""
    privacy_unit: str | None = None
    """Whose privacy the budget protects: "record", or the unit column and its record cap."""
    budget: PrivacyBudget | None = None
    """The budget in force: spec.budget once the operator accepted it (it refuses one below what is charged)."""
    epsilon_spent: float | None = None
    """ε of all committed entries composed."""
    epsilon_reserved: float | None = None
    """ε of committed plus reserved entries composed, minus epsilonSpent."""
    epsilon_remaining: float | None = None
    """The budget's ε minus the composed ε of all entries."""
    ledger: list[LedgerEntry] = Field(default_factory=list)
    """Every job ever charged (a copy of the PrivacyLedger's entries). Entries are never removed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Standard conditions."""
    observed_generation: int | None = None
    """The .metadata.generation last reconciled."""


class PrivateDataset(ApiModel):
    """A sensitive dataset registered with a total privacy budget; jobs that would exceed it are refused."""

    KIND: ClassVar[str] = "PrivateDataset"

    api_version: Literal["dptrain.io/v1alpha1"] = GROUP_VERSION  # type: ignore[assignment]
    kind: Literal["PrivateDataset"] = "PrivateDataset"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PrivateDatasetSpec
    status: PrivateDatasetStatus | None = None
