"""Pure builders of the objects a federation runs as: the coordinator's claim, Service and pod (Flower's SuperLink and
the ServerApp), the DPFederatedSite of each in-cluster site, and a site's journal claim and SuperNode pod.

Like the trainer pods, SuperNode pods read patient data, so they are locked down the same way (no API token, no
root, read-only root filesystem, no capabilities), carry the ``dptrain.io/record-outcome`` finalizer (their charge is
recorded before they go) and get their reserved mechanisms, dataset identity and attempt from the operator.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import yaml

from dptrain_api import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    SUPERNODE_RUNTIME_PORT,
    DPFederatedJob,
    DPFederatedSite,
    FederationSite,
    PodEnv,
    PrivateDataset,
    ReservedMechanisms,
    ResourcesSpec,
    SuperLinkConnection,
    site_object,
)
from dptrain_operator.render.children import TRAINER_FINALIZER
from dptrain_operator.render.labels import ATTEMPT_LABEL, JOB_NAME_LABEL, JOB_UID_LABEL, MANAGED_BY, child_name
from dptrain_operator.render.pod import hardened_pod, spec_only
from dptrain_operator.settings import Settings

__all__ = [
    "FEDERATION_NAME_LABEL",
    "FEDERATION_UID_LABEL",
    "ROLE_LABEL",
    "coordinator_claim",
    "coordinator_claim_name",
    "coordinator_pod",
    "coordinator_pod_name",
    "site_claim",
    "site_claim_name",
    "site_manifest",
    "site_name",
    "site_resource",
    "superlink_address",
    "superlink_service",
    "superlink_service_name",
    "supernode_pod",
    "supernode_pod_name",
]

ROLE_LABEL: Final = "dptrain.io/role"
FEDERATION_UID_LABEL: Final = "dptrain.io/federation-uid"
FEDERATION_NAME_LABEL: Final = "dptrain.io/federation"
CONTAINER: Final = "flower"
TLS_MOUNT: Final = "/var/run/dptrain/superlink-tls"
CA_MOUNT: Final = "/var/run/dptrain/superlink-ca"
KEY_MOUNT: Final = "/var/run/dptrain/supernode-key"
_LABEL_VALUE = 63

Owner = DPFederatedJob | DPFederatedSite


# --- names ---------------------------------------------------------------------------------------------------------


def coordinator_claim_name(job_name: str) -> str:
    return child_name(job_name, "federation", limit=253)


def superlink_service_name(job_name: str) -> str:
    return child_name(job_name, "superlink")


def coordinator_pod_name(job_name: str, number: int) -> str:
    return child_name(job_name, f"coordinator-{number}")


def site_name(job_name: str, site: str) -> str:
    """The DPFederatedSite an in-cluster site gets (in its own namespace)."""
    return child_name(job_name, site, limit=253)


def site_claim_name(site_object_name: str) -> str:
    return child_name(site_object_name, "journal", limit=253)


def supernode_pod_name(site_object_name: str, number: int) -> str:
    return child_name(site_object_name, f"supernode-{number}")


def superlink_address(job: DPFederatedJob, settings: Settings) -> str:
    """host:port in-cluster sites dial: the SuperLink's Service (or, with fake kubelets, the loopback)."""
    port = job.spec.superlink.port
    if settings.federation_loopback:
        return f"127.0.0.1:{port}"
    return f"{superlink_service_name(job.metadata.name or '')}.{job.metadata.namespace}.svc:{port}"


# --- metadata ------------------------------------------------------------------------------------------------------


def _labels(owner: Owner, role: str) -> dict[str, str]:
    name = owner.metadata.name or ""
    labels = {
        "app.kubernetes.io/name": f"dptrain-{role}",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "dptrain",
        JOB_UID_LABEL: owner.metadata.uid or "",
        ROLE_LABEL: role,
    }
    if len(name) <= _LABEL_VALUE:
        labels[JOB_NAME_LABEL] = name
    return labels


def _metadata(owner: Owner, name: str, role: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.metadata.namespace,
        "labels": {**_labels(owner, role), **(extra or {})},
        "ownerReferences": [
            {
                "apiVersion": owner.api_version,
                "kind": owner.kind,
                "name": owner.metadata.name,
                "uid": owner.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _claim(owner: Owner, name: str, role: str) -> dict[str, Any]:
    checkpoint = owner.spec.checkpoint
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(checkpoint.size)}},
    }
    if checkpoint.storage_class_name:
        spec["storageClassName"] = checkpoint.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _metadata(owner, name, role), "spec": spec}


def _pod(
    owner: Owner,
    *,
    name: str,
    role: str,
    number: int,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    resources: ResourcesSpec,
    settings: Settings,
    finalizer: bool,
) -> dict[str, Any]:
    metadata = _metadata(owner, name, role, {ATTEMPT_LABEL: str(number)})
    if finalizer:
        metadata["finalizers"] = [TRAINER_FINALIZER]
    metadata["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.trainer_metrics_port)}
    return hardened_pod(
        metadata=metadata,
        container={"name": CONTAINER, **container},
        volumes=volumes,
        image=owner.spec.image,
        resources=resources,
        settings=settings,
    )


def _common_env(owner: Owner, *, attempt: int, manifest: str, settings: Settings) -> list[dict[str, Any]]:
    cpu_limit = {"resourceFieldRef": {"containerName": CONTAINER, "resource": "limits.cpu", "divisor": "1"}}
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    return [
        {"name": "POD_IP", "valueFrom": pod_ip},
        {"name": PodEnv.METRICS_ADDRESS, "valueFrom": pod_ip},
        {"name": "OMP_NUM_THREADS", "valueFrom": cpu_limit},
        {"name": PodEnv.CPU_LIMIT, "valueFrom": cpu_limit},
        {"name": PodEnv.JOB_NAME, "value": owner.metadata.name or ""},
        {"name": PodEnv.JOB_NAMESPACE, "value": owner.metadata.namespace or "default"},
        {"name": PodEnv.JOB_UID, "value": owner.metadata.uid or ""},
        {"name": PodEnv.ATTEMPT, "value": str(attempt)},
        {"name": PodEnv.JOB_MANIFEST, "value": manifest},
        {"name": "HOME", "value": settings.scratch_mount_path},
        {"name": "MPLCONFIGDIR", "value": settings.scratch_mount_path},
        {"name": "FLWR_TELEMETRY_ENABLED", "value": "0"},
        {"name": "FLWR_DISABLE_UPDATE_CHECK", "value": "1"},
    ]


# --- the coordinator -----------------------------------------------------------------------------------------------


def coordinator_claim(job: DPFederatedJob) -> dict[str, Any]:
    """The coordinator's volume: the SuperLink's database, the per-round global checkpoints, status and report."""
    return _claim(job, coordinator_claim_name(job.metadata.name or ""), "coordinator")


def superlink_service(job: DPFederatedJob) -> dict[str, Any]:
    """The SuperLink's Service: the one port sites dial (Flower's Fleet API; its Control and Runtime APIs share it)."""
    port = job.spec.superlink.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, superlink_service_name(job.metadata.name or ""), "coordinator"),
        "spec": {
            "type": job.spec.superlink.service_type,
            "selector": {JOB_UID_LABEL: job.metadata.uid or "", ROLE_LABEL: "coordinator"},
            "ports": [{"name": "superlink", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def coordinator_pod(
    job: DPFederatedJob, *, number: int, expected_sites: list[str], settings: Settings
) -> dict[str, Any]:
    """The coordinator of one attempt: ``dptrain federation server`` (Flower's SuperLink, the run, its checkpoints);
    a later attempt resumes from the last round's global checkpoint on the claim."""
    spec = job.spec
    command = [
        "dptrain",
        "federation",
        "server",
        "--from-env",
        PodEnv.JOB_MANIFEST.value,
        "--output",
        settings.checkpoint_mount_path,
        "--port",
        str(spec.superlink.port),
        "--metrics-port",
        str(settings.trainer_metrics_port),
        "--join-timeout",
        f"{settings.federation_join_timeout_seconds:g}",
        "--termination-message-path",
        DEFAULT_TERMINATION_MESSAGE_PATH,
        "--quiet",
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "federation", "persistentVolumeClaim": {"claimName": coordinator_claim_name(job.metadata.name or "")}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "scratch", "mountPath": settings.scratch_mount_path},
        {"name": "federation", "mountPath": settings.checkpoint_mount_path},
    ]
    if not spec.superlink.insecure:
        assert spec.superlink.tls_secret_name is not None  # the schema requires it unless insecure
        command += ["--tls-dir", TLS_MOUNT]
        volumes.append({"name": "superlink-tls", "secret": {"secretName": spec.superlink.tls_secret_name}})
        mounts.append({"name": "superlink-tls", "mountPath": TLS_MOUNT, "readOnly": True})
    manifest = yaml.safe_dump(spec_only(job.to_wire()), sort_keys=False)
    env = _common_env(job, attempt=number, manifest=manifest, settings=settings)
    env.append({"name": PodEnv.FEDERATION_EXPECTED_SITES, "value": ",".join(expected_sites)})
    container = {
        "command": command,
        "env": env,
        "ports": [
            {"name": "superlink", "containerPort": spec.superlink.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"},
        ],
        "volumeMounts": mounts,
    }
    return _pod(
        job,
        name=coordinator_pod_name(job.metadata.name or "", number),
        role="coordinator",
        number=number,
        container=container,
        volumes=volumes,
        resources=spec.resources,
        settings=settings,
        finalizer=False,
    )


def site_resource(job: DPFederatedJob, site: FederationSite, *, settings: Settings) -> DPFederatedSite:
    """The DPFederatedSite of an in-cluster site, as the coordinator creates it in the site's namespace."""
    superlink = job.spec.superlink
    connection = SuperLinkConnection(
        address=superlink_address(job, settings),
        insecure=superlink.insecure,
        # In-cluster sites use the same Secrets' names in their own namespace (the steward copies the CA and creates
        # the SuperNode key there): the coordinator never reads or copies a Secret.
        ca_secret_name=None if superlink.insecure else f"{job.metadata.name}-superlink-ca",
        auth_key_secret_name=f"{job.metadata.name}-{site.name}-supernode-key"
        if superlink.node_authentication
        else None,
    )
    return site_object(job, site, superlink=connection, name=site_name(job.metadata.name or "", site.name))


def site_manifest(job: DPFederatedJob, site: FederationSite, *, settings: Settings) -> dict[str, Any]:
    """The DPFederatedSite manifest (labelled with the federation; cross-namespace: no owner reference)."""
    document = site_resource(job, site, settings=settings).to_wire()
    document.pop("status", None)
    document["metadata"]["labels"] = {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "dptrain",
        FEDERATION_UID_LABEL: job.metadata.uid or "",
        FEDERATION_NAME_LABEL: _label_value(f"{job.metadata.namespace}.{job.metadata.name}"),
    }
    return document


def _label_value(text: str) -> str:
    if len(text) <= _LABEL_VALUE:
        return text
    return text[: _LABEL_VALUE - 11].rstrip("-.") + "-" + hashlib.sha256(text.encode()).hexdigest()[:10]


# --- a site --------------------------------------------------------------------------------------------------------


def site_claim(site: DPFederatedSite) -> dict[str, Any]:
    """The site's volume: its privacy journal, its checkpoint and per-round updates, the final global model."""
    return _claim(site, site_claim_name(site.metadata.name or ""), "supernode")


def supernode_pod(
    site: DPFederatedSite,
    *,
    dataset: PrivateDataset,
    number: int,
    attempt: int,
    reserved: ReservedMechanisms,
    identity: str,
    settings: Settings,
) -> dict[str, Any]:
    """The site's SuperNode of one attempt: ``dptrain federation site`` (Flower's SuperNode dialling out to the
    SuperLink; its ClientApps run dptrain's DP-SGD engine on the mounted data, charged in the site's journal)."""
    spec = site.spec
    connection = spec.superlink
    runtime_host = "$(POD_IP)" if settings.federation_loopback else "127.0.0.1"
    command = [
        "dptrain",
        "federation",
        "site",
        "--from-env",
        PodEnv.JOB_MANIFEST.value,
        "--output",
        settings.checkpoint_mount_path,
        "--data-dir",
        settings.data_mount_path,
        "--runtime-host",
        runtime_host,
        "--runtime-port",
        str(SUPERNODE_RUNTIME_PORT),
        "--metrics-port",
        str(settings.trainer_metrics_port),
        "--termination-message-path",
        DEFAULT_TERMINATION_MESSAGE_PATH,
        "--quiet",
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "journal", "persistentVolumeClaim": {"claimName": site_claim_name(site.metadata.name or "")}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "scratch", "mountPath": settings.scratch_mount_path},
        {"name": "journal", "mountPath": settings.checkpoint_mount_path},
    ]
    if dataset.spec.source.file is not None:
        claim = dataset.spec.source.file.claim_name
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": settings.data_mount_path, "readOnly": True})
    if not connection.insecure:
        assert connection.ca_secret_name is not None
        command += ["--ca", f"{CA_MOUNT}/ca.crt"]
        volumes.append(
            {
                "name": "superlink-ca",
                "secret": {"secretName": connection.ca_secret_name, "items": [{"key": "ca.crt", "path": "ca.crt"}]},
            }
        )
        mounts.append({"name": "superlink-ca", "mountPath": CA_MOUNT, "readOnly": True})
    if connection.auth_key_secret_name is not None:
        command += ["--auth-key", f"{KEY_MOUNT}/supernode.key"]
        volumes.append(
            {
                "name": "supernode-key",
                "secret": {
                    "secretName": connection.auth_key_secret_name,
                    "items": [{"key": "ssh-privatekey", "path": "supernode.key"}],
                    "defaultMode": 0o400,
                },
            }
        )
        mounts.append({"name": "supernode-key", "mountPath": KEY_MOUNT, "readOnly": True})
    documents = [spec_only(site.to_wire()), spec_only(dataset.to_wire())]
    manifest = yaml.safe_dump_all(documents, sort_keys=False)
    env = _common_env(site, attempt=attempt, manifest=manifest, settings=settings)
    env += [
        {"name": PodEnv.RESERVED_MECHANISM, "value": reserved.model_dump_json(by_alias=True)},
        {"name": PodEnv.DATASET_IDENTITY, "value": identity},
    ]
    container = {
        "command": command,
        "env": env,
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
    }
    return _pod(
        site,
        name=supernode_pod_name(site.metadata.name or "", number),
        role="supernode",
        number=number,
        container=container,
        volumes=volumes,
        resources=spec.resources,
        settings=settings,
        finalizer=True,
    )
