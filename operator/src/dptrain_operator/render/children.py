"""Pure builders of the objects a DPTrainingJob runs as: checkpoint PVC and trainer Pods.

They return plain manifests (dicts), so unit tests validate them against the real Kubernetes
schemas without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from dptrain_api import (
    DEFAULT_MASTER_PORT,
    DEFAULT_TERMINATION_MESSAGE_PATH,
    DistributedEnv,
    DPTrainingJob,
    PodEnv,
    PrivateDataset,
    ReservedMechanisms,
)
from dptrain_operator.render.labels import (
    ATTEMPT_LABEL,
    JOB_UID_LABEL,
    WORKER_LABEL,
    checkpoint_claim_name,
    child_metadata,
    child_name,
    gang_policy_name,
    gang_service_name,
    pod_name,
)
from dptrain_operator.render.pod import hardened_pod, spec_only
from dptrain_operator.settings import Settings

TERMINATION_MESSAGE_PATH = DEFAULT_TERMINATION_MESSAGE_PATH
TRAINER_CONTAINER = "trainer"


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_TOTAL = "kueue.x-k8s.io/pod-group-total-count"

TRAINER_FINALIZER = "dptrain.io/record-outcome"
"""Kept on trainer pods until the operator has recorded how the pod ended (its termination message)."""


def job_manifest(job: DPTrainingJob, dataset: PrivateDataset | None) -> str:
    """The manifest the trainer runs (the job, plus the PrivateDataset its datasetRef names), as YAML. It goes
    into the pod's environment: part of the immutable pod spec, so nobody can swap it after admission."""
    documents = [spec_only(job.to_wire())]
    if dataset is not None:
        documents.append(spec_only(dataset.to_wire()))
    return yaml.safe_dump_all(documents, sort_keys=False)


def checkpoint_claim(job: DPTrainingJob) -> dict[str, Any]:
    """ReadWriteOnce claim for checkpoints and the privacy journal; it outlives pods (resume after failure)."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(job.spec.checkpoint.size)}},
    }
    if job.spec.checkpoint.storage_class_name:
        spec["storageClassName"] = job.spec.checkpoint.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": child_metadata(job, checkpoint_claim_name(job.metadata.name or "")),
        "spec": spec,
    }


@dataclass(frozen=True)
class PodContract:
    """What the operator hands one trainer pod, from its own (trusted) ledger entry."""

    pod_number: int
    """The n-th pod of the job (its name)."""
    attempt: int
    """1 + the earlier pods whose trainer ran: any attempt > 1 must find their privacy journal."""
    reserved: ReservedMechanisms
    identity: str
    """The dataset identity the job was admitted for."""
    worker: int = 0
    """Index in the attempt's gang; 0 is the leader (rank 0: journal, checkpoint claim, metrics, report)."""


def trainer_pod(
    job: DPTrainingJob, *, dataset: PrivateDataset | None, contract: PodContract, settings: Settings
) -> dict[str, Any]:
    """A trainer pod of one attempt (worker ``contract.worker`` of its gang). Locked down: it reads patient data,
    so it gets no API token, no root, no writable root filesystem, no capabilities and no privilege escalation.
    The leader's finalizer keeps it until the operator has read how it ended (its report is the charge); the
    other workers mount no checkpoint claim and report nothing the ledger needs."""
    name = job.metadata.name or ""
    leader = contract.worker == 0
    volumes, mounts = _volumes(job, dataset, settings, leader=leader)
    container = _trainer_container(mounts=mounts, settings=settings)
    container["env"] = _trainer_env(job, dataset=dataset, contract=contract, settings=settings)
    extra: dict[str, Any] = {}
    if job.spec.distributed.workers > 1:
        container["env"] += _distributed_env(job, contract)
        container["ports"].append({"name": "rendezvous", "containerPort": DEFAULT_MASTER_PORT, "protocol": "TCP"})
        # DNS as Kubeflow's: worker-<i>.<headless service>
        extra = {"hostname": f"worker-{contract.worker}", "subdomain": gang_service_name(name)}
    labels = {ATTEMPT_LABEL: str(contract.pod_number), WORKER_LABEL: str(contract.worker)}
    group = _kueue_pod_group(job, contract)
    metadata = child_metadata(job, pod_name(name, contract.pod_number, contract.worker), extra_labels=labels | group)
    if group:
        metadata["annotations"] = {KUEUE_POD_GROUP_TOTAL: str(job.spec.distributed.workers)}
    if leader:
        metadata["finalizers"] = [TRAINER_FINALIZER]
        metadata["annotations"] = {
            **metadata.get("annotations", {}),
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(settings.trainer_metrics_port),
        }
    return hardened_pod(
        metadata=metadata,
        container=container,
        volumes=volumes,
        image=job.spec.image,
        resources=job.spec.resources,
        settings=settings,
        extra_spec=extra,
    )


def _kueue_pod_group(job: DPTrainingJob, contract: PodContract) -> dict[str, str]:
    """A gang queued by Kueue is one pod group per attempt: Kueue admits (ungates) all of its pods or none."""
    if job.spec.distributed.workers <= 1 or KUEUE_QUEUE_LABEL not in job.metadata.labels:
        return {}
    return {KUEUE_POD_GROUP_LABEL: child_name(job.metadata.name or "", f"attempt-{contract.pod_number}")}


def _distributed_env(job: DPTrainingJob, contract: PodContract) -> list[Any]:
    """torch.distributed.run's environment (Kubeflow's PET_* names): N pods, one node rank each, rank 0's address.
    The leader binds the rendezvous itself (its own pod IP); the others dial its DNS name in the headless Service
    (as JobSet does), so every pod of the gang can be created, queued and admitted at once."""
    master: dict[str, Any] = (
        {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        if contract.worker == 0
        else {"value": gang_leader_address(job)}
    )
    return [
        {"name": DistributedEnv.NNODES, "value": str(job.spec.distributed.workers)},
        {"name": DistributedEnv.NPROC_PER_NODE, "value": str(max(job.spec.resources.gpus, 1))},
        {"name": DistributedEnv.NODE_RANK, "value": str(contract.worker)},
        {"name": DistributedEnv.MASTER_ADDR, **master},
        {"name": DistributedEnv.MASTER_PORT, "value": str(DEFAULT_MASTER_PORT)},
    ]


def gang_leader_address(job: DPTrainingJob) -> str:
    """The leader's DNS name: ``worker-0.<headless service>.<namespace>.svc`` (resolvable while it is not ready)."""
    return f"worker-0.{gang_service_name(job.metadata.name or '')}.{job.metadata.namespace}.svc"


def gang_service(job: DPTrainingJob) -> dict[str, Any]:
    """The headless Service of a multi-worker job (stable DNS names for its pods, ready or not)."""
    name = job.metadata.name or ""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, gang_service_name(name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_UID_LABEL: job.metadata.uid or ""},
            "ports": [{"name": "rendezvous", "port": DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        },
    }


def gang_network_policy(job: DPTrainingJob) -> dict[str, Any]:
    """Lets the pods of one multi-worker job reach each other on any port (the rendezvous and the collectives'
    own ports), added to the chart's DNS-only trainer policy; pods of other jobs stay unreachable."""
    own_pods = {"podSelector": {"matchLabels": {JOB_UID_LABEL: job.metadata.uid or ""}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(job, gang_policy_name(job.metadata.name or "")),
        "spec": {
            "podSelector": {"matchLabels": {JOB_UID_LABEL: job.metadata.uid or ""}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [own_pods]}],
            "egress": [{"to": [own_pods]}],
        },
    }


def _volumes(
    job: DPTrainingJob, dataset: PrivateDataset | None, settings: Settings, *, leader: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the trainer's mounts: data read-only, checkpoint and scratch writable. Only the
    leader mounts the checkpoint claim (ReadWriteOnce; it alone writes the journal): the others get an emptyDir."""
    checkpoint = (
        _checkpoint_volume(job)
        if leader
        else {"name": "checkpoint", "emptyDir": {"sizeLimit": str(job.spec.checkpoint.size)}}
    )
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}, checkpoint]
    mounts: list[dict[str, Any]] = [
        {"name": "scratch", "mountPath": settings.scratch_mount_path},
        {"name": "checkpoint", "mountPath": settings.checkpoint_mount_path},
    ]
    if dataset is not None and dataset.spec.source.file is not None:
        claim = dataset.spec.source.file.claim_name
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": settings.data_mount_path, "readOnly": True})
    return volumes, mounts


def _trainer_env(
    job: DPTrainingJob, *, dataset: PrivateDataset | None, contract: PodContract, settings: Settings
) -> list[Any]:
    cpu_limit = {"resourceFieldRef": {"containerName": TRAINER_CONTAINER, "resource": "limits.cpu", "divisor": "1"}}
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    return [
        {"name": "POD_IP", "valueFrom": pod_ip},
        # The metrics server binds to the pod IP only (not 0.0.0.0): nothing else in the pod listens.
        {"name": PodEnv.METRICS_ADDRESS, "valueFrom": pod_ip},
        # Threads = CPU limit, never more: oversubscribed OpenMP made small DP steps ~50x slower.
        {"name": "OMP_NUM_THREADS", "valueFrom": cpu_limit},
        {"name": PodEnv.CPU_LIMIT, "valueFrom": cpu_limit},
        {"name": PodEnv.JOB_NAME, "value": job.metadata.name or ""},
        {"name": PodEnv.JOB_NAMESPACE, "value": job.metadata.namespace or "default"},
        {"name": PodEnv.JOB_UID, "value": job.metadata.uid or ""},
        {"name": PodEnv.ATTEMPT, "value": str(contract.attempt)},
        {"name": PodEnv.RESERVED_MECHANISM, "value": contract.reserved.model_dump_json(by_alias=True)},
        {"name": PodEnv.DATASET_IDENTITY, "value": contract.identity},
        {"name": PodEnv.JOB_MANIFEST, "value": job_manifest(job, dataset)},
        {"name": "HOME", "value": settings.scratch_mount_path},
        {"name": "MPLCONFIGDIR", "value": settings.scratch_mount_path},
    ]


def _trainer_container(*, mounts: list[Any], settings: Settings) -> dict[str, Any]:
    command = [
        "dptrain",
        "run",
        "--from-env",
        PodEnv.JOB_MANIFEST.value,
        "--output",
        settings.checkpoint_mount_path,
        "--data-dir",
        settings.data_mount_path,
        "--metrics-port",
        str(settings.trainer_metrics_port),
        "--termination-message-path",
        DEFAULT_TERMINATION_MESSAGE_PATH,
        "--quiet",
    ]
    return {
        "name": TRAINER_CONTAINER,
        "command": command,
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
    }


def _checkpoint_volume(job: DPTrainingJob) -> dict[str, Any]:
    if job.spec.checkpoint.volume == "emptyDir":
        return {"name": "checkpoint", "emptyDir": {"sizeLimit": str(job.spec.checkpoint.size)}}
    return {
        "name": "checkpoint",
        "persistentVolumeClaim": {"claimName": checkpoint_claim_name(job.metadata.name or "")},
    }
