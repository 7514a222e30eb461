"""The Helm chart against a live API server, and its settings running a real job under a real Prometheus.

* install / upgrade / uninstall with default values (CRDs left to the session fixture, which applied crds/ with
  kubectl: such CRDs carry no Helm ownership metadata, so a release that also renders them is refused; the chart's
  README documents `crds.enabled=false` or adoption);
* namespaced RBAC: Roles and RoleBindings in the two watched namespaces only;
* CRDs from the chart on a FRESH API server (no CRDs yet): created, served, kept by `helm uninstall`
  (resource-policy keep), re-adopted by the same release, refused by another release until the documented
  `kubectl label/annotate` adoption;
* e2e: the operator started locally with the env of the Deployment the chart created, the fake kubelet running the
  trainer pod, Prometheus scraping both (static configs carrying the labels the ServiceMonitor/PodMonitor give) and
  loading the PrometheusRule read back from the API server: every dashboard panel query returns data, every alert
  expression evaluates, and the ε-above-target alert never has a series.

The testenv has no controllers (a Deployment never gets pods), hence the locally started operator.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from dptrain_api import DPTrainingJob, parse_resource
from dptrain_operator.settings import Settings
from tests.support import cluster as cluster_support
from tests.support.cluster import DPTRAIN_CRDS, Cluster, purge_namespace, raw_request
from tests.support.manifests import base_manifest, sample_trainer_pod
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess
from tests.support.prometheus import PrometheusServer, prometheus_binary

# The whole module is `integration` (live API server) and `e2e` (helm against it; one test trains through the operator).
pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dptrain"
MONITORING_KINDS = {
    "ServiceMonitor": "servicemonitors",
    "PodMonitor": "podmonitors",
    "PrometheusRule": "prometheusrules",
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}
FIRST_FAKE_POD_IP = "127.0.0.2"  # a fresh FakeNode gives its first pod 127.0.0.2
T = TypeVar("T")


# --- helm ----------------------------------------------------------------------------------------------------------


class Helm:
    def __init__(self, binary: str, kubeconfig: Path, work_dir: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.work_dir = work_dir

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            # keep helm's cache/config/data out of $HOME
            "HELM_CACHE_HOME": str(self.work_dir / "cache"),
            "HELM_CONFIG_HOME": str(self.work_dir / "config"),
            "HELM_DATA_HOME": str(self.work_dir / "data"),
        }
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, env=env, timeout=180, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def manifest(self, release: str, namespace: str) -> list[dict[str, Any]]:
        output = self("get", "manifest", release, "-n", namespace).stdout
        return [doc for doc in yaml.safe_load_all(output) if doc]

    def status(self, release: str, namespace: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self("status", release, "-n", namespace, "-o", "json").stdout)
        return loaded


@pytest.fixture(scope="module")
def helm_binary() -> str:
    binary = cluster_support.helm_binary()
    if binary is None:
        pytest.skip(f"helm not found: not on PATH and no {cluster_support.testenv_dir() / 'install.sh'} to unpack it")
    return binary


@pytest.fixture
def helm(helm_binary: str, cluster: Cluster, tmp_path: Path) -> Helm:
    return Helm(helm_binary, cluster.kubeconfig, tmp_path / "helm")


def release_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def installed(helm: Helm, release: str, namespace: str, *values: str) -> Iterator[None]:
    """helm install; helm uninstall afterwards unless the test did (the testenv has no garbage collector)."""
    helm("install", release, str(CHART), "--namespace", namespace, *values)
    try:
        yield
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait=false", check=False)


# --- API helpers ---------------------------------------------------------------------------------------------------


def object_path(obj: dict[str, Any]) -> str:
    kind, api_version = obj["kind"], obj["apiVersion"]
    plural = MONITORING_KINDS.get(kind) or (kind.lower()[:-1] + "ies" if kind.endswith("y") else kind.lower() + "s")
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    metadata = obj["metadata"]
    if kind in CLUSTER_SCOPED:
        return f"{prefix}/{plural}/{metadata['name']}"
    return f"{prefix}/namespaces/{metadata['namespace']}/{plural}/{metadata['name']}"


def read(cluster: Cluster, path: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = raw_request(cluster.api, "GET", path)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return found


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, diagnose: Callable[[], str] = str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diagnose()}")
        time.sleep(0.25)


def matching(obj: dict[str, Any] | None, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    return obj if obj is not None and predicate(obj) else None


def all_evaluated(rules: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The rules, once Prometheus has evaluated each at least once (health is no longer "unknown")."""
    return rules if rules and all(rule.get("health") != "unknown" for rule in rules) else None


def deployment_env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {var["name"]: var["value"] for var in container.get("env", []) if "value" in var}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def extra_namespaces(cluster: Cluster, *stems: str) -> Iterator[list[str]]:
    names = [f"{stem}-{uuid.uuid4().hex[:6]}" for stem in stems]
    for name in names:
        raw_request(
            cluster.api,
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
    try:
        yield names
    finally:
        for name in names:
            purge_namespace(cluster, name)


# --- install / upgrade / uninstall ---------------------------------------------------------------------------------


def test_install_upgrade_uninstall_with_defaults(cluster: Cluster, namespace: str, helm: Helm) -> None:
    release = release_name("dpt")
    # crds.enabled=false: the session fixture applied crds/ with kubectl (no Helm ownership metadata).
    helm("install", release, str(CHART), "--namespace", namespace, "--set", "crds.enabled=false")
    try:
        objects = helm.manifest(release, namespace)
        kinds = sorted(obj["kind"] for obj in objects)
        assert kinds == sorted(
            [
                *["ClusterRole"] * 5,  # the operator's two, and the submitter, steward and viewer roles
                "ClusterRoleBinding",
                "ClusterRoleBinding",
                "ConfigMap",
                "Deployment",
                *["NetworkPolicy"] * 3,  # trainer pods, a federation's coordinator, SuperNodes
                "Service",
                "ServiceAccount",
                "ServiceAccount",
            ]
        )
        for obj in objects:
            stored = read(cluster, object_path(obj))
            assert stored is not None, f"{obj['kind']} {obj['metadata']['name']} is not on the API server"
            for field in ("rules", "roleRef", "subjects", "automountServiceAccountToken", "data"):
                if field in obj:
                    assert stored[field] == obj[field], f"{obj['kind']}.{field} differs on the server"
            assert stored["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
        deployment_path = object_path(next(obj for obj in objects if obj["kind"] == "Deployment"))
        deployment = read(cluster, deployment_path)
        assert deployment is not None
        assert deployment_env(deployment)["DPTRAIN_SCRAPE_INTERVAL"] == "5"
        assert helm.status(release, namespace)["info"]["status"] == "deployed"

        helm(
            "upgrade",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--reuse-values",
            "--set",
            "operator.scrapeInterval=2",
        )
        upgraded = read(cluster, deployment_path)
        assert upgraded is not None
        assert deployment_env(upgraded)["DPTRAIN_SCRAPE_INTERVAL"] == "2"
        assert Settings.from_env(deployment_env(upgraded)).scrape_interval == 2.0
        status = helm.status(release, namespace)
        assert status["version"] == 2
        assert status["info"]["status"] == "deployed"
        history = json.loads(helm("history", release, "--namespace", namespace, "-o", "json").stdout)
        assert [entry["revision"] for entry in history] == [1, 2]
    finally:
        helm("uninstall", release, "--namespace", namespace)
    for obj in objects:
        assert read(cluster, object_path(obj)) is None, f"{obj['kind']} {obj['metadata']['name']} survived uninstall"
    for crd in DPTRAIN_CRDS:  # not the release's: untouched
        assert read(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}") is not None


def test_install_with_namespaced_rbac(cluster: Cluster, namespace: str, helm: Helm) -> None:
    release = release_name("dpt-ns")
    with extra_namespaces(cluster, "team-a", "team-b") as watched:
        values = (
            "--set",
            "crds.enabled=false,rbac.namespaced=true",
            "--set",
            f"watchNamespaces={{{','.join(watched)}}}",
        )
        with installed(helm, release, namespace, *values):
            objects = helm.manifest(release, namespace)
            roles = [obj for obj in objects if obj["kind"] in ("Role", "RoleBinding")]
            assert sorted((obj["kind"], obj["metadata"]["namespace"]) for obj in roles) == sorted(
                (kind, ns) for kind in ("Role", "RoleBinding") for ns in watched
            )
            for obj in roles:
                assert read(cluster, object_path(obj)) is not None
            # nothing namespaced-RBAC in the release namespace; cluster-wide only the ledgers and kopf's listing
            for plural in ("roles", "rolebindings"):
                listed = raw_request(
                    cluster.api, "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{plural}"
                )
                assert not listed["items"]
            cluster_roles = [
                obj for obj in objects if obj["kind"] == "ClusterRole" and obj["metadata"]["name"].endswith("-cluster")
            ]
            assert [obj["metadata"]["name"] for obj in cluster_roles] == [f"{release}-dptrain-cluster"]
            stored = read(cluster, object_path(cluster_roles[0]))
            assert stored is not None
            assert {resource for rule in stored["rules"] for resource in rule["resources"]} == {
                "customresourcedefinitions",
                "namespaces",
                "privacyledgers",
                "privacyledgers/status",
            }
            deployment = read(cluster, object_path(next(obj for obj in objects if obj["kind"] == "Deployment")))
            assert deployment is not None
            assert Settings.from_env(deployment_env(deployment)).namespaces == tuple(watched)
            # per watched namespace: the trainers' ServiceAccount, and the NetworkPolicies of trainer pods, a
            # federation's coordinator and SuperNodes
            for kind, each in (("ServiceAccount", 1), ("NetworkPolicy", 3)):
                trainer_objects = [
                    obj for obj in objects if obj["kind"] == kind and obj["metadata"]["namespace"] != namespace
                ]
                assert sorted(obj["metadata"]["namespace"] for obj in trainer_objects) == sorted(watched * each)
        for obj in roles:
            assert read(cluster, object_path(obj)) is None


# --- CRDs from the chart on a fresh API server ---------------------------------------------------------------------


@contextlib.contextmanager
def fresh_api_server(run_dir: Path) -> Iterator[Cluster]:
    """An API server of the testenv WITHOUT the dptrain CRDs (start_cluster would install them)."""
    up = cluster_support.testenv_dir() / "up.sh"
    if not up.is_file():
        pytest.skip(f"a fresh API server needs the testenv ({up} is missing)")
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = cluster_support.free_port()
        result = subprocess.run(
            [str(up), str(run_dir), str(port)], capture_output=True, text=True, timeout=180, check=False
        )
        if result.returncode == 0:
            break
        subprocess.run(
            [str(cluster_support.testenv_dir() / "down.sh"), str(run_dir), "--purge"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    else:
        raise RuntimeError(f"testenv up.sh failed: {result.stderr[-2000:]}")
    kubeconfig = run_dir / "admin.kubeconfig"
    cluster = Cluster(kubeconfig=kubeconfig, run_dir=run_dir, port=port, api=cluster_support.api_client_for(kubeconfig))
    try:
        yield cluster
    finally:
        cluster_support.stop_cluster(cluster)


def test_crds_from_the_chart_on_a_fresh_api_server(helm_binary: str, tmp_path: Path) -> None:
    with fresh_api_server(tmp_path / "apiserver") as fresh:
        helm = Helm(helm_binary, fresh.kubeconfig, tmp_path / "helm")
        fresh.kubectl("create", "namespace", "dptrain-system")
        crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{}"
        for crd in DPTRAIN_CRDS:
            assert read(fresh, crd_path.format(crd)) is None

        helm("install", "dptrain", str(CHART), "--namespace", "dptrain-system")
        fresh.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{crd}" for crd in DPTRAIN_CRDS))
        for crd in DPTRAIN_CRDS:
            stored = read(fresh, crd_path.format(crd))
            assert stored is not None
            assert stored["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert stored["metadata"]["annotations"]["meta.helm.sh/release-name"] == "dptrain"
        # the CRDs are live: a valid job is stored, an invalid one refused by the CRD's schema
        job = base_manifest("job")
        job["metadata"] = {"name": "kept", "namespace": "dptrain-system"}
        fresh.kubectl("apply", "-f", "-", input=json.dumps(job))
        bad = json.loads(json.dumps(job))
        bad["metadata"]["name"] = "bad"
        bad["spec"]["privacy"]["targetEpsilon"] = -1
        refused = fresh.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
        assert refused.returncode != 0
        assert "targetEpsilon" in refused.stderr

        uninstalled = helm("uninstall", "dptrain", "--namespace", "dptrain-system")
        assert "kept due to the resource policy" in uninstalled.stdout + uninstalled.stderr
        for crd in DPTRAIN_CRDS:
            assert read(fresh, crd_path.format(crd)) is not None, f"{crd} deleted by helm uninstall"
        assert read(fresh, "/apis/dptrain.io/v1alpha1/namespaces/dptrain-system/dptrainingjobs/kept") is not None

        # the same release adopts its kept CRDs again
        helm("install", "dptrain", str(CHART), "--namespace", "dptrain-system")
        helm("uninstall", "dptrain", "--namespace", "dptrain-system")
        # another release is refused until the CRDs are handed over (the README's commands)
        refused_install = helm("install", "other", str(CHART), "--namespace", "dptrain-system", check=False)
        assert refused_install.returncode != 0
        assert "invalid ownership metadata" in refused_install.stderr
        for crd in DPTRAIN_CRDS:
            fresh.kubectl("label", "crd", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
            fresh.kubectl(
                "annotate",
                "crd",
                crd,
                "meta.helm.sh/release-name=other",
                "meta.helm.sh/release-namespace=dptrain-system",
                "--overwrite",
            )
        helm("install", "other", str(CHART), "--namespace", "dptrain-system")
        helm("uninstall", "other", "--namespace", "dptrain-system")
        for crd in DPTRAIN_CRDS:
            assert read(fresh, crd_path.format(crd)) is not None


# --- e2e: the chart's settings run a job; Prometheus + the dashboard + the alerts ---------------------------------


def monitoring_stub_crd(kind: str, plural: str) -> dict[str, Any]:
    """A schemaless stand-in for a Prometheus Operator CRD (the testenv has none; helm needs the kind served)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


def ensure_monitoring_crds(cluster: Cluster) -> None:
    """Creates stand-ins for the Prometheus Operator CRDs that are missing (existing ones are left alone)."""
    created = []
    for kind, plural in MONITORING_KINDS.items():
        name = f"{plural}.monitoring.coreos.com"
        if read(cluster, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") is None:
            try:
                raw_request(
                    cluster.api,
                    "POST",
                    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                    monitoring_stub_crd(kind, plural),
                )
            except ApiException as error:
                if error.status != 409:  # created meanwhile by another test process sharing the cluster
                    raise
            created.append(name)
    if created:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in created))


def pod_command_flags() -> list[str]:
    document = base_manifest("job")
    document["metadata"].update(namespace="ml", uid="0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10")
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    pod = sample_trainer_pod(job, Settings())
    return [word for word in pod["spec"]["containers"][0]["command"] if word.startswith("--")]


def require_trainer_cli() -> None:
    """Skips (only) when the trainer's CLI lacks flags the operator's pod command uses."""
    script = Path(sys.executable).parent / "dptrain"
    if not script.is_file():
        pytest.skip(f"the trainer is not installed ({script} missing)")
    result = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True, timeout=60, check=False)
    missing = [flag for flag in pod_command_flags() if flag not in result.stdout]
    if result.returncode != 0 or missing:
        pytest.skip(f"`dptrain run --help` lacks the flags the operator's pod command uses: {missing or result.stderr}")


def job_manifests(job: str, dataset: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "dptrain.io/v1alpha1",
            "kind": "PrivateDataset",
            "metadata": {"name": dataset},
            "spec": {"source": {"builtin": "breast-cancer"}, "budget": {"epsilon": 10.0, "delta": 1e-5}},
        },
        {
            "apiVersion": "dptrain.io/v1alpha1",
            "kind": "DPTrainingJob",
            "metadata": {"name": job},
            "spec": {
                "dataset": {"datasetRef": {"name": dataset}},
                "model": {"architecture": "logistic"},
                "privacy": {"targetEpsilon": 2.0, "delta": 1e-5},
                "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.5, "seed": 1},
                "checkpoint": {"everySteps": 5},
                "resources": {"cpu": "1"},
            },
        },
    ]


def grafana_substitute(expr: str, namespace: str, job: str) -> str:
    """The query Grafana sends with one namespace and one job selected (DNS names: nothing to regex-escape)."""
    return expr.replace("$namespace", namespace).replace("$job", job).replace("$__rate_interval", "1m")


def has_values(series: list[dict[str, Any]]) -> bool:
    return any(value != "NaN" for item in series for _, value in item.get("values", [])) if series else False


def test_chart_settings_run_a_job_that_feeds_the_dashboard_and_alerts(
    cluster: Cluster, namespace: str, helm: Helm, tmp_path: Path
) -> None:
    if prometheus_binary() is None:
        pytest.skip("prometheus not found: install the Debian package `prometheus` (CI installs it)")
    require_trainer_cli()
    ensure_monitoring_crds(cluster)
    release, job, dataset = release_name("dpt-e2e"), "bc-logistic", "bc-data"
    metrics_port, liveness_port, trainer_port = free_ports(3)
    values = (
        "--set",
        "crds.enabled=false,monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,"
        "monitoring.prometheusRule.enabled=true",
        "--set",
        f"watchNamespaces={{{namespace}}},operator.scrapeInterval=1",
        "--set",
        f"operator.metricsPort={metrics_port},operator.livenessPort={liveness_port},trainer.metricsPort={trainer_port}",
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(installed(helm, release, namespace, *values))
        manifest = {obj["kind"]: obj for obj in helm.manifest(release, namespace)}
        deployment = read(cluster, object_path(manifest["Deployment"]))
        rule_object = read(cluster, object_path(manifest["PrometheusRule"]))
        dashboard_map = read(cluster, object_path(manifest["ConfigMap"]))
        pod_monitor = read(cluster, object_path(manifest["PodMonitor"]))
        service_monitor = read(cluster, object_path(manifest["ServiceMonitor"]))
        assert deployment is not None
        assert rule_object is not None
        assert dashboard_map is not None
        assert pod_monitor is not None
        assert service_monitor is not None
        env = deployment_env(deployment)
        assert Settings.from_env(env).namespaces == (namespace,)
        rules_file = tmp_path / "rules.yaml"
        rules_file.write_text(yaml.safe_dump(rule_object["spec"], sort_keys=False))
        board = json.loads(dashboard_map["data"]["dptrain.json"])

        node = FakeNode(cluster.api, namespace, work_dir=tmp_path / "node")
        node.start()
        stack.callback(node.stop)
        operator = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator", extra_env=env)
        stack.callback(operator.stop)
        operator.start()
        assert operator.metrics_port == metrics_port

        # What the ServiceMonitor and PodMonitor would generate, as static configs (no Kubernetes SD here).
        (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
        pod_name = f"{job}-attempt-1"
        trainer_targets = tmp_path / "prometheus" / "trainer-targets.json"
        trainer_targets.parent.mkdir(parents=True, exist_ok=True)

        def write_trainer_target(ip: str) -> None:
            labels = {"namespace": namespace, "pod": pod_name, "container": "trainer", "endpoint": endpoint["port"]}
            trainer_targets.write_text(json.dumps([{"targets": [f"{ip}:{trainer_port}"], "labels": labels}]))

        write_trainer_target(FIRST_FAKE_POD_IP)
        service_name = manifest["Service"]["metadata"]["name"]
        scrape_configs = [
            {
                "job_name": service_name,  # a ServiceMonitor's job label: the Service's name
                "honor_labels": service_monitor["spec"]["endpoints"][0]["honorLabels"],
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{metrics_port}"],
                        "labels": {"namespace": namespace, "service": service_name, "endpoint": "metrics"},
                    }
                ],
            },
            {
                "job_name": "dptrain-trainer",  # the PodMonitor's jobLabel: the pods' app.kubernetes.io/name
                "honor_labels": endpoint["honorLabels"],
                "scrape_interval": "500ms",
                "scrape_timeout": "400ms",
                "file_sd_configs": [{"files": [str(trainer_targets)], "refresh_interval": "1s"}],
            },
        ]
        prometheus = PrometheusServer(scrape_configs, rule_files=[rules_file], work_dir=tmp_path / "prometheus")
        stack.enter_context(prometheus)
        started = time.time()

        def diagnose() -> str:
            exit_code = operator.process.poll() if operator.process is not None else None
            return (
                f"--- operator (exit code {exit_code}: None = still running) log\n{operator.logs()[-4000:]}\n"
                f"--- node errors {node.errors}\n"
                f"--- trainer log\n{_tail(node.log_path(namespace, pod_name))}\n"
                f"--- prometheus targets {prometheus.targets_summary()}"
            )

        cluster.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=yaml.safe_dump_all(job_manifests(job, dataset), sort_keys=False),
        )
        pod_path = f"/api/v1/namespaces/{namespace}/pods/{pod_name}"
        pod = wait_for(
            lambda: matching(read(cluster, pod_path), lambda pod: bool((pod.get("status") or {}).get("podIP"))),
            timeout=60,
            what=f"trainer pod {pod_name} with an IP",
            diagnose=diagnose,
        )
        if pod["status"]["podIP"] != FIRST_FAKE_POD_IP:
            write_trainer_target(pod["status"]["podIP"])
        # the PodMonitor selects this pod, on a port it has
        assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {port["name"]: port["containerPort"] for port in pod["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == trainer_port
        assert pod["metadata"]["labels"][pod_monitor["spec"]["jobLabel"]] == "dptrain-trainer"
        assert pod["spec"]["serviceAccountName"] == env["DPTRAIN_TRAINER_SERVICE_ACCOUNT"]

        job_path = f"/apis/dptrain.io/v1alpha1/namespaces/{namespace}/dptrainingjobs/{job}"

        def job_finished() -> dict[str, Any] | None:
            if operator.process is None or operator.process.poll() is not None:
                raise AssertionError(f"the operator exited while the job ran\n{diagnose()}")
            return matching(
                read(cluster, job_path), lambda job: (job.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            )

        finished = wait_for(job_finished, timeout=240, what=f"DPTrainingJob {job} to finish", diagnose=diagnose)
        assert finished["status"]["phase"] == "Succeeded", f"{finished['status']}\n{diagnose()}"

        # the operator's final state and the trainer's series have reached Prometheus
        prometheus.wait_for_series('dptrain_jobs{phase="Succeeded"} > 0', timeout=30)
        prometheus.wait_for_series(
            f'dptrain_dataset_epsilon_spent{{namespace="{namespace}", dataset="{dataset}"}} > 0', timeout=30
        )
        trainer_seen = prometheus.query_range(
            f'max_over_time(up{{job="dptrain-trainer", namespace="{namespace}"}}[1h])', started - 5, time.time()
        )
        assert any(float(v) == 1 for item in trainer_seen for _, v in item["values"]), (
            f"trainer never scraped\n{diagnose()}"
        )
        end = time.time()

        # every dashboard query of the jobs' panels returns data (as Grafana runs them: range queries); the
        # Federations row's queries (fed by a federation, not by this job) must at least run
        empty = []
        federations = False
        for panel in board["panels"]:
            federations = federations or (panel.get("type") == "row" and panel.get("title") == "Federations")
            for target in panel.get("targets", []):
                expr = grafana_substitute(target["expr"], namespace, job)
                result = prometheus.query_range(expr, started - 5, end)
                if not federations and not has_values(result):
                    empty.append(f"{panel['title']!r} [{target['refId']}]: {expr}")
        assert federations, "the dashboard has no Federations row"
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty) + f"\n{diagnose()}"
        # and its variables list this namespace and job
        assert namespace in prometheus.label_values(
            "namespace", '{__name__=~"dptrain_epsilon_target|dptrain_dataset_epsilon_budget"}'
        )
        assert job in prometheus.label_values("job", f'dptrain_epsilon_target{{namespace="{namespace}"}}')

        # every alert expression evaluates; the ε-above-target alert has no series, ever
        alerts = [rule for group in rule_object["spec"]["groups"] for rule in group["rules"]]
        for rule in alerts:
            prometheus.query(rule["expr"])
            prometheus.query_range(rule["expr"], started - 5, end)
        (epsilon_alert,) = [rule for rule in alerts if rule["alert"] == "DptrainEpsilonAboveTarget"]
        assert prometheus.query(epsilon_alert["expr"]) == []
        assert prometheus.query_range(epsilon_alert["expr"], started - 5, end) == []
        assert prometheus.query_range('ALERTS{alertname="DptrainEpsilonAboveTarget"}', started - 5, end) == []
        # the NotReporting alert selects the trainer's real target (not a vacuous selector)
        assert prometheus.query('up{job="dptrain-trainer"}')
        # Prometheus itself loaded and evaluated every rule without error
        loaded = wait_for(
            lambda: all_evaluated(prometheus.rules()),
            timeout=30,
            what="every rule evaluated",
        )
        assert sorted(rule["name"] for rule in loaded) == sorted(rule["alert"] for rule in alerts)
        assert all(rule["health"] == "ok" for rule in loaded), [(r["name"], r.get("lastError")) for r in loaded]
        (epsilon_state,) = [rule["state"] for rule in loaded if rule["name"] == "DptrainEpsilonAboveTarget"]
        assert epsilon_state == "inactive"


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"
