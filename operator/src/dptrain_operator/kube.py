"""A thin, typed wrapper over the Kubernetes API calls the operator makes (and nothing else: the Helm
chart's RBAC test derives the ClusterRole from the verbs used here)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dptrain_api import API_GROUP, API_VERSION

JOBS = "dptrainingjobs"
DATASETS = "privatedatasets"


class ConflictError(Exception):
    """The object changed since it was read (HTTP 409): re-read and retry."""


def load_api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the local kubeconfig (`KUBECONFIG`)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _ignore(status: int, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ApiException as error:
        if error.status == status:
            return None
        raise


class KubeApi(Protocol):
    """Every API call the reconcilers make (the real :class:`Kube`, or an in-memory fake in unit tests)."""

    def get_dataset(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def replace_dataset_status(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...
    def delete_job(self, namespace: str, name: str) -> None: ...
    def create_if_absent(self, manifest: dict[str, Any]) -> bool: ...
    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...
    def delete_pod(self, namespace: str, name: str) -> None: ...
    def delete_config_map(self, namespace: str, name: str) -> None: ...
    def claim_uid(self, namespace: str, name: str) -> str | None: ...
    def delete_claim(self, namespace: str, name: str) -> None: ...


class Kube:
    """The real API: the kubernetes client, plain JSON in and out."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # --- dptrain resources -------------------------------------------------------------------
    def get_dataset(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _ignore(
            404, lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, DATASETS, name)
        )
        return found

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _ignore(
            404, lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, JOBS, name)
        )
        return found

    def replace_dataset_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write status only if nobody changed the dataset since `body` was read (resourceVersion precondition)."""
        metadata = body["metadata"]
        try:
            result: dict[str, Any] = self.custom.replace_namespaced_custom_object_status(
                API_GROUP, API_VERSION, metadata["namespace"], DATASETS, metadata["name"], body
            )
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(metadata["name"]) from None
            raise
        return result

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        _ignore(
            404,
            lambda: self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, JOBS, name, {"status": status}
            ),
        )

    def delete_job(self, namespace: str, name: str) -> None:
        _ignore(
            404,
            lambda: self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, JOBS, name, _preload_content=False
            ),
        )

    # --- children --------------------------------------------------------------------------
    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Create the object; False if it already exists (reconciliation is idempotent)."""
        namespace = manifest["metadata"]["namespace"]
        creators: dict[str, Callable[[], Any]] = {
            "Pod": lambda: self.core.create_namespaced_pod(namespace, manifest, _preload_content=False),
            "ConfigMap": lambda: self.core.create_namespaced_config_map(namespace, manifest, _preload_content=False),
            "PersistentVolumeClaim": lambda: self.core.create_namespaced_persistent_volume_claim(
                namespace, manifest, _preload_content=False
            ),
        }
        try:
            creators[manifest["kind"]]()
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        response = self.core.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False)
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def delete_pod(self, namespace: str, name: str) -> None:
        _ignore(404, lambda: self.core.delete_namespaced_pod(name, namespace, _preload_content=False))

    def delete_config_map(self, namespace: str, name: str) -> None:
        _ignore(404, lambda: self.core.delete_namespaced_config_map(name, namespace, _preload_content=False))

    def claim_uid(self, namespace: str, name: str) -> str | None:
        response = _ignore(
            404,
            lambda: self.core.read_namespaced_persistent_volume_claim(name, namespace, _preload_content=False),
        )
        return None if response is None else str(json.loads(response.data)["metadata"]["uid"])

    def delete_claim(self, namespace: str, name: str) -> None:
        _ignore(
            404, lambda: self.core.delete_namespaced_persistent_volume_claim(name, namespace, _preload_content=False)
        )
