"""An in-memory stand-in for the operator's :class:`~dptrain_operator.kube.KubeApi`, for unit tests of the
reconcilers: objects are plain dicts, every write bumps ``resourceVersion``, a status write with a stale
``resourceVersion`` raises :class:`ConflictError` as the API server's 409 does, and deleting a pod that has
finalizers only marks it (``deletionTimestamp``) until they are removed, as the API server does."""

from __future__ import annotations

import copy
import itertools
import uuid
from typing import Any

from dptrain_operator.context import OperatorContext
from dptrain_operator.kube import ConflictError
from dptrain_operator.metrics import OperatorMetrics
from dptrain_operator.settings import Settings
from dptrain_operator.workers import AccountingWorkers

Key = tuple[str, str, str]  # (kind, namespace, name); namespace "" for cluster-scoped kinds


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self._versions = itertools.count(1)
        self.conflicts_to_inject = 0
        """The next N status writes (datasets, ledgers) fail with a conflict, as if another writer came first."""

    # --- helpers for tests ---------------------------------------------------------------------------

    def put(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Store ``manifest`` as the server would (uid, resourceVersion, generation filled in)."""
        body = copy.deepcopy(manifest)
        metadata = body.setdefault("metadata", {})
        if body["kind"] != "PrivacyLedger":
            metadata.setdefault("namespace", "default")
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("generation", 1)
        metadata["resourceVersion"] = str(next(self._versions))
        self.objects[_key(body)] = body
        return copy.deepcopy(body)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def pods(self, namespace: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(o) for (kind, ns, _), o in sorted(self.objects.items()) if kind == "Pod" and ns == namespace
        ]

    def set_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.objects[("Pod", namespace, name)]["status"] = copy.deepcopy(status)
        self._bump(("Pod", namespace, name))

    def _bump(self, key: Key) -> None:
        self.objects[key]["metadata"]["resourceVersion"] = str(next(self._versions))

    def _replace_status(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        current = self.objects[key]
        if self.conflicts_to_inject > 0:
            self.conflicts_to_inject -= 1
            self._bump(key)
            raise ConflictError(key[2])
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise ConflictError(key[2])
        current["status"] = copy.deepcopy(body.get("status") or {})
        self._bump(key)
        return copy.deepcopy(current)

    # --- KubeApi ---------------------------------------------------------------------------------------

    def get_dataset(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("PrivateDataset", namespace, name)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("DPTrainingJob", namespace, name)

    def replace_dataset_status(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._replace_status(_key({**body, "kind": "PrivateDataset"}), body)

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        self._patch_status(("DPTrainingJob", namespace, name), status)
        return self.get("DPTrainingJob", namespace, name)

    def delete_job(self, namespace: str, name: str) -> None:
        self.objects.pop(("DPTrainingJob", namespace, name), None)

    def get_ledger(self, name: str) -> dict[str, Any] | None:
        return self.get("PrivacyLedger", "", name)

    def list_ledgers(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (kind, _, _), o in sorted(self.objects.items()) if kind == "PrivacyLedger"]

    def create_ledger(self, manifest: dict[str, Any]) -> bool:
        if ("PrivacyLedger", "", manifest["metadata"]["name"]) in self.objects:
            return False
        self.put({**manifest, "kind": "PrivacyLedger"})
        return True

    def replace_ledger_status(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._replace_status(("PrivacyLedger", "", body["metadata"]["name"]), body)

    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        if _key(manifest) in self.objects:
            return False
        self.put(manifest)
        return True

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        key, _, value = label_selector.partition("=")
        return [pod for pod in self.pods(namespace) if pod["metadata"].get("labels", {}).get(key) == value]

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("Pod", namespace, name)

    def delete_pod(self, namespace: str, name: str) -> None:
        pod = self.objects.get(("Pod", namespace, name))
        if pod is None:
            return
        if pod["metadata"].get("finalizers"):
            pod["metadata"].setdefault("deletionTimestamp", "2026-01-01T00:00:00Z")
            self._bump(("Pod", namespace, name))
        else:
            self.objects.pop(("Pod", namespace, name))

    def remove_pod_finalizer(self, pod: dict[str, Any], finalizer: str) -> None:
        key = _key({**pod, "kind": "Pod"})
        current = self.objects.get(key)
        if current is None:
            return
        if pod["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise ConflictError(key[2])
        current["metadata"]["finalizers"] = [f for f in current["metadata"].get("finalizers") or [] if f != finalizer]
        self._bump(key)
        if current["metadata"].get("deletionTimestamp") and not current["metadata"]["finalizers"]:
            self.objects.pop(key)

    def get_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("PersistentVolumeClaim", namespace, name)

    def delete_claim(self, namespace: str, name: str) -> None:
        self.objects.pop(("PersistentVolumeClaim", namespace, name), None)

    def get_child(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(kind, namespace, name)

    def delete_child(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, namespace, name), None)

    def get_federation(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("DPFederatedJob", namespace, name)

    def patch_federation_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._patch_status(("DPFederatedJob", namespace, name), status)

    def delete_federation(self, namespace: str, name: str) -> None:
        self.objects.pop(("DPFederatedJob", namespace, name), None)

    def get_site(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("DPFederatedSite", namespace, name)

    def patch_site_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._patch_status(("DPFederatedSite", namespace, name), status)

    def patch_site_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        site = self.objects.get(("DPFederatedSite", namespace, name))
        if site is not None:
            site["spec"] = {**site["spec"], **copy.deepcopy(spec)}
            site["metadata"]["generation"] = site["metadata"].get("generation", 1) + 1
            self._bump(("DPFederatedSite", namespace, name))

    def delete_site(self, namespace: str, name: str) -> None:
        self.objects.pop(("DPFederatedSite", namespace, name), None)

    def delete_service(self, namespace: str, name: str) -> None:
        self.objects.pop(("Service", namespace, name), None)

    def _patch_status(self, key: Key, status: dict[str, Any]) -> None:
        """A merge patch of the status subresource, as kopf's handlers send it."""
        found = self.objects.get(key)
        if found is not None:
            found["status"] = {**(found.get("status") or {}), **copy.deepcopy(status)}
            self._bump(key)


def _key(body: dict[str, Any]) -> Key:
    metadata = body["metadata"]
    return (body["kind"], metadata.get("namespace", "") if body["kind"] != "PrivacyLedger" else "", metadata["name"])


def fake_context(kube: FakeKube, **settings: Any) -> OperatorContext:
    """An operator context on ``kube``: no servers (ports 0), accounting in this process."""
    workers = AccountingWorkers(timeout=60, in_process=True)
    return OperatorContext(
        settings=Settings(metrics_port=0, liveness_port=0, **settings),
        kube=kube,
        metrics=OperatorMetrics(),
        workers=workers,
    )
