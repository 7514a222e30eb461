"""What the site and coordinator supervisors hand their Flower apps: one JSON file each, on their own volume.

Flower passes an app only flat TOML values (``--node-config`` for a ClientApp, ``--run-config`` for the ServerApp),
and a run config comes from the SuperLink, i.e. from the coordinator. So nothing that decides a site's privacy travels
in it: the site's ClientApp reads its plan from the file its own supervisor wrote (the DPFederatedSite and
PrivateDataset of the site's cluster, and the mechanisms its operator reserved), named by the node config, and only
checks that the coordinator's fingerprint of the agreed settings equals its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from dptrain.errors import ConfigurationError
from dptrain.journal import atomic_write
from dptrain_api import (
    CheckpointSpec,
    DatasetSpec,
    DPFederatedJob,
    DPFederatedSite,
    DPTrainingJob,
    DPTrainingJobSpec,
    FederationReference,
    LocalObjectReference,
    ObjectMeta,
    PrivateDataset,
    ReservedMechanisms,
    TrainingSpec,
    declared_size,
    federation_fingerprint,
)
from dptrain_api.federation import federation_reference_of

__all__ = [
    "NODE_CONFIG_KEY",
    "RUN_CONFIG_KEY",
    "ServerConfig",
    "SiteConfig",
    "federation_reference",
    "site_training_job",
]

NODE_CONFIG_KEY: Final = "dptrain-site-config"
"""The node-config key naming the site's config file (set by the site's supervisor on its SuperNode)."""
RUN_CONFIG_KEY: Final = "dptrain-server-config"
"""The run-config key naming the ServerApp's config file (set by the coordinator's supervisor)."""


def federation_reference(job: DPFederatedJob) -> FederationReference:
    return federation_reference_of(job)


def site_training_job(site: DPFederatedSite, dataset: PrivateDataset) -> DPTrainingJob:
    """The site's local DP-SGD as the engine knows a job: the federation's model, privacy and local training on the
    site's dataset, one journal chunk per round (checkpoint.everySteps = localSteps). Its fingerprint keys the site's
    journal and checkpoint, so a workdir of another site or federation is refused."""
    spec = site.spec
    training = spec.training
    federation = spec.federation
    return DPTrainingJob(
        metadata=ObjectMeta(
            name=f"{federation.name}-{spec.site_name}"[:253],
            namespace=site.metadata.namespace or dataset.metadata.namespace or "default",
            uid=site.metadata.uid or f"{federation.namespace}/{federation.name}/{spec.site_name}",
        ),
        spec=DPTrainingJobSpec(
            dataset=DatasetSpec(dataset_ref=LocalObjectReference(name=dataset.metadata.name or "dataset")),
            model=spec.model,
            privacy=spec.privacy,
            training=TrainingSpec(
                epochs=1.0,  # unused: a site's plan is rounds × localSteps (dptrain.federated.site.site_plan)
                batch_size=training.batch_size,
                max_physical_batch_size=training.max_physical_batch_size,
                optimizer=training.optimizer,
                learning_rate=training.learning_rate,
                momentum=training.momentum,
                weight_decay=training.weight_decay,
                eval_releases=training.eval_releases,
                seed=training.seed,
            ),
            checkpoint=CheckpointSpec(every_steps=training.local_steps),
        ),
    )


@dataclass
class SiteConfig:
    """One site's configuration, written by ``dptrain federation site`` for the ClientApps of its SuperNode."""

    site: DPFederatedSite
    dataset: PrivateDataset
    workdir: Path
    """The site's claim: privacy journal, checkpoint, per-round updates, the final global model."""
    data_dir: Path
    """Where a file dataset's path resolves (the mounted data claim)."""
    reserved: ReservedMechanisms | None = None
    """What the site's operator reserved in the dataset's ledger (None locally: the plan is calibrated here)."""
    identity: str | None = None
    """The dataset identity the site was admitted for."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.site.spec.site_name

    @property
    def fingerprint(self) -> str:
        return federation_fingerprint(self.site.spec.federation, self.site.spec)

    @property
    def declared_size(self) -> int:
        """The site's PUBLIC declared record count (its FedAvg weight unless the coordinator fixes one)."""
        return declared_size(self.dataset)

    def to_json(self) -> str:
        return json.dumps(
            {
                "site": self.site.to_wire(),
                "dataset": self.dataset.to_wire(),
                "workdir": str(self.workdir),
                "dataDir": str(self.data_dir),
                "reserved": self.reserved.to_wire() if self.reserved is not None else None,
                "identity": self.identity,
                "extra": self.extra,
            },
            indent=1,
        )

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_json().encode())
        return path

    @classmethod
    def read(cls, path: Path | str) -> SiteConfig:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                site=DPFederatedSite.model_validate(raw["site"]),
                dataset=PrivateDataset.model_validate(raw["dataset"]),
                workdir=Path(raw["workdir"]),
                data_dir=Path(raw["dataDir"]),
                reserved=ReservedMechanisms.model_validate(raw["reserved"]) if raw.get("reserved") else None,
                identity=raw.get("identity"),
                extra=dict(raw.get("extra") or {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigurationError(f"cannot read the site configuration {path}: {error}") from None


@dataclass
class ServerConfig:
    """The coordinator's configuration, written by ``dptrain federation server`` for its ServerApp."""

    federation: DPFederatedJob
    out_dir: Path
    """The coordinator's claim: per-round global checkpoints, status.json, the final model and report."""
    initial_round: int = 0
    """Rounds already aggregated (a resumed federation continues after them)."""
    resume_from: Path | None = None
    """The global checkpoint of round ``initial_round`` (None: a fresh model)."""
    expected_sites: list[str] = field(default_factory=list)
    """Sites expected to join (in-cluster sites admitted by their operator, and every external site)."""
    join_timeout_seconds: float = 300.0
    """How long round 1 waits for every expected site to connect (it starts earlier with all of them)."""

    @property
    def fingerprint(self) -> str:
        return federation_fingerprint(federation_reference(self.federation), self.federation.spec)

    def declared_sizes(self) -> dict[str, int]:
        """The coordinator's own table of PUBLIC sizes (sites[].declaredSize)."""
        return {site.name: site.declared_size for site in self.federation.spec.sites if site.declared_size}

    def to_json(self) -> str:
        return json.dumps(
            {
                "federation": self.federation.to_wire(),
                "outDir": str(self.out_dir),
                "initialRound": self.initial_round,
                "resumeFrom": str(self.resume_from) if self.resume_from is not None else None,
                "expectedSites": self.expected_sites,
                "joinTimeoutSeconds": self.join_timeout_seconds,
            },
            indent=1,
        )

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_json().encode())
        return path

    @classmethod
    def read(cls, path: Path | str) -> ServerConfig:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                federation=DPFederatedJob.model_validate(raw["federation"]),
                out_dir=Path(raw["outDir"]),
                initial_round=int(raw.get("initialRound", 0)),
                resume_from=Path(raw["resumeFrom"]) if raw.get("resumeFrom") else None,
                expected_sites=[str(name) for name in raw.get("expectedSites") or []],
                join_timeout_seconds=float(raw.get("joinTimeoutSeconds", 300.0)),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigurationError(f"cannot read the server configuration {path}: {error}") from None
