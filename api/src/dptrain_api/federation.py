"""Federated DP-SGD across sites (hospitals) on Flower: the coordinator's DPFederatedJob and a site's DPFederatedSite.

Two kinds, because two parties own them:

* **DPFederatedJob** (``dpfj``) belongs to the coordinator: the global model, the privacy and training settings every
  site trains under, the rounds, the sites, the minimum number of sites per round, secure aggregation and the
  aggregation strategy. The operator watching its namespace runs Flower's SuperLink (and the ServerApp) for it, and
  for each site that lives in the same cluster (``sites[].namespace``) it creates that site's DPFederatedSite.
* **DPFederatedSite** (``dpfs``) belongs to a site: the agreement of one dataset's steward to take part, with the
  same settings, pointing at the coordinator's SuperLink. The operator watching the site's namespace (in the same
  cluster, or the hospital's own) checks the PrivateDataset's consent, reserves the site's whole privacy plan in that
  dataset's PrivacyLedger before round 1, runs the site's SuperNode next to the data (it dials out to the SuperLink)
  and commits what the site's privacy journal proves ran. The coordinator never reads a site's data or ledger.

The per-site guarantee: sample-level (ε, δ)-DP with respect to adding or removing one record of that site's
dataset, for everything that leaves the site (its model updates over all rounds are DP-SGD outputs, its held-out
metrics are Gaussian releases), composed with every other charge on that dataset in its ledger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, model_validator

from dptrain_api._base import IMMUTABLE, ApiModel, kubernetes_rule
from dptrain_api.common import BUILTIN_DATASETS, GROUP_VERSION, Condition, LocalObjectReference, ObjectMeta
from dptrain_api.dataset import PrivateDataset
from dptrain_api.job import (
    SECURE_NOISE_RULE,
    CheckpointSpec,
    ModelSpec,
    OptimisationSpec,
    PrivacySpec,
    PrivacyStatus,
    ResourcesSpec,
)
from dptrain_api.planning import SharedPlanInputs

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "CoordinatorReport",
    "DPFederatedJob",
    "DPFederatedJobSpec",
    "DPFederatedJobStatus",
    "DPFederatedSite",
    "DPFederatedSiteSpec",
    "DPFederatedSiteStatus",
    "FederatedTrainingSpec",
    "FederationDataSpec",
    "FederationPhase",
    "FederationReference",
    "FederationRunPolicy",
    "FederationSite",
    "GlobalMetricStatus",
    "RoundsStatus",
    "SecureAggregationSpec",
    "SitePlanInputs",
    "SiteReport",
    "SiteStatus",
    "SuperLinkConnection",
    "SuperLinkSpec",
    "dataset_allows",
    "dataset_shape",
    "declared_size",
    "federation_fingerprint",
    "federation_reference_of",
    "site_object",
    "site_plan_inputs",
]

DEFAULT_SUPERLINK_PORT = 9092
"""The SuperLink's one HTTP(S) port (Flower 1.42 serves its Fleet, Control and Runtime APIs there)."""

SiteName = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
NamespaceName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class FederationPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


_PRIVACY_RULES: list[JsonValue] = [
    *IMMUTABLE,
    kubernetes_rule("self.secureNoise", SECURE_NOISE_RULE, field_path=".secureNoise"),
]


def _secure(privacy: PrivacySpec) -> PrivacySpec:
    if not privacy.secure_noise:
        raise ValueError(SECURE_NOISE_RULE)
    return privacy


class FederatedTrainingSpec(OptimisationSpec):
    """Rounds and the local DP-SGD work of every site per round. Immutable: it fixes every site's plan."""

    rounds: Annotated[int, Field(ge=1, le=10000)] = 5
    """Federated rounds: each round every sampled site trains the global model locally and FedAvg combines them."""
    local_steps: Annotated[int, Field(ge=1, le=100000)] = 20
    """DP-SGD steps each site runs per round. A site's plan is rounds × localSteps steps at its own sample rate."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Expected local batch. Each site Poisson-samples its records at q = batchSize / its training examples (from
    its PrivateDataset's PUBLIC declared size)."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """sgd only: momentum (local, reset every round)."""
    eval_releases: Annotated[int, Field(ge=0, le=100)] = 2
    """How many times each site releases held-out metrics of the global model (Gaussian noise paid from its holdout's
    own budget; evenly spaced over the rounds, the last one of the final model). Their sum over the sites gives the
    global model's DP metric. 0: no metric leaves any site."""
    round_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0
    """How long a round waits for the sites' replies; a site that has not answered by then is left out of the round."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the initial global weights (the noise and the sampling never depend on it)."""

    @property
    def total_steps(self) -> int:
        """DP-SGD steps of a site that takes part in every round."""
        return self.rounds * self.local_steps


class FederationDataSpec(ApiModel):
    """What every site's records look like (public metadata): the coordinator builds the global model from it without
    seeing any data, and a site whose PrivateDataset differs is refused."""

    input_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=4)]
    """Shape of one example: [features] for tables (the PrivateDataset's feature columns, in order), [1, 8, 8] for
    the digits images."""
    num_classes: Annotated[int, Field(ge=2, le=10000)]
    """Classes of the label."""
    eval_metric: Literal["accuracy", "auc"] | None = None
    """Headline metric of the global model: AUC for binary labels and accuracy otherwise, when unset."""

    @property
    def metric(self) -> str:
        if self.eval_metric is not None:
            return self.eval_metric
        return "auc" if self.num_classes == 2 else "accuracy"


def dataset_shape(dataset: PrivateDataset) -> tuple[tuple[int, ...], int]:
    """(input shape, classes) of a PrivateDataset, from its public declaration."""
    source = dataset.spec.source
    if source.file is not None:
        return (len(source.file.features),), source.file.num_classes
    assert source.builtin is not None
    facts = BUILTIN_DATASETS[source.builtin]
    return facts.input_shape, facts.num_classes


class FederationSite(ApiModel):
    """One site (hospital) of the federation."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "has(self.namespace) == has(self.datasetRef)",
                    "an in-cluster site sets both namespace and datasetRef; an external site sets neither",
                )
            ]
        }
    )

    name: SiteName
    """The site's name in the federation (a DNS label): its SuperNode identifies as it, and its FedAvg weight and its
    per-site status are keyed by it."""
    namespace: NamespaceName | None = None
    """In-cluster site: the namespace holding its PrivateDataset; the operator creates its DPFederatedSite there.
    Unset: an external site (another cluster), which applies its own DPFederatedSite pointing at this SuperLink."""
    dataset_ref: LocalObjectReference | None = None
    """In-cluster site: its PrivateDataset (in ``namespace``), which must allow this federation (spec.federations)."""
    declared_size: Annotated[int, Field(ge=1)] | None = None
    """PUBLIC number of records used as the site's FedAvg weight. Unset: the size the site itself declares (its
    PrivateDataset's public numExamples). Never a count of the data."""
    public_key: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    """OpenSSH public key (NIST EC) of the site's SuperNode, for Flower's SuperNode authentication: only a SuperNode
    holding the matching private key can join as this site. Required when superlink.nodeAuthentication is true."""

    @model_validator(mode="after")
    def _in_cluster_or_external(self) -> FederationSite:
        if (self.namespace is None) != (self.dataset_ref is None):
            raise ValueError("an in-cluster site sets both namespace and datasetRef; an external site sets neither")
        return self

    @property
    def external(self) -> bool:
        return self.namespace is None


class SecureAggregationSpec(ApiModel):
    """Flower's SecAgg+ (Bell et al. 2020): the coordinator learns only the weighted sum of the sites' updates.

    It complements DP-SGD (each update is already DP); it does not replace it. Updates are clipped to
    ±clippingRange and quantized before masking; every site weights its own update by its public declared size."""

    num_shares: Annotated[int, Field(ge=3, le=1000)] = 3
    """Shares of each site's secret key: at least 3 (Flower's SecAgg+ refuses fewer), at most the number of sites."""
    reconstruction_threshold: Annotated[int, Field(ge=2, le=999)] = 2
    """Shares needed to unmask a site that dropped out mid-round (less than numShares)."""
    clipping_range: Annotated[float, Field(gt=0)] = 8.0
    """Each weighted model coordinate is clipped to [-clippingRange, clippingRange] before quantization."""
    quantization_range: Annotated[int, Field(ge=2**10, le=2**30)] = 2**22
    """Quantization levels of the masked vectors."""


class SuperLinkSpec(ApiModel):
    """How sites reach the coordinator's SuperLink (Flower's Fleet API). Secure by default."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "self.insecure || has(self.tlsSecretName)",
                    "set superlink.tlsSecretName (TLS), or insecure: true (plain HTTP, tests only)",
                ),
                kubernetes_rule(
                    "!self.insecure || !self.nodeAuthentication",
                    "SuperNode authentication needs TLS: set insecure: false and tlsSecretName",
                ),
            ]
        }
    )

    port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_SUPERLINK_PORT
    """Port of the SuperLink (its Service and its pod)."""
    tls_secret_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """A Secret in this namespace with tls.crt, tls.key and ca.crt: the SuperLink's certificate must name the address
    the sites dial (the Service DNS name or externalAddress) and 127.0.0.1 (the ServerApp runs next to it)."""
    insecure: bool = False
    """Plain HTTP, no TLS and no SuperNode authentication: refused unless the operator allows insecure federations
    (tests on one machine). Never across networks: updates and the Control API would travel in the clear."""
    node_authentication: bool = True
    """Flower's SuperNode authentication: every site lists its public key and its SuperNode proves it holds the
    private key; FedAvg weights and per-site status are keyed by that authenticated name."""
    external_address: Annotated[str, Field(min_length=1, max_length=300)] | None = None
    """host:port external sites dial (a LoadBalancer, an ingress); shown in status for their DPFederatedSite."""
    service_type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = "ClusterIP"
    """Type of the SuperLink's Service (ClusterIP serves in-cluster sites only)."""

    @model_validator(mode="after")
    def _secure(self) -> SuperLinkSpec:
        if not self.insecure and self.tls_secret_name is None:
            raise ValueError("set superlink.tlsSecretName (TLS), or insecure: true (plain HTTP, tests only)")
        if self.insecure and self.node_authentication:
            raise ValueError("SuperNode authentication needs TLS: set insecure: false and tlsSecretName")
        return self


class FederationRunPolicy(ApiModel):
    """Retries, deadline and clean-up of the coordinator (and of each site's SuperNode)."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Restarts of the coordinator pod (each resumes from the last round's global checkpoint), and of each site's
    SuperNode pod (each continues that site's privacy journal)."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the federation (DeadlineExceeded) after this long running."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the finished DPFederatedJob this long after it succeeds or fails."""


class DPFederatedJobSpec(ApiModel):
    """A federation: the global model, the privacy and training settings every site trains under, and the sites."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "self.minSites <= size(self.sites)",
                    "minSites must be at most the number of sites",
                    field_path=".minSites",
                ),
                kubernetes_rule(
                    "self.sites.all(s, self.sites.exists_one(t, t.name == s.name))",
                    "site names must be unique",
                    field_path=".sites",
                ),
            ]
        }
    )

    data: Annotated[FederationDataSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """What every site's records look like (immutable)."""
    model: Annotated[ModelSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = ModelSpec()
    """The global model (immutable). Custom factories and pretrained weights must exist on every site's image."""
    privacy: Annotated[
        PrivacySpec, Field(json_schema_extra={"x-kubernetes-validations": _PRIVACY_RULES}), AfterValidator(_secure)
    ]
    """Each site's guarantee (immutable): sample-level (targetEpsilon, delta)-DP for that site's records over all
    rounds. σ is calibrated per site (its own sample rate); noiseMultiplier fixes it for every site instead."""
    training: Annotated[FederatedTrainingSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = (
        FederatedTrainingSpec()
    )
    """Rounds and local work (immutable)."""
    sites: Annotated[
        list[FederationSite],
        Field(min_length=1, max_length=100, json_schema_extra={"x-kubernetes-validations": IMMUTABLE}),
    ]
    """The sites (immutable)."""
    min_sites: Annotated[int, Field(ge=1, le=100)] = 2
    """The fewest sites a round may aggregate; a round with fewer valid replies fails the federation, and so does a
    federation with fewer sites able to take part (refused, or out of budget)."""
    strategy: Literal["FedAvg"] = "FedAvg"
    """Flower's aggregation strategy. FedAvg weights each site by its PUBLIC declared size only."""
    secure_aggregation: SecureAggregationSpec | None = None
    """Flower's SecAgg+: the coordinator sees only the sum of the updates (and no per-site metric). Unset: off."""
    superlink: SuperLinkSpec
    """Flower's SuperLink: port, TLS (required unless insecure), SuperNode authentication, Service."""
    resources: ResourcesSpec = ResourcesSpec()
    """CPU and memory of the coordinator pod (SuperLink and ServerApp)."""
    site_resources: ResourcesSpec = ResourcesSpec()
    """CPU and memory of each in-cluster site's SuperNode pod (its local DP-SGD runs there)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """The coordinator's claim (SuperLink state, per-round global checkpoints) and each in-cluster site's claim
    (its privacy journal); everySteps is unused (a site's journal charges one round at a time)."""
    image: Annotated[str, Field(min_length=1)] | None = None
    """Image of the coordinator and in-cluster SuperNode pods (the trainer image with dptrain[federated])."""
    run_policy: FederationRunPolicy = FederationRunPolicy()
    """Retries, deadline, TTL."""

    @model_validator(mode="after")
    def _sites(self) -> DPFederatedJobSpec:
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be unique")
        if self.min_sites > len(self.sites):
            raise ValueError(f"minSites={self.min_sites} is more than the {len(self.sites)} sites")
        if self.superlink.node_authentication:
            missing = [site.name for site in self.sites if site.public_key is None]
            if missing:
                raise ValueError(
                    f"superlink.nodeAuthentication needs every site's publicKey; missing for {', '.join(missing)}"
                )
        if self.secure_aggregation is not None:
            if self.secure_aggregation.num_shares > len(self.sites):
                raise ValueError("secureAggregation.numShares must be at most the number of sites")
            if self.secure_aggregation.reconstruction_threshold >= self.secure_aggregation.num_shares:
                raise ValueError("secureAggregation.reconstructionThreshold must be less than numShares")
        return self


class RoundsStatus(ApiModel):
    completed: int = 0
    """Rounds aggregated (and checkpointed) so far."""
    total: int | None = None
    """Rounds of the federation."""


class SiteStatus(ApiModel):
    """One site as the coordinator sees it: public numbers only."""

    name: str
    phase: str | None = None
    """Pending, Admitted, Running, Succeeded, Refused, Failed or Unknown (external sites before they answer)."""
    external: bool | None = None
    epsilon_spent: float | None = None
    """ε the site's privacy journal has charged so far (what the site reports; its ledger is the record)."""
    target_epsilon: float | None = None
    steps: int | None = None
    """DP-SGD steps the site's journal charged."""
    planned_steps: int | None = None
    rounds: int | None = None
    """Rounds whose update from this site was aggregated."""
    reason: str | None = None
    message: str | None = None


class GlobalMetricStatus(ApiModel):
    """The global model's held-out metric: the sum of the sites' DP releases (never an exact statistic)."""

    metric: str | None = None
    """accuracy or auc."""
    value: float | None = None
    loss: float | None = None
    """DP held-out (clipped) loss."""
    round: int | None = None
    """The round whose global model was measured."""
    sites: int | None = None
    """How many sites' releases were summed."""


class DPFederatedJobStatus(ApiModel):
    phase: FederationPhase | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Standard conditions (Running, Succeeded, Failed)."""
    rounds: RoundsStatus | None = None
    sites: list[SiteStatus] = Field(default_factory=list)
    """Per-site progress and privacy (public numbers)."""
    global_metric: GlobalMetricStatus | None = None
    superlink_address: str | None = None
    """host:port the sites dial."""
    attempts: int | None = None
    """Coordinator pods started so far."""
    start_time: datetime | None = None
    completion_time: datetime | None = None
    observed_generation: int | None = None


class DPFederatedJob(ApiModel):
    """Federated DP-SGD across sites on Flower: per-site sample-level DP, FedAvg weighted by public sizes."""

    KIND: ClassVar[str] = "DPFederatedJob"

    api_version: Literal["dptrain.io/v1alpha1"] = GROUP_VERSION  # type: ignore[assignment]
    kind: Literal["DPFederatedJob"] = "DPFederatedJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: DPFederatedJobSpec
    status: DPFederatedJobStatus | None = None


# --- the site side ------------------------------------------------------------------------------------------------


class FederationReference(ApiModel):
    """The coordinator's DPFederatedJob, as the site's PrivateDataset consents to it."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the DPFederatedJob."""
    namespace: NamespaceName
    """Its namespace (in the coordinator's cluster)."""


class SuperLinkConnection(ApiModel):
    """How this site's SuperNode dials the coordinator's SuperLink (outbound only)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                kubernetes_rule(
                    "self.insecure || has(self.caSecretName)",
                    "set superlink.caSecretName (the SuperLink's CA), or insecure: true (tests only)",
                ),
                kubernetes_rule(
                    "!self.insecure || !has(self.authKeySecretName)",
                    "SuperNode authentication needs TLS",
                ),
            ]
        }
    )

    address: Annotated[str, Field(min_length=3, max_length=300, pattern=r"^[^\s:/]+:[0-9]{1,5}$")]
    """host:port of the coordinator's SuperLink."""
    insecure: bool = False
    """Plain HTTP (tests on one machine); refused unless the operator allows insecure federations."""
    ca_secret_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """A Secret in this namespace whose ca.crt verifies the SuperLink's certificate."""
    auth_key_secret_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """A Secret in this namespace whose ssh-privatekey is the SuperNode's private key (OpenSSH, NIST EC), for
    Flower's SuperNode authentication (the coordinator lists the matching public key for this site)."""

    @model_validator(mode="after")
    def _secure(self) -> SuperLinkConnection:
        if not self.insecure and self.ca_secret_name is None:
            raise ValueError("set superlink.caSecretName (the SuperLink's CA), or insecure: true (tests only)")
        if self.insecure and self.auth_key_secret_name is not None:
            raise ValueError("SuperNode authentication needs TLS: set insecure: false")
        return self


class DPFederatedSiteSpec(ApiModel):
    """A site's part in a federation: which dataset, which settings (the site's plan depends on them), where the
    coordinator is. The settings must equal the coordinator's (the site refuses a run whose settings differ)."""

    federation: Annotated[FederationReference, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """The coordinator's DPFederatedJob (immutable); the dataset must consent to it."""
    site_name: Annotated[SiteName, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """This site's name in the federation (immutable)."""
    dataset_ref: Annotated[LocalObjectReference, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """The PrivateDataset (in this namespace) the site trains on (immutable)."""
    data: Annotated[FederationDataSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})]
    """The coordinator's spec.data (immutable); the dataset must match it."""
    model: Annotated[ModelSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = ModelSpec()
    """The coordinator's spec.model (immutable)."""
    privacy: Annotated[
        PrivacySpec, Field(json_schema_extra={"x-kubernetes-validations": _PRIVACY_RULES}), AfterValidator(_secure)
    ]
    """The coordinator's spec.privacy (immutable)."""
    training: Annotated[FederatedTrainingSpec, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})] = (
        FederatedTrainingSpec()
    )
    """The coordinator's spec.training (immutable)."""
    secure_aggregation: Annotated[
        SecureAggregationSpec | None, Field(json_schema_extra={"x-kubernetes-validations": IMMUTABLE})
    ] = None
    """The coordinator's spec.secureAggregation (immutable)."""
    superlink: SuperLinkConnection
    """Where the coordinator's SuperLink is."""
    resources: ResourcesSpec = ResourcesSpec()
    """CPU and memory of the SuperNode pod (the site's local DP-SGD runs there)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """The site's claim: its privacy journal and per-round updates."""
    image: Annotated[str, Field(min_length=1)] | None = None
    """SuperNode image: the operator's trainer image unless allowed (trainer.allowedImages)."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Restarts of the SuperNode pod; each continues the site's privacy journal (never a fresh one)."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Stop the site (committing what its journal charged) after this long running."""
    stop: bool = False
    """true stops the site: its SuperNode is deleted and what its journal charged is committed (the coordinator
    sets it when the federation ends without telling the site; a steward may set it to leave)."""


class DPFederatedSiteStatus(ApiModel):
    phase: FederationPhase | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Standard conditions (Admitted, Running, Succeeded, Failed)."""
    privacy: PrivacyStatus | None = None
    """The site's privacy: planned σ, q and steps, and what its journal charged."""
    rounds: int | None = None
    """Rounds this site trained (its updates sent)."""
    global_model: str | None = None
    """Where the final global model was stored (in the site's claim)."""
    attempts: int | None = None
    """SuperNode pods started so far."""
    ledger_name: str | None = None
    """The PrivacyLedger of the site's dataset (the record of its charge)."""
    start_time: datetime | None = None
    completion_time: datetime | None = None
    observed_generation: int | None = None


class DPFederatedSite(ApiModel):
    """A site's part in a federation: consent-checked, its whole plan reserved in its dataset's ledger, its SuperNode
    run next to the data."""

    KIND: ClassVar[str] = "DPFederatedSite"

    api_version: Literal["dptrain.io/v1alpha1"] = GROUP_VERSION  # type: ignore[assignment]
    kind: Literal["DPFederatedSite"] = "DPFederatedSite"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: DPFederatedSiteSpec
    status: DPFederatedSiteStatus | None = None


def federation_fingerprint(federation: FederationReference, spec: DPFederatedJobSpec | DPFederatedSiteSpec) -> str:
    """sha256 of what every site must agree on (the federation, data shape, model, privacy, training, secure
    aggregation): the coordinator sends it with each round, and a site whose own DPFederatedSite gives another
    fingerprint refuses to train (nothing is charged)."""
    agreed = {
        "federation": federation.to_wire(),
        "data": spec.data.to_wire(),
        "model": spec.model.to_wire(),
        "privacy": spec.privacy.to_wire(),
        "training": spec.training.model_copy(update={"round_timeout_seconds": 0.0}).to_wire(),
        "secureAggregation": spec.secure_aggregation.to_wire() if spec.secure_aggregation is not None else None,
    }
    return hashlib.sha256(json.dumps(agreed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_allows(dataset: PrivateDataset, federation: FederationReference) -> bool:
    """Does the PrivateDataset consent to ``federation`` (its spec.allowFederations names it)?"""
    return any(
        grant.namespace == federation.namespace and grant.name == federation.name
        for grant in dataset.spec.allow_federations
    )


def declared_size(dataset: PrivateDataset) -> int:
    """The dataset's PUBLIC declared number of privacy units: numUnits with a privacyUnit, else its records
    (numExamples, or a built-in's published size)."""
    declared = dataset.spec.declared_units
    if declared is None:  # the schema requires numExamples for file sources
        raise ValueError("the dataset declares no numExamples")
    return declared


@dataclass(frozen=True)
class SitePlanInputs(SharedPlanInputs):
    """Keyword arguments of ``dptrain_accounting.plan_fixed_steps`` for one site: the shared inputs and the steps
    (rounds × localSteps)."""

    steps: int


def site_plan_inputs(
    spec: DPFederatedSiteSpec, dataset: PrivateDataset, *, holdout: float | None = None
) -> SitePlanInputs:
    """A site's plan inputs: q = batchSize / its training examples (declared size minus the dataset's holdout),
    rounds × localSteps steps, σ for the federation's target ε; its holdout releases for the global model's metric.
    ``holdout`` overrides the dataset's holdoutFraction (the operator passes the one its ledger fixed)."""
    return SitePlanInputs(
        num_examples=declared_size(dataset),
        eval_fraction=dataset.spec.holdout_fraction if holdout is None else holdout,
        batch_size=spec.training.batch_size,
        steps=spec.training.total_steps,
        target_epsilon=spec.privacy.target_epsilon,
        delta=spec.privacy.delta,
        accountant=spec.privacy.accountant.value,
        noise_multiplier=spec.privacy.noise_multiplier,
        eval_releases=spec.training.eval_releases,
    )


class SiteReport(ApiModel):
    """One site in the coordinator's report: public numbers the site reported, and the rounds it counted in."""

    model_config = ApiModel.model_config | ConfigDict(extra="ignore")

    name: str
    epsilon: float | None = None
    steps: int | None = None
    planned_steps: int | None = None
    target_epsilon: float | None = None
    rounds: int = 0
    error: str | None = None


class CoordinatorReport(ApiModel):
    """What the coordinator pod says when it ends (its termination message, compact JSON of at most 4096 bytes)."""

    model_config = ApiModel.model_config | ConfigDict(extra="ignore")
    CURRENT_VERSION: ClassVar[int] = 1

    version: Literal[1] = 1
    kind: Literal["coordinator"] = "coordinator"
    status: Literal["Succeeded", "Failed", "Interrupted"]
    exit_code: int
    reason: str | None = None
    error: str | None = None
    completed_rounds: int = 0
    total_rounds: int | None = None
    sites: list[SiteReport] = Field(default_factory=list)
    global_metric: GlobalMetricStatus | None = None

    def to_text(self, limit: int = 4096) -> str:
        message = self.model_copy(deep=True)

        def encoded() -> str:
            return json.dumps(message.to_wire(), separators=(",", ":"), allow_nan=False)

        text = encoded()
        if len(text.encode()) > limit and message.error:
            message.error = message.error[: max(0, len(message.error) - (len(text.encode()) - limit) - 16)] + "…"
            text = encoded()
        while len(text.encode()) > limit and message.sites:
            message.sites = message.sites[:-1]
            text = encoded()
        return text

    @classmethod
    def parse(cls, text: str | None) -> CoordinatorReport | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("kind") != "coordinator" or raw.get("version") != 1:
                return None
            return cls.model_validate(raw)
        except ValueError:
            return None


def federation_reference_of(job: DPFederatedJob) -> FederationReference:
    """The reference sites (and their datasets' consent) use for ``job``: its namespace and name."""
    return FederationReference(name=job.metadata.name or "", namespace=job.metadata.namespace or "default")


def site_object(
    job: DPFederatedJob, site: FederationSite, *, superlink: SuperLinkConnection, name: str | None = None
) -> DPFederatedSite:
    """The DPFederatedSite an in-cluster site gets (and the one an external hospital writes for itself): the
    coordinator's agreed settings, the site's dataset, and how to reach the SuperLink."""
    if site.dataset_ref is None:
        raise ValueError(f"site {site.name} is external: its own cluster writes its DPFederatedSite")
    spec = job.spec
    return DPFederatedSite(
        metadata=ObjectMeta(name=name or f"{job.metadata.name}-{site.name}", namespace=site.namespace),
        spec=DPFederatedSiteSpec(
            federation=federation_reference_of(job),
            site_name=site.name,
            dataset_ref=site.dataset_ref,
            data=spec.data,
            model=spec.model,
            privacy=spec.privacy,
            training=spec.training,
            secure_aggregation=spec.secure_aggregation,
            superlink=superlink,
            resources=spec.site_resources,
            checkpoint=spec.checkpoint,
            image=spec.image,
            backoff_limit=spec.run_policy.backoff_limit,
        ),
    )
