"""An in-memory stand-in for the operator's :class:`~dptrain_operator.kube.KubeApi`, for unit tests of the
reconcilers: objects are plain dicts, every write bumps ``resourceVersion``, and a dataset status
write with a stale ``resourceVersion`` raises :class:`ConflictError` as the API server's 409 does."""

from __future__ import annotations

import copy
import itertools
import uuid
from typing import Any

from dptrain_operator.kube import ConflictError

Key = tuple[str, str, str]  # (kind, namespace, name)


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self._versions = itertools.count(1)
        self.conflicts_to_inject = 0
        """The next N dataset status writes fail with a conflict (as if another writer came first)."""

    # --- helpers for tests ---------------------------------------------------------------------------

    def put(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Store ``manifest`` as the server would (uid, resourceVersion, generation filled in)."""
        body = copy.deepcopy(manifest)
        metadata = body.setdefault("metadata", {})
        metadata.setdefault("namespace", "default")
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("generation", 1)
        metadata["resourceVersion"] = str(next(self._versions))
        self.objects[(body["kind"], metadata["namespace"], metadata["name"])] = body
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

    # --- KubeApi ---------------------------------------------------------------------------------------

    def get_dataset(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("PrivateDataset", namespace, name)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("DPTrainingJob", namespace, name)

    def replace_dataset_status(self, body: dict[str, Any]) -> dict[str, Any]:
        metadata = body["metadata"]
        key = ("PrivateDataset", metadata["namespace"], metadata["name"])
        current = self.objects[key]
        if self.conflicts_to_inject > 0:
            self.conflicts_to_inject -= 1
            current["metadata"]["resourceVersion"] = str(next(self._versions))
            raise ConflictError(metadata["name"])
        if metadata.get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise ConflictError(metadata["name"])
        current["status"] = copy.deepcopy(body.get("status") or {})
        current["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(current)

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        job = self.objects.get(("DPTrainingJob", namespace, name))
        if job is not None:
            job["status"] = {**(job.get("status") or {}), **copy.deepcopy(status)}
            job["metadata"]["resourceVersion"] = str(next(self._versions))

    def delete_job(self, namespace: str, name: str) -> None:
        self.objects.pop(("DPTrainingJob", namespace, name), None)

    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        metadata = manifest["metadata"]
        if (manifest["kind"], metadata["namespace"], metadata["name"]) in self.objects:
            return False
        self.put(manifest)
        return True

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        key, _, value = label_selector.partition("=")
        return [pod for pod in self.pods(namespace) if pod["metadata"].get("labels", {}).get(key) == value]

    def delete_pod(self, namespace: str, name: str) -> None:
        self.objects.pop(("Pod", namespace, name), None)

    def delete_config_map(self, namespace: str, name: str) -> None:
        self.objects.pop(("ConfigMap", namespace, name), None)

    def claim_uid(self, namespace: str, name: str) -> str | None:
        claim = self.objects.get(("PersistentVolumeClaim", namespace, name))
        return str(claim["metadata"]["uid"]) if claim is not None else None

    def delete_claim(self, namespace: str, name: str) -> None:
        self.objects.pop(("PersistentVolumeClaim", namespace, name), None)
