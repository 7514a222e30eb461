"""Helpers of the end-to-end tests: manifests, kubectl round trips, waiting with a diagnosis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from dptrain_accounting import MechanismSegment
from tests.support.cluster import Cluster
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess

T = TypeVar("T")


def segment(mechanism: dict[str, Any]) -> MechanismSegment:
    return MechanismSegment(mechanism["noiseMultiplier"], mechanism["sampleRate"], mechanism["steps"])


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, diagnose: Callable[[], str] = str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diagnose()}")


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"builtin": "breast-cancer"},
        "model": {"architecture": "logistic"},
        "privacy": {"targetEpsilon": 2.0, "delta": 1e-5},
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.5, "seed": 1},
        "checkpoint": {"everySteps": 5},
        "resources": {"cpu": "1"},
    }
    for key, value in spec.items():
        merge = isinstance(value, dict) and key != "dataset"  # a dataset source replaces the default one
        body[key] = {**body.get(key, {}), **value} if merge else value
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob", "metadata": {"name": name}, "spec": body}


def dataset_manifest(name: str, *, epsilon: float, builtin: str = "breast-cancer") -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "PrivateDataset",
        "metadata": {"name": name},
        "spec": {"source": {"builtin": builtin}, "budget": {"epsilon": epsilon, "delta": 1e-5}},
    }


def apply(cluster: Cluster, namespace: str, *documents: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def phase_is(cluster: Cluster, namespace: str, name: str, *phases: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        job = get(cluster, namespace, "dptj", name)
        return job if job.get("status", {}).get("phase") in phases else None

    return check


def pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return list(json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"])


def condition(job: dict[str, Any], type: str) -> dict[str, Any]:
    return next(c for c in job["status"]["conditions"] if c["type"] == type)


def diagnose(cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess) -> Callable[[], str]:
    def text() -> str:
        jobs = cluster.kubectl("get", "dptj,pds,pods", "-n", namespace, "-o", "yaml", check=False).stdout
        logs = "\n".join(
            f"--- {pod['metadata']['name']}\n{node.logs(namespace, pod['metadata']['name'])[-3000:]}"
            for pod in pods(cluster, namespace)
        )
        return f"{jobs[-6000:]}\n{logs}\n--- operator\n{operator.logs()[-4000:]}"

    return text
