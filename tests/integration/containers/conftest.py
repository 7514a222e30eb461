"""Fixtures of the container tests: the images `make images` built, a ContainerNode per test, the operator from
its image. Without root podman or the images they skip, saying why (they fail instead where
DPTRAIN_REQUIRE_CONTAINERS is set, as in CI)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import podman
from tests.support.cluster import Cluster
from tests.support.container_node import ContainerNode


@pytest.fixture(scope="session")
def trainer_image() -> str:
    name = podman.image("trainer")
    podman.require([name])
    return name


@pytest.fixture(scope="session")
def operator_image() -> str:
    name = podman.image("operator")
    podman.require([name])
    return name


@pytest.fixture
def container_node(cluster: Cluster, namespace: str, tmp_path: Path, trainer_image: str) -> Iterator[ContainerNode]:
    """A fake kubelet running this namespace's pods in their images; it must log no internal error and leave no
    container behind."""
    node = ContainerNode(cluster.api, namespace, work_dir=tmp_path / "node", max_grace_seconds=10)
    node.start()
    yield node
    node.stop()
    assert node.errors == []
    assert node.container_names() == []
