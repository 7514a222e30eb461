"""Fixtures of the integration tests: one API server per session, one namespace per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, cluster_or_skip, purge_namespace, raw_request
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from cluster_or_skip(tmp_path_factory)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace; what the test created in it is deleted afterwards (finalizers stripped)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"t-{stem}-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    raw_request(cluster.api, "POST", "/api/v1/namespaces", body)
    yield name
    purge_namespace(cluster, name)


@pytest.fixture
def node(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[FakeNode]:
    """A fake kubelet running this namespace's pods as local processes; it must log no internal error."""
    fake = FakeNode(cluster.api, namespace, work_dir=tmp_path / "node")
    fake.start()
    yield fake
    fake.stop()
    assert fake.errors == []


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator")
    process.start()
    yield process
    process.stop()
