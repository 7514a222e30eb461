"""A thin, typed wrapper over the Kubernetes API calls the operator makes (and nothing else: the Helm chart's
RBAC test derives the ClusterRole from the verbs used here)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dptrain_api import API_GROUP, API_VERSION

JOBS = "dptrainingjobs"
DATASETS = "privatedatasets"
LEDGERS = "privacyledgers"
FEDERATIONS = "dpfederatedjobs"
SITES = "dpfederatedsites"


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


def _precondition(name: str, call: Callable[[], Any]) -> dict[str, Any]:
    """``call()``, a write carrying a resourceVersion: 409 becomes :class:`ConflictError`."""
    try:
        result: dict[str, Any] = call()
    except ApiException as error:
        if error.status == 409:
            raise ConflictError(name) from None
        raise
    return result


def _json(response: Any) -> dict[str, Any] | None:
    return None if response is None else dict(json.loads(response.data))


class KubeApi(Protocol):
    """Every API call the reconcilers make (the real :class:`Kube`, or an in-memory fake in unit tests)."""

    def get_dataset(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def replace_dataset_status(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None: ...
    def delete_job(self, namespace: str, name: str) -> None: ...
    def get_ledger(self, name: str) -> dict[str, Any] | None: ...
    def list_ledgers(self) -> list[dict[str, Any]]: ...
    def create_ledger(self, manifest: dict[str, Any]) -> bool: ...
    def replace_ledger_status(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def create_if_absent(self, manifest: dict[str, Any]) -> bool: ...
    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...
    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete_pod(self, namespace: str, name: str) -> None: ...
    def remove_pod_finalizer(self, pod: dict[str, Any], finalizer: str) -> None: ...
    def get_claim(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete_claim(self, namespace: str, name: str) -> None: ...
    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    def delete_child(self, kind: str, namespace: str, name: str) -> None: ...
    def get_federation(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_federation_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...
    def delete_federation(self, namespace: str, name: str) -> None: ...
    def get_site(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_site_status(self, namespace: str, name: str, status: dict[str, Any]) -> None: ...
    def patch_site_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None: ...
    def delete_site(self, namespace: str, name: str) -> None: ...
    def delete_service(self, namespace: str, name: str) -> None: ...


class Kube:
    """The real API: the kubernetes client, plain JSON in and out."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)

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
        return _precondition(
            metadata["name"],
            lambda: self.custom.replace_namespaced_custom_object_status(
                API_GROUP, API_VERSION, metadata["namespace"], DATASETS, metadata["name"], body
            ),
        )

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status; the job as written (None: it is gone)."""
        written: dict[str, Any] | None = _ignore(
            404,
            lambda: self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, JOBS, name, {"status": status}
            ),
        )
        return written

    def delete_job(self, namespace: str, name: str) -> None:
        _ignore(
            404,
            lambda: self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, JOBS, name, _preload_content=False
            ),
        )

    # --- ledgers (cluster-scoped, the operator's own) ----------------------------------------------------
    def get_ledger(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _ignore(
            404, lambda: self.custom.get_cluster_custom_object(API_GROUP, API_VERSION, LEDGERS, name)
        )
        return found

    def list_ledgers(self) -> list[dict[str, Any]]:
        listed: dict[str, Any] = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, LEDGERS)
        return list(listed.get("items", []))

    def create_ledger(self, manifest: dict[str, Any]) -> bool:
        """Create the ledger; False if it already exists."""
        created = _ignore(
            409, lambda: self.custom.create_cluster_custom_object(API_GROUP, API_VERSION, LEDGERS, manifest)
        )
        return created is not None

    def replace_ledger_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write the ledger's status only if nobody changed it since `body` was read."""
        name = body["metadata"]["name"]
        return _precondition(
            name,
            lambda: self.custom.replace_cluster_custom_object_status(API_GROUP, API_VERSION, LEDGERS, name, body),
        )

    # --- children --------------------------------------------------------------------------
    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Create the object; False if it already exists (reconciliation is idempotent)."""
        namespace = manifest["metadata"]["namespace"]
        creators: dict[str, Callable[[], Any]] = {
            "Pod": lambda: self.core.create_namespaced_pod(namespace, manifest, _preload_content=False),
            "PersistentVolumeClaim": lambda: self.core.create_namespaced_persistent_volume_claim(
                namespace, manifest, _preload_content=False
            ),
            "Service": lambda: self.core.create_namespaced_service(namespace, manifest, _preload_content=False),
            "NetworkPolicy": lambda: self.networking.create_namespaced_network_policy(
                namespace, manifest, _preload_content=False
            ),
            "DPFederatedSite": lambda: self.custom.create_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, SITES, manifest, _preload_content=False
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

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _json(_ignore(404, lambda: self.core.read_namespaced_pod(name, namespace, _preload_content=False)))

    def delete_pod(self, namespace: str, name: str) -> None:
        _ignore(404, lambda: self.core.delete_namespaced_pod(name, namespace, _preload_content=False))

    def remove_pod_finalizer(self, pod: dict[str, Any], finalizer: str) -> None:
        """Drop ``finalizer`` from the pod as read (a resourceVersion precondition keeps others' finalizers)."""
        metadata = pod["metadata"]
        kept = [item for item in metadata.get("finalizers") or [] if item != finalizer]
        patch = {"metadata": {"finalizers": kept, "resourceVersion": metadata["resourceVersion"]}}
        try:
            # A JSON merge patch replaces the list (a strategic merge patch would merge it: finalizers are "merge").
            self.core.patch_namespaced_pod(
                metadata["name"],
                metadata["namespace"],
                patch,
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(metadata["name"]) from None
            if error.status != 404:
                raise

    def get_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _json(
            _ignore(
                404,
                lambda: self.core.read_namespaced_persistent_volume_claim(name, namespace, _preload_content=False),
            )
        )

    def delete_claim(self, namespace: str, name: str) -> None:
        _ignore(
            404, lambda: self.core.delete_namespaced_persistent_volume_claim(name, namespace, _preload_content=False)
        )

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A multi-worker job's Service or NetworkPolicy (read for its owner: the operator never adopts one)."""
        readers: dict[str, Callable[[], Any]] = {
            "Service": lambda: self.core.read_namespaced_service(name, namespace, _preload_content=False),
            "NetworkPolicy": lambda: self.networking.read_namespaced_network_policy(
                name, namespace, _preload_content=False
            ),
        }
        return _json(_ignore(404, readers[kind]))

    def delete_child(self, kind: str, namespace: str, name: str) -> None:
        deleters: dict[str, Callable[[], Any]] = {
            "Service": lambda: self.core.delete_namespaced_service(name, namespace, _preload_content=False),
            "NetworkPolicy": lambda: self.networking.delete_namespaced_network_policy(
                name, namespace, _preload_content=False
            ),
        }
        _ignore(404, deleters[kind])

    # --- federations (the coordinator's DPFederatedJob, a site's DPFederatedSite) ------------------------------
    def get_federation(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _ignore(
            404, lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, FEDERATIONS, name)
        )
        return found

    def patch_federation_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        _ignore(
            404,
            lambda: self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, FEDERATIONS, name, {"status": status}
            ),
        )

    def delete_federation(self, namespace: str, name: str) -> None:
        _ignore(
            404,
            lambda: self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, FEDERATIONS, name, _preload_content=False
            ),
        )

    def get_site(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _ignore(
            404, lambda: self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, SITES, name)
        )
        return found

    def patch_site_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        _ignore(
            404,
            lambda: self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, SITES, name, {"status": status}
            ),
        )

    def patch_site_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """A merge patch of a site's spec (the coordinator sets spec.stop on the sites it created)."""
        _ignore(
            404,
            lambda: self.custom.patch_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, SITES, name, {"spec": spec}
            ),
        )

    def delete_site(self, namespace: str, name: str) -> None:
        _ignore(
            404,
            lambda: self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, SITES, name, _preload_content=False
            ),
        )

    def delete_service(self, namespace: str, name: str) -> None:
        _ignore(404, lambda: self.core.delete_namespaced_service(name, namespace, _preload_content=False))
