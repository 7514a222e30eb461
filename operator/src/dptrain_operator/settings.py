"""The operator's one settings object, loaded from environment variables (the Helm chart sets them).

Each field is declared with its type and range; pydantic turns the environment's strings into them (``"true"``,
``"2.5"``, ``"a, b"`` for a list) and refuses anything else with the variable's name, so a typo in the chart's values
stops the operator at start instead of being read as a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import version
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

_PREFIX = "DPTRAIN_"
VERSION = version("dptrain-operator")
"""The operator's version: its default trainer image carries the same tag."""


def _comma_separated(value: Any) -> Any:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_comma_separated)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class Settings(BaseModel):
    """Every knob of the operator. Environment variable = DPTRAIN_ + the field name in upper case."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    namespaces: Names = ()
    """Namespaces to watch (comma-separated); empty = the whole cluster."""
    trainer_image: str = f"ghcr.io/dptrain/trainer:{VERSION}"
    """Default trainer image for jobs that set no spec.image."""
    allowed_images: Names = ()
    """Other images (comma-separated; `repo@sha256:...` digests allowed) a job on a PrivateDataset may name in
    spec.image. Any other image is refused: it would run code the ledger cannot trust next to the data."""
    plan_timeout_seconds: Seconds = 60.0
    """The most CPU seconds one plan or ledger composition may use (in a worker process); a job whose plan needs more
    fails with PlanTimeout. CPU time, not wall time: a busy node does not make a plan fail."""
    plan_memory_mib: Annotated[int, Field(ge=0)] = 1024
    """The most memory (MiB of address space beyond the worker's start) one plan or ledger composition may use; a
    plan that needs more fails with PlanTimeout instead of taking the operator's memory."""
    image_pull_policy: str = "IfNotPresent"
    """imagePullPolicy of trainer containers."""
    metrics_port: Port = 8000
    """Port of the operator's own Prometheus endpoint (0 = off)."""
    liveness_port: Port = 8080
    """Port of kopf's liveness endpoint, /healthz (0 = off)."""
    trainer_metrics_port: Annotated[int, Field(ge=1, le=65535)] = 9090
    """Port the trainer pods serve metrics on (the operator scrapes it; Prometheus can too)."""
    scrape_interval: Seconds = 5.0
    """Seconds between reconciliations of a running job (metrics scrape, pod check)."""
    dataset_resync_seconds: Seconds = 30.0
    """Seconds between two copies of a ledger into its PrivateDataset's status."""
    trainer_service_account: str = "default"
    """ServiceAccount of trainer pods (its token is never mounted)."""
    trainer_run_as_user: Annotated[int, Field(ge=1)] = 65532
    """UID trainer containers run as (non-root)."""
    checkpoint_mount_path: str = "/var/lib/dptrain/checkpoint"
    """Where the checkpoint volume is mounted in trainer pods."""
    data_mount_path: str = "/var/lib/dptrain/data"
    """Where a PrivateDataset's claim is mounted (read-only) in trainer pods."""
    scratch_mount_path: str = "/tmp"
    """Writable scratch emptyDir (the root filesystem is read-only)."""
    gang_network_policy: bool = False
    """Give each multi-worker job a NetworkPolicy that lets its pods reach each other (the chart turns it on with
    its trainer NetworkPolicy, which would otherwise cut the gang's rendezvous and collectives)."""
    federation_allow_insecure: bool = False
    """Allow federations and sites with superlink.insecure (plain HTTP, no TLS, no SuperNode authentication). Off by
    default (the chart keeps it off): only for tests on one machine."""
    federation_loopback: bool = False
    """Test mode for fake kubelets that share one network namespace and have no DNS: in-cluster sites dial the
    SuperLink at 127.0.0.1:<port> and each SuperNode's local Runtime API binds its pod IP instead of 127.0.0.1."""
    federation_join_timeout_seconds: Seconds = 300.0
    """How long a federation's round 1 waits for every expected site to connect before starting with those there."""

    def allows_image(self, image: str | None) -> bool:
        """May ``image`` run as a trainer (unset: the operator's own trainer image)?"""
        return image is None or image == self.trainer_image or image in self.allowed_images

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives (unset or empty variables keep their defaults); a ValueError naming
        the variable for a value of the wrong type or out of range."""
        env = os.environ if environ is None else environ
        raw = {name: env[_PREFIX + name.upper()] for name in cls.model_fields if env.get(_PREFIX + name.upper())}
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(
                f"{_PREFIX}{str(problem['loc'][0]).upper()}={raw.get(str(problem['loc'][0]))!r}: {problem['msg']}"
                for problem in error.errors()
            )
            raise ValueError(problems) from None
