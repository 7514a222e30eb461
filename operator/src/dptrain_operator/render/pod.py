"""The one hardened pod: every workload the operator runs (a job's trainer ranks, a federation's coordinator, a
site's SuperNode) is built here, and supplies only its container's command, env, ports and mounts, its volumes,
its metadata and any extra pod fields (a gang's DNS name).

These pods read patient data or hold what was trained on it, so each gets the same lock-down: no API token, no
service links, no root, no writable root filesystem, no capabilities, no privilege escalation, the runtime's seccomp
profile, requests equal to limits, and a termination message read from a file (never the log's tail, which may
name what only the data's steward should read).
"""

from __future__ import annotations

from typing import Any, Final

from dptrain_api import DEFAULT_TERMINATION_MESSAGE_PATH, ResourcesSpec
from dptrain_operator.settings import Settings

__all__ = ["CONTAINER_HARDENING", "hardened_pod", "pod_hardening", "spec_only"]

CONTAINER_HARDENING: Final[dict[str, Any]] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""Every container's securityContext."""


def pod_hardening(settings: Settings) -> dict[str, Any]:
    """The pod-level fields every workload pod carries (tests compare rendered pods against this)."""
    user = settings.trainer_run_as_user
    return {
        "restartPolicy": "Never",
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": user,
            "runAsGroup": user,
            "fsGroup": user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _limits(resources: ResourcesSpec) -> dict[str, str]:
    limits = {"cpu": str(resources.cpu), "memory": str(resources.memory)}
    if resources.gpus > 0:
        limits["nvidia.com/gpu"] = str(resources.gpus)
    return limits


def _placement(resources: ResourcesSpec) -> dict[str, Any]:
    placement: dict[str, Any] = {}
    if resources.node_selector:
        placement["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        placement["tolerations"] = [toleration.to_wire() for toleration in resources.tolerations]
    if resources.priority_class_name:
        placement["priorityClassName"] = resources.priority_class_name
    return placement


def hardened_pod(
    *,
    metadata: dict[str, Any],
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    image: str | None,
    resources: ResourcesSpec,
    settings: Settings,
    extra_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A locked-down pod running one container. ``container`` gives its name, command, env, ports and
    volumeMounts; image (unset: the operator's trainer image), resources and hardening come from here and cannot be
    overridden by it."""
    limits = _limits(resources)
    full_container = {
        **container,
        "image": image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": {"requests": dict(limits), "limits": limits},
        "terminationMessagePath": DEFAULT_TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
        "securityContext": {**CONTAINER_HARDENING},
    }
    spec = {
        **(extra_spec or {}),
        **_placement(resources),
        "containers": [full_container],
        "volumes": volumes,
        **pod_hardening(settings),
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def spec_only(document: dict[str, Any]) -> dict[str, Any]:
    """A resource reduced to what a pod may see of it: kind, name, namespace, uid and spec (never its status or
    annotations, which other parties can write)."""
    metadata = document.get("metadata", {})
    return {
        "apiVersion": document["apiVersion"],
        "kind": document["kind"],
        "metadata": {key: metadata[key] for key in ("name", "namespace", "uid") if key in metadata},
        "spec": document["spec"],
    }
