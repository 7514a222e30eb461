"""The operator's one settings object, loaded from environment variables (the Helm chart sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version

_PREFIX = "DPTRAIN_"
VERSION = version("dptrain-operator")
"""The operator's version: its default trainer image carries the same tag."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the operator. Environment variable = DPTRAIN_ + the field name in upper case."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to watch (comma-separated); empty = the whole cluster."""
    trainer_image: str = f"ghcr.io/dptrain/trainer:{VERSION}"
    """Default trainer image for jobs that set no spec.image."""
    allowed_images: tuple[str, ...] = ()
    """Other images (comma-separated; `repo@sha256:...` digests allowed) a job on a PrivateDataset may name in
    spec.image. Any other image is refused: it would run code the ledger cannot trust next to the data."""
    plan_timeout_seconds: float = 60.0
    """The most CPU seconds one plan or ledger composition may use (in a worker process); a job whose plan needs more
    fails with PlanTimeout. CPU time, not wall time: a busy node does not make a plan fail."""
    plan_memory_mib: int = 1024
    """The most memory (MiB of address space beyond the worker's start) one plan or ledger composition may use; a
    plan that needs more fails with PlanTimeout instead of taking the operator's memory."""
    image_pull_policy: str = "IfNotPresent"
    """imagePullPolicy of trainer containers."""
    metrics_port: int = 8000
    """Port of the operator's own Prometheus endpoint (0 = off)."""
    liveness_port: int = 8080
    """Port of kopf's liveness endpoint, /healthz (0 = off)."""
    trainer_metrics_port: int = 9090
    """Port the trainer pods serve metrics on (the operator scrapes it; Prometheus can too)."""
    scrape_interval: float = 5.0
    """Seconds between reconciliations of a running job (metrics scrape, pod check)."""
    dataset_resync_seconds: float = 30.0
    """Seconds between two copies of a ledger into its PrivateDataset's status."""
    trainer_service_account: str = "default"
    """ServiceAccount of trainer pods (its token is never mounted)."""
    trainer_run_as_user: int = 65532
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
    federation_join_timeout_seconds: float = 300.0
    """How long a federation's round 1 waits for every expected site to connect before starting with those there."""

    def allows_image(self, image: str | None) -> bool:
        """May ``image`` run as a trainer (unset: the operator's own trainer image)?"""
        return image is None or image == self.trainer_image or image in self.allowed_images

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, spec in cls.__dataclass_fields__.items():
            raw = env.get(_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            default = spec.default
            try:
                if isinstance(default, tuple):
                    values[name] = tuple(part.strip() for part in raw.split(",") if part.strip())
                elif isinstance(default, bool):
                    values[name] = raw.lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    values[name] = int(raw)
                elif isinstance(default, float):
                    values[name] = float(raw)
                else:
                    values[name] = raw
            except ValueError:
                raise ValueError(f"{_PREFIX}{name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
        return cls(**values)  # type: ignore[arg-type]
