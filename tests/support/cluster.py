"""A Kubernetes API server for the integration tests.

``cluster_or_skip`` (behind the session-scoped ``cluster`` fixture) picks, in this order:

1. the testenv of ``../shared/testenv`` (or the folder named by ``DPTRAIN_TESTENV``): starts a
   fresh etcd + API server on free ports in a temporary folder, and stops/purges it afterwards;
2. the cluster ``KUBECONFIG`` points at (never stopped);
3. neither: the tests are skipped, saying so.

Either way the CRDs of ``crds/`` are applied and waited for (Established). Every client is built
from a fresh ``kubernetes.client.Configuration``: the global default configuration is never touched.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes
import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "crds"
TESTENV = Path(__file__).resolve().parents[3] / "shared" / "testenv"
DPTRAIN_CRDS = (
    "dptrainingjobs.dptrain.io",
    "privatedatasets.dptrain.io",
    "privacyledgers.dptrain.io",
    "dpfederatedjobs.dptrain.io",
    "dpfederatedsites.dptrain.io",
)
DPTRAIN_GROUP, DPTRAIN_VERSION = "dptrain.io", "v1alpha1"
_ETCD_OFFSETS = (10000, 10001)  # up.sh: etcd client port = PORT+10000, peer port = PORT+10001
_MAX_PORT = 55000

# Namespaced kinds the namespace fixture cleans up (the testenv has no namespace deletion cascade):
# (API prefix, plural). The dptrain kinds come first so an operator's finalizers are gone first.
CLEANUP_KINDS: tuple[tuple[str, str], ...] = (
    (f"/apis/{DPTRAIN_GROUP}/{DPTRAIN_VERSION}", "dpfederatedjobs"),
    (f"/apis/{DPTRAIN_GROUP}/{DPTRAIN_VERSION}", "dpfederatedsites"),
    (f"/apis/{DPTRAIN_GROUP}/{DPTRAIN_VERSION}", "dptrainingjobs"),
    (f"/apis/{DPTRAIN_GROUP}/{DPTRAIN_VERSION}", "privatedatasets"),
    ("/api/v1", "pods"),
    ("/apis/batch/v1", "jobs"),
    ("/api/v1", "services"),
    ("/api/v1", "configmaps"),
    ("/api/v1", "secrets"),
    ("/api/v1", "persistentvolumeclaims"),
    ("/api/v1", "serviceaccounts"),
    ("/api/v1", "events"),
    ("/apis/coordination.k8s.io/v1", "leases"),
)


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message includes kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}"


@dataclass
class Cluster:
    kubeconfig: Path
    run_dir: Path
    port: int
    api: ApiClient
    owned: bool = True  # started by start_cluster (stop_cluster stops it) or borrowed from KUBECONFIG

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs kubectl against this cluster; with check, a non-zero exit raises KubectlError (stderr included)."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run(
            ["kubectl", *args], input=input, capture_output=True, text=True, env=env, timeout=120, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result


def testenv_dir() -> Path:
    """The testenv folder: $DPTRAIN_TESTENV, else ../shared/testenv next to the repository."""
    override = os.environ.get("DPTRAIN_TESTENV")
    return Path(override) if override else TESTENV


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port P < 55000 such that P, P+10000 and P+10001 (the testenv's etcd) are all free."""
    for attempt in range(400):
        if attempt < 100:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        else:
            port = random.randint(20000, _MAX_PORT - 1)
        if port < _MAX_PORT and all(_port_is_free(port + offset) for offset in (0, *_ETCD_OFFSETS)):
            return port
    raise RuntimeError("no free port P with P+10000 and P+10001 also free")


def api_client_for(kubeconfig: Path | str) -> ApiClient:
    """An ApiClient with its own Configuration (the global default one stays untouched)."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
    )
    return ApiClient(configuration)


def start_cluster(run_dir: Path) -> Cluster:
    """Starts the testenv (etcd + API server) in run_dir on free ports and installs the CRDs."""
    up = testenv_dir() / "up.sh"
    run_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for _ in range(3):  # a port can be taken between the check and the bind: retry on a new one
        port = free_port()
        result = subprocess.run(
            [str(up), str(run_dir), str(port)], capture_output=True, text=True, timeout=180, check=False
        )
        if result.returncode == 0:
            break
        server_log = _tail(run_dir / "apiserver.log")
        failures.append(f"port {port}: rc={result.returncode}\n{result.stderr[-2000:]}\n{server_log}")
        _down(run_dir)
    else:
        raise RuntimeError("testenv up.sh failed 3 times:\n" + "\n---\n".join(failures))
    kubeconfig = run_dir / "admin.kubeconfig"
    cluster = Cluster(kubeconfig=kubeconfig, run_dir=run_dir, port=port, api=api_client_for(kubeconfig))
    try:
        install_crds(cluster)
        warm_up(cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _down(run_dir: Path) -> None:
    subprocess.run(
        [str(testenv_dir() / "down.sh"), str(run_dir), "--purge"], capture_output=True, timeout=60, check=False
    )


def stop_cluster(cluster: Cluster) -> None:
    """Stops (and purges) a server start_cluster started; a borrowed KUBECONFIG cluster is left alone."""
    cluster.api.close()
    if cluster.owned:
        _down(cluster.run_dir)


def install_crds(cluster: Cluster) -> None:
    """kubectl apply -f crds/, then waits until every dptrain CRD is Established."""
    cluster.kubectl("apply", "-f", str(CRDS_DIR))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in DPTRAIN_CRDS))


def warm_up(cluster: Cluster) -> None:
    """Touches every kind the tests clean up, in parallel: the testenv builds a kind's handler and watch
    cache on first use (~0.3 s each), which would otherwise land in the first test's timings."""
    paths = [f"{prefix}/{plural}" for prefix, plural in CLEANUP_KINDS]
    with ThreadPoolExecutor(max_workers=min(len(paths), 8)) as pool:
        list(pool.map(lambda path: raw_request(cluster.api, "GET", path, query=[("limit", 1)]), paths))


def cluster_or_skip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The body of the session-scoped ``cluster`` fixture (see the module docstring)."""
    testenv = testenv_dir()
    if (testenv / "up.sh").is_file():
        cluster = start_cluster(tmp_path_factory.mktemp("testenv"))
        try:
            yield cluster
        finally:
            stop_cluster(cluster)
        return
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        api = api_client_for(kubeconfig)
        host = urlparse(api.configuration.host)
        cluster = Cluster(
            kubeconfig=Path(kubeconfig),
            run_dir=Path(kubeconfig.split(os.pathsep)[0]).parent,
            port=host.port or 443,
            api=api,
            owned=False,
        )
        try:
            install_crds(cluster)
            yield cluster
        finally:
            stop_cluster(cluster)
        return
    pytest.skip(
        f"integration tests need a Kubernetes API server: no testenv at {testenv} "
        "(set DPTRAIN_TESTENV to its folder) and no KUBECONFIG in the environment"
    )


# --- raw REST helpers (work for any kind, including ones without a generated client) ---


def raw_request(
    api: ApiClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    query: list[tuple[str, Any]] | None = None,
) -> Any:
    """One API request; returns the decoded JSON body. Non-2xx raises ApiException."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    request = api.param_serialize(
        method, path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
    )
    response = api.call_api(*request, _request_timeout=30)
    response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=response)
    return json.loads(response.data) if response.data else None


def purge_namespace(cluster: Cluster, namespace: str) -> None:
    """Deletes what a test left in namespace, then the namespace itself.

    The testenv has no namespace controller (no cascade) and no garbage collector, so every kind of
    CLEANUP_KINDS is deleted explicitly, with finalizers stripped first (no operator may be running
    to remove its own). Kinds the server does not serve are skipped.
    """
    for prefix, plural in CLEANUP_KINDS:
        collection = f"{prefix}/namespaces/{namespace}/{plural}"
        try:
            listed = raw_request(cluster.api, "GET", collection)
        except ApiException as error:
            if error.status == 404:
                continue
            raise
        for item in listed.get("items", []):
            if item.get("metadata", {}).get("finalizers"):
                try:
                    raw_request(
                        cluster.api,
                        "PATCH",
                        f"{collection}/{item['metadata']['name']}",
                        {"metadata": {"finalizers": None}},
                        content_type="application/merge-patch+json",
                    )
                except ApiException as error:
                    if error.status != 404:
                        raise
        if listed.get("items"):
            raw_request(cluster.api, "DELETE", collection, query=[("gracePeriodSeconds", 0)])
    try:
        raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}")
    except ApiException as error:
        if error.status != 404:
            raise


@functools.cache
def helm_binary() -> str | None:
    """helm from PATH, else the one ../shared/testenv/install.sh unpacks; None if neither exists."""
    found = shutil.which("helm")
    if found:
        return found
    install = testenv_dir() / "install.sh"
    if not install.is_file():
        return None
    result = subprocess.run([str(install)], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    candidate = Path(result.stdout.strip().splitlines()[-1]) / "helm"
    return str(candidate) if candidate.is_file() else None
