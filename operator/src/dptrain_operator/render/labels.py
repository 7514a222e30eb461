"""Names and labels of the objects the operator creates for a job (pure functions)."""

from __future__ import annotations

import hashlib
from typing import Any

from dptrain_api import DPTrainingJob

MANAGED_BY = "dptrain-operator"
JOB_UID_LABEL = "dptrain.io/job-uid"
JOB_NAME_LABEL = "dptrain.io/job-name"
ATTEMPT_LABEL = "dptrain.io/attempt"
WORKER_LABEL = "dptrain.io/worker"
"""The pod's index in its attempt's gang (0: the leader, rank 0, which owns the journal and the checkpoint)."""
# Labels copied from the job onto its pods so queueing systems (Kueue) and policies can select them.
PASS_THROUGH_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")
_MAX_LABEL_VALUE = 63


def job_labels(job: DPTrainingJob) -> dict[str, str]:
    """Labels on every child object of the job."""
    name = job.metadata.name or ""
    labels = {
        "app.kubernetes.io/name": "dptrain-trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "dptrain",
        JOB_UID_LABEL: job.metadata.uid or "",
    }
    if len(name) <= _MAX_LABEL_VALUE:
        labels[JOB_NAME_LABEL] = name
    for key in PASS_THROUGH_LABELS:
        if key in job.metadata.labels:
            labels[key] = job.metadata.labels[key]
    return labels


def owned_by(manifest: dict[str, Any], uid: str) -> bool:
    """True if ``manifest`` names the object with ``uid`` as its controller (the operator created it for that job)."""
    references = (manifest.get("metadata") or {}).get("ownerReferences") or []
    return any(reference.get("uid") == uid and reference.get("controller") for reference in references)


def owner_reference(job: DPTrainingJob) -> dict[str, Any]:
    return {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: DPTrainingJob, name: str, *, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {**job_labels(job), **(extra_labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


def child_name(job_name: str, suffix: str, *, limit: int = _MAX_LABEL_VALUE) -> str:
    """``<job>-<suffix>``, at most ``limit`` characters (a DNS label, so pods can be hostnames). A job name too
    long for it is cut and followed by a hash of the whole name: deterministic, and two long names sharing a
    prefix never get the same child."""
    name = f"{job_name}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:10]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{job_name[:keep].rstrip('-.')}-{digest}-{suffix}"


def checkpoint_claim_name(job_name: str) -> str:
    return child_name(job_name, "checkpoint", limit=253)


def pod_name(job_name: str, attempt: int, worker: int = 0) -> str:
    """The leader of attempt n keeps the single-worker name ``<job>-attempt-<n>``; worker i > 0 of it is
    ``<job>-attempt-<n>-worker-<i>``."""
    if worker == 0:
        return child_name(job_name, f"attempt-{attempt}")
    return child_name(job_name, f"attempt-{attempt}-worker-{worker}")


def gang_service_name(job_name: str) -> str:
    """The headless Service of a multi-worker job: pod i answers as ``worker-<i>.<service>``."""
    return child_name(job_name, "workers")


def gang_policy_name(job_name: str) -> str:
    """The NetworkPolicy that lets a multi-worker job's pods reach each other (and nothing else more)."""
    return child_name(job_name, "gang", limit=253)
