"""The Helm chart (charts/dptrain), without a cluster: lint, rendered objects valid against the real Kubernetes
schemas, values documented and strictly validated, RBAC exactly what the operator's code calls, CRDs identical to
crds/, alert rules and dashboard queries that Prometheus accepts and that only use metrics dptrain exports.

`helm` comes from PATH or ../shared/testenv/install.sh; `promtool` from the Debian package `prometheus`. A test that
needs a missing tool is skipped, saying which.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kopf
import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s_client

import dptrain_api
from dptrain_operator.handlers import register
from dptrain_operator.metrics import OperatorMetrics
from dptrain_operator.settings import Settings
from tests.support import cluster as cluster_support

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dptrain"
CRDS_DIR = REPO / "crds"
KUBE_PY = REPO / "operator" / "src" / "dptrain_operator" / "kube.py"
KUBERNETES_VERSION = "1.36.0"
RELEASE, NAMESPACE = "dptrain", "dptrain-system"
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
# Metrics the trainer must export (the dashboard and alerts rely on them; dptrain.metrics may export more).
TRAINER_METRICS = {
    "dptrain_epsilon_spent",
    "dptrain_epsilon_target",
    "dptrain_holdout_loss",
    "dptrain_eval_accuracy",
    "dptrain_eval_auc",
    "dptrain_progress_ratio",
    "dptrain_steps_total",
}

MONITORING_ON = (
    "--set",
    "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true",
)
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "namespaced-rbac": ("--set", "rbac.namespaced=true", "--set", "watchNamespaces={team-a,team-b}"),
    "monitoring": MONITORING_ON,
    "crds-off": ("--set", "crds.enabled=false"),
    "networkpolicy-off": ("--set", "networkPolicy.enabled=false"),
    "everything-set": (
        *MONITORING_ON,
        "--set",
        "watchNamespaces={ml}",
        "--set",
        "operator.image.digest=sha256:" + "a" * 64,
        "--set",
        "operator.verbose=true,operator.priorityClassName=critical,operator.nodeSelector.pool=system",
        "--set",
        "operator.imagePullSecrets={regcred}",
        "--set-json",
        'operator.extraEnv=[{"name":"DPTRAIN_CHECKPOINT_MOUNT_PATH","value":"/ckpt"}]',
        "--set-json",
        'operator.tolerations=[{"key":"dedicated","operator":"Equal","value":"ml","effect":"NoSchedule"}]',
        "--set-json",
        'operator.affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":'
        '[{"matchExpressions":[{"key":"pool","operator":"In","values":["system"]}]}]}}}',
        "--set-json",
        'networkPolicy.dnsPeers=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"kube-system"}},'
        '"podSelector":{"matchLabels":{"k8s-app":"kube-dns"}}}]',
        "--set-json",
        'networkPolicy.prometheus.namespaceSelector={"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}',
        "--set",
        "trainer.namespaces={ml,ml-eval},monitoring.labels.release=kube-prometheus-stack",
        "--set",
        "monitoring.dashboard.namespace=grafana",
    ),
    "metrics-and-liveness-off": ("--set", "operator.metricsPort=0,operator.livenessPort=0"),
}


# --- tools ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> str:
    binary = cluster_support.helm_binary()
    if binary is None:
        pytest.skip(f"helm not found: not on PATH and no {cluster_support.testenv_dir() / 'install.sh'} to unpack it")
    return binary


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found: install the Debian package `prometheus` (CI installs it)")
    return binary


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = cluster_support.helm_binary()
    assert binary is not None
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@functools.cache
def render(*values: str) -> tuple[dict[str, Any], ...]:
    """Every object `helm template` renders with these value arguments."""
    output = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values).stdout
    return tuple(doc for doc in yaml.safe_load_all(output) if doc)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata'].get('name') for o in found]}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {var["name"]: var["value"] for var in container["env"] if "value" in var}


# --- lint, validity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [VALUE_SETS["defaults"], VALUE_SETS["everything-set"]], ids=["defaults", "all"])
def test_helm_lint_strict(helm: str, values: tuple[str, ...]) -> None:
    result = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ERROR]" not in result.stdout, result.stdout
    assert "[WARNING]" not in result.stdout, result.stdout


def _validate_monitoring_shape(obj: dict[str, Any]) -> None:
    """kubernetes-validate has no schema for the Prometheus Operator kinds: check the fields they need."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert obj["metadata"]["name"]
    assert obj["metadata"]["namespace"]
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"]
        assert spec["endpoints"]
        assert all(endpoint["port"] and endpoint["interval"] for endpoint in spec["endpoints"])
    elif obj["kind"] == "PodMonitor":
        assert spec["selector"]["matchLabels"]
        assert spec["podMetricsEndpoints"]
        assert all(endpoint["port"] for endpoint in spec["podMetricsEndpoints"])
    else:
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"]
            assert group["rules"]
            assert all(
                set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"} for rule in group["rules"]
            )
            assert all(rule["expr"] and ("alert" in rule) != ("record" in rule) for rule in group["rules"])


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_are_valid_kubernetes(helm: str, name: str) -> None:
    objects = render(*VALUE_SETS[name])
    assert objects
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            _validate_monitoring_shape(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    names = [(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_defaults(helm: str) -> None:
    objects = render()
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        [
            *["ClusterRole"] * 5,  # the operator's two, and the submitter, steward and viewer roles
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ConfigMap",
            *["CustomResourceDefinition"] * 5,  # jobs, datasets, ledgers, federations, federation sites
            "Deployment",
            *["NetworkPolicy"] * 3,  # trainer, SuperNode and coordinator pods
            "Service",
            "ServiceAccount",
            "ServiceAccount",
        ]
    )
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert container["command"] == ["dptrain-operator"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"metrics": 8000, "healthz": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}

    accounts = {obj["metadata"]["name"]: obj for obj in of_kind(objects, "ServiceAccount")}
    assert pod["serviceAccountName"] in accounts
    trainer_account = accounts["dptrain-trainer"]
    assert trainer_account["automountServiceAccountToken"] is False
    assert trainer_account["metadata"]["namespace"] == NAMESPACE

    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"

    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["dptrain.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())
    assert not of_kind(objects, "Role")
    assert not of_kind(objects, "RoleBinding")


def test_operator_env_maps_to_the_operator_settings(helm: str) -> None:
    """Every DPTRAIN_* variable of the Deployment is a real operator setting, and the values reach it."""
    objects = render(
        "--set",
        "watchNamespaces={a,b},operator.metricsPort=9100,operator.livenessPort=9101,operator.scrapeInterval=2.5",
        "--set",
        "trainer.image.repository=registry.example/trainer,trainer.image.tag=1.2.3,trainer.image.pullPolicy=Always",
        "--set",
        "trainer.metricsPort=9191,trainer.runAsUser=1234,trainer.serviceAccount.name=trainers",
    )
    env = container_env(one(objects, "Deployment"))
    fields = {name.upper() for name in Settings.model_fields}
    assert {name.removeprefix("DPTRAIN_") for name in env if name.startswith("DPTRAIN_")} <= fields
    settings = Settings.from_env(env)
    assert settings.namespaces == ("a", "b")
    assert settings.trainer_image == "registry.example/trainer:1.2.3"
    assert settings.image_pull_policy == "Always"
    assert settings.metrics_port == 9100
    assert settings.liveness_port == 9101
    assert settings.scrape_interval == 2.5
    assert settings.trainer_metrics_port == 9191
    assert settings.trainer_run_as_user == 1234
    assert settings.trainer_service_account == "trainers"
    defaults = Settings.from_env(container_env(one(render(), "Deployment")))
    assert defaults.namespaces == ()
    assert defaults.trainer_image == "ghcr.io/dptrain/trainer:0.1.0"
    assert defaults.trainer_service_account == "dptrain-trainer"


def test_namespaced_rbac(helm: str) -> None:
    objects = render(*VALUE_SETS["namespaced-rbac"])
    roles = of_kind(objects, "Role")
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["team-a", "team-b"]
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == ["team-a", "team-b"]
    account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        assert binding["roleRef"]["kind"] == "Role"
    assert container_env(one(objects, "Deployment"))["DPTRAIN_NAMESPACES"] == "team-a,team-b"
    for kind, per_namespace in (("ServiceAccount", 1), ("NetworkPolicy", 3)):
        trainer_objects = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] != account]
        assert sorted(obj["metadata"]["namespace"] for obj in trainer_objects) == sorted(
            ["team-a", "team-b"] * per_namespace
        )
    # only the ledgers (cluster-scoped) and kopf's listing stay cluster-wide
    (cluster_role,) = [
        role for role in of_kind(objects, "ClusterRole") if role["metadata"]["name"].endswith("-cluster")
    ]
    assert grants(cluster_role["rules"]) == CLUSTER_GRANTS | NAMESPACE_LISTING | expected_ledger_grants()


def test_namespaced_rbac_needs_watch_namespaces(helm: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), "--set", "rbac.namespaced=true", check=False)
    assert result.returncode != 0
    assert "watchNamespaces" in result.stderr


@pytest.mark.parametrize(
    ("name", "kind"), [("crds-off", "CustomResourceDefinition"), ("networkpolicy-off", "NetworkPolicy")]
)
def test_switches(helm: str, name: str, kind: str) -> None:
    assert of_kind(render(), kind)
    assert not of_kind(render(*VALUE_SETS[name]), kind)


def test_metrics_and_liveness_off(helm: str) -> None:
    objects = render(*VALUE_SETS["metrics-and-liveness-off"])
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "livenessProbe" not in container
    assert "ports" not in container
    assert not of_kind(objects, "Service")
    env = container_env(one(objects, "Deployment"))
    assert Settings.from_env(env).metrics_port == 0
    assert Settings.from_env(env).liveness_port == 0


def test_monitoring_objects_select_what_exists(helm: str) -> None:
    """ServiceMonitor -> the operator Service's port; PodMonitor and NetworkPolicy -> the labels and port of the
    trainer pods the operator renders with the chart's settings."""
    from dptrain_api import DPTrainingJob, parse_resource
    from tests.support.manifests import base_manifest, sample_trainer_pod

    objects = render(*VALUE_SETS["monitoring"])
    service = one(objects, "Service")
    service_monitor = one(objects, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert service_monitor["spec"]["endpoints"][0]["honorLabels"] is True

    document = base_manifest("job")
    document["metadata"].update(namespace="ml", uid="0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10")
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    settings = Settings.from_env(container_env(one(objects, "Deployment")))
    pod = sample_trainer_pod(job, settings)
    (pod_monitor,) = [item for item in of_kind(objects, "PodMonitor") if item["metadata"]["name"].endswith("-trainer")]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "dptrain-trainer"}
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    ports = {port["name"]: port["containerPort"] for port in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports
    assert endpoint["honorLabels"] is True
    assert pod_monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"  # job="dptrain-trainer", as the alerts expect
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}

    policies = {item["metadata"]["name"].rsplit("-", 1)[-1]: item for item in of_kind(objects, "NetworkPolicy")}
    assert set(policies) == {"trainer", "supernode", "coordinator"}
    network_policy = policies["trainer"]
    assert network_policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (ingress,) = network_policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": ports[endpoint["port"]]}]
    operator_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    operator_peer = ingress["from"][0]
    assert operator_peer["podSelector"]["matchLabels"].items() <= operator_labels.items()
    assert operator_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    assert ingress["from"][1]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    (egress,) = network_policy["spec"]["egress"]
    assert sorted((port["protocol"], port["port"]) for port in egress["ports"]) == [("TCP", 53), ("UDP", 53)]
    assert "to" not in egress

    for kind in MONITORING_KINDS:
        for item in of_kind(objects, kind):  # what kube-prometheus-stack selects
            assert item["metadata"]["labels"]["release"] == RELEASE

    # A federation's pods (operator-rendered, issue 13): their PodMonitor and NetworkPolicies select them.
    from tests.support.federation_render import sample_federation_pods

    coordinator_pod, supernode_pod = sample_federation_pods(settings)
    (federation_monitor,) = [m for m in of_kind(objects, "PodMonitor") if m["metadata"]["name"].endswith("-federation")]
    selector = federation_monitor["spec"]["selector"]
    for federated in (coordinator_pod, supernode_pod):
        labels = federated["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        assert all(labels[e["key"]] in e["values"] for e in selector["matchExpressions"])
        assert "metrics" in {port["name"] for port in federated["spec"]["containers"][0]["ports"]}
    supernode_policy, coordinator_policy = policies["supernode"], policies["coordinator"]
    assert supernode_policy["spec"]["podSelector"]["matchLabels"].items() <= supernode_pod["metadata"]["labels"].items()
    assert (
        coordinator_policy["spec"]["podSelector"]["matchLabels"].items()
        <= coordinator_pod["metadata"]["labels"].items()
    )
    dial = supernode_policy["spec"]["egress"][1]
    assert dial == {"ports": [{"protocol": "TCP", "port": 9092}]}  # out to a SuperLink, nothing else but DNS
    assert coordinator_policy["spec"]["ingress"][0] == {"ports": [{"protocol": "TCP", "port": 9092}]}
    assert len(coordinator_policy["spec"]["egress"]) == 1  # DNS only


def test_monitoring_labels_are_configurable(helm: str) -> None:
    objects = render(*VALUE_SETS["everything-set"])
    for kind in MONITORING_KINDS:
        for item in of_kind(objects, kind):
            assert item["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for monitor in of_kind(objects, "PodMonitor"):
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    assert one(objects, "ConfigMap")["metadata"]["namespace"] == "grafana"
    trainer_namespaces = sorted(obj["metadata"]["namespace"] for obj in of_kind(objects, "NetworkPolicy"))
    assert trainer_namespaces == sorted(["ml", "ml-eval"] * 3)  # trainer, SuperNode and coordinator pods


def render_notes(tmp_path: Path, *values: str) -> str:
    """NOTES.txt as `helm install` prints it (helm template skips it): rendered through a scratch copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  NOTES.txt: {{ include "dptrain/templates/NOTES.txt" . | quote }}\n'
    )
    output = run_helm(
        "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only", "templates/zz-notes.yaml", *values
    ).stdout
    notes: str = yaml.safe_load(output)["data"]["NOTES.txt"]
    return notes


@pytest.mark.parametrize("name", ["defaults", "namespaced-rbac", "monitoring", "crds-off"])
def test_notes_give_next_steps(helm: str, tmp_path: Path, name: str) -> None:
    notes = render_notes(tmp_path, *VALUE_SETS[name])
    first_namespace = "team-a" if name == "namespaced-rbac" else NAMESPACE
    assert f"kubectl apply -n {first_namespace} -f examples/" in notes
    assert f"kubectl get dptj -n {first_namespace}" in notes
    assert f"deployment/{RELEASE}" in notes
    assert "Grafana" in notes
    assert "Privacy spent (ε) vs target, per job" in notes
    assert ("kubectl apply -f crds/" in notes) == (name == "crds-off")
    assert ('{"release":"dptrain"}' in notes) == (name == "monitoring")


# --- values: schema, comments, README table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--set", "operator.unknownKey=1"), "unknownKey"),
        (("--set", "unknownTopLevel=true"), "unknownTopLevel"),
        (("--set", "monitoring.podMonitor.scrapeTimeout=5s"), "scrapeTimeout"),
        (("--set-json", 'operator.affinity={"nodeAffinity":{"typo":1}}'), "typo"),
        (("--set", "operator.metricsPort=70000"), "metricsPort"),
        (("--set", "trainer.image.pullPolicy=Sometimes"), "pullPolicy"),
    ],
)
def test_schema_refuses_unknown_keys_and_bad_values(helm: str, arguments: tuple[str, ...], message: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), *arguments, check=False)
    assert result.returncode != 0, f"helm template accepted {arguments}"
    assert "schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_schema_is_closed_everywhere() -> None:
    """Every object in values.schema.json either lists its properties with additionalProperties false, or is a map
    whose values have a schema: no place where an unknown key would be silently accepted."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            types = node.get("type")
            is_object = types == "object" or (isinstance(types, list) and "object" in types)
            if is_object and "$ref" not in node:
                additional = node.get("additionalProperties")
                if "properties" in node and additional is not False:
                    open_objects.append(path)
                if "properties" not in node and not isinstance(additional, dict):
                    open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}")

    walk(schema, "#")
    assert not open_objects, f"objects accepting unknown keys: {open_objects}"


def _schema_node(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    """The schema of the value at ``path`` (following $ref, properties and additionalProperties), or None."""
    node: Any = schema
    for key in path:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        if key in node.get("properties", {}):
            node = node["properties"][key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return dict(node)


def test_schema_is_checked_against_values_yaml() -> None:
    """values.yaml is the documented source: every key there has a schema, every key the schema names outside the
    embedded Kubernetes definitions is in values.yaml (documented), and the defaults validate against the schema."""
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    keys = _keys_of(values)
    missing = [key for key in keys if _schema_node(schema, re.split(r"(?<!\\)\.", key)) is None]
    assert not missing, f"values.yaml keys without a schema: {missing}"
    named: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, child in node.get("properties", {}).items():
            path = prefix + key.replace(".", "\\.")
            named.add(path)
            walk(child, path + ".")

    walk(schema, "")
    assert named <= keys, f"the schema names keys values.yaml does not document: {sorted(named - keys)}"
    described = _load_values_table_script().schema_with_descriptions(schema, CHART / "values.yaml")
    assert described == schema, "descriptions differ from values.yaml: run charts/dptrain/values-table.py --write"


def _keys_of(values: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(values, dict):
        for key, value in values.items():
            path = prefix + str(key).replace(".", "\\.")
            keys.add(path)
            keys |= _keys_of(value, path + ".")
    return keys


def test_every_value_has_a_comment() -> None:
    """Uses the README table generator's own parser, so the table and this check read comments alike."""
    text = (CHART / "values.yaml").read_text()
    comments: dict[str, str] = _load_values_table_script()._comments(text.splitlines())
    assert set(comments) == _keys_of(yaml.safe_load(text))  # the line parser saw every key
    undocumented = [key for key, comment in comments.items() if not comment]
    assert not undocumented, f"values without a comment: {undocumented}"


def _load_values_table_script() -> Any:
    spec = importlib.util.spec_from_file_location("values_table", CHART / "values-table.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_lists_exactly_the_values() -> None:
    readme = (CHART / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE)
    keys = _keys_of(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert len(rows) == len(set(rows)), "a key is listed twice"
    assert set(rows) == keys, f"missing: {sorted(keys - set(rows))}; not in values.yaml: {sorted(set(rows) - keys)}"
    table = _load_values_table_script().render_table(CHART / "values.yaml")
    assert table in readme, "README.md is out of date: run .venv/bin/python charts/dptrain/values-table.py --write"


# --- RBAC: exactly what the code calls --------------------------------------------------------------------------------

Grant = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
CLUSTER_GRANTS: set[Grant] = {
    # kopf's resource observer lists and watches CRDs cluster-wide (kopf/_core/reactor/observation.py).
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
# kopf's namespace observer lists and watches namespaces when it is given namespaces (not clusterwide).
NAMESPACE_LISTING: set[Grant] = {("", "namespaces", "list"), ("", "namespaces", "watch")}
# kopf posts Kubernetes events for handler outcomes and kopf.event() (kopf/_cogs/clients/events.py: core v1 events).
KOPF_EVENTS: set[Grant] = {("", "events", "create")}
# What kopf does on every kind it handles: list + watch, and patch (finalizers, its progress annotations).
KOPF_VERBS_PER_KIND = ("list", "watch", "patch")


def grants(rules: list[dict[str, Any]]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in rules:
        assert "*" not in rule["verbs"], f"wildcard in {rule}"
        assert "*" not in rule["resources"], f"wildcard in {rule}"
        assert not rule.get("resourceNames")
        assert not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


_HTTP_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def _client_call_grant(api_class: type, method: str, arguments: dict[str, Any]) -> Grant:
    """(group, resource, verb) of one kubernetes-client method, read from the client's own request builder."""
    source = inspect.getsource(getattr(api_class, f"_{method}_serialize"))
    http_method = re.search(r"method='(\w+)'", source)
    path = re.search(r"resource_path='([^']+)'", source)
    assert http_method, f"cannot read the request of {api_class.__name__}.{method}"
    assert path, f"cannot read the request of {api_class.__name__}.{method}"
    parts = path.group(1).strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    if group == "{group}":
        group = arguments["group"]
    if rest[:2] == ["namespaces", "{namespace}"]:
        rest = rest[2:]
    resource = arguments["plural"] if rest[0] == "{plural}" else rest[0]
    has_name = len(rest) > 1 and rest[1] == "{name}"
    subresource = rest[2] if has_name and len(rest) > 2 else None
    if http_method.group(1) == "GET":
        verb = "get" if has_name else "list"
    elif http_method.group(1) == "DELETE":
        verb = "delete" if has_name else "deletecollection"
    else:
        verb = _HTTP_VERBS[http_method.group(1)]
    return group, f"{resource}/{subresource}" if subresource else resource, verb


def derive_kube_grants(source: str) -> set[Grant]:
    """Every API call of kube.py (self.<api>.<method>(...)), mapped to the RBAC it needs."""
    tree = ast.parse(source)
    constants: dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant):
            for name in statement.targets:
                if isinstance(name, ast.Name):
                    constants[name.id] = statement.value.value
        if isinstance(statement, ast.ImportFrom) and statement.module == "dptrain_api":
            for alias in statement.names:
                constants[alias.asname or alias.name] = getattr(dptrain_api, alias.name)
    # self.core = client.CoreV1Api(...): attribute -> API class
    apis: dict[str, type] = {}
    for assign in ast.walk(tree):
        if (
            isinstance(assign, ast.Assign)
            and isinstance(assign.value, ast.Call)
            and isinstance(assign.value.func, ast.Attribute)
            and hasattr(k8s_client, assign.value.func.attr)
        ):
            for target in assign.targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    apis[target.attr] = getattr(k8s_client, assign.value.func.attr)
    assert apis, "kube.py builds no kubernetes API objects (self.x = client.XApi(...))"

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id, f"<{node.id}>")
        return "<expr>"

    found: set[Grant] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self"):
            continue
        if owner.attr not in apis:
            continue
        api_class, method = apis[owner.attr], node.func.attr
        parameters = [name for name in inspect.signature(getattr(api_class, method)).parameters if name != "self"]
        arguments = {name: value(arg) for name, arg in zip(parameters, node.args, strict=False)}
        arguments.update({kw.arg: value(kw.value) for kw in node.keywords if kw.arg})
        found.add(_client_call_grant(api_class, method, arguments))
    return found


def derive_kopf_grants() -> set[Grant]:
    """kopf's needs on every kind the operator registers handlers for (read from the real registry): list, watch and
    patch (finalizers, progress annotations) where it reconciles; list and watch only where it just indexes or
    watches (the operator's pods and claims, the PrivacyLedgers)."""
    registry = kopf.OperatorRegistry()
    register(registry, SimpleNamespace(settings=Settings()))  # type: ignore[arg-type]
    reconciling = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    observing = [*registry._watching.get_all_handlers(), *registry._indexing.get_all_handlers()]
    assert not registry._webhooks.get_all_handlers(), "webhooks would need more grants"
    # A selector names its kind by plural, kind, singular or short name: resolve it to the plural via crds/.
    plurals: dict[tuple[str, str], str] = {
        ("", "pods"): "pods",
        ("", "persistentvolumeclaims"): "persistentvolumeclaims",
    }
    for path in CRDS_DIR.glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())["spec"]
        names = spec["names"]
        for alias in (names["plural"], names["kind"], names.get("singular"), *names.get("shortNames", [])):
            if alias:
                plurals[(spec["group"], alias)] = names["plural"]

    def kinds(handlers: list[Any]) -> set[tuple[str, str]]:
        found = set()
        for handler in handlers:
            if handler.selector is None:
                continue
            group = handler.selector.group or ""
            name = str(handler.selector.plural or handler.selector.any_name or handler.selector.kind)
            assert (group, name) in plurals, f"kopf handler on {group}/{name}: not a known kind"
            found.add((group, plurals[(group, name)]))
        return found

    reconciled, observed = kinds(reconciling), kinds(observing)
    assert reconciled, "no kopf handlers registered"
    full = {(group, plural, verb) for group, plural in reconciled for verb in KOPF_VERBS_PER_KIND}
    return full | {(group, plural, verb) for group, plural in observed for verb in ("list", "watch")} | KOPF_EVENTS


_LEDGERS = ("privacyledgers", "privacyledgers/status")


def expected_namespaced_grants() -> set[Grant]:
    everything = derive_kube_grants(KUBE_PY.read_text()) | derive_kopf_grants()
    return {grant for grant in everything if grant[1] not in _LEDGERS}


def expected_ledger_grants() -> set[Grant]:
    """The PrivacyLedgers are cluster-scoped: granted cluster-wide in either RBAC mode (kopf watches them too)."""
    everything = derive_kube_grants(KUBE_PY.read_text()) | derive_kopf_grants()
    return {grant for grant in everything if grant[1] in _LEDGERS}


def test_rbac_derivation_reads_the_code() -> None:
    """The derivation itself: known calls map to the right grants, and a new call in kube.py shows up."""
    derived = derive_kube_grants(KUBE_PY.read_text())
    assert ("", "pods", "create") in derived
    assert ("", "pods", "list") in derived
    assert ("dptrain.io", "dptrainingjobs/status", "patch") in derived
    assert ("dptrain.io", "privatedatasets/status", "update") in derived
    assert ("dptrain.io", "privatedatasets", "get") in derived
    extra = KUBE_PY.read_text() + (
        "\n\nclass Extra(Kube):\n"
        "    def secret(self, namespace: str) -> Any:\n"
        "        return self.core.read_namespaced_secret('x', namespace)\n"
        "    def jobs(self) -> Any:\n"
        "        return self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, JOBS)\n"
    )
    assert derive_kube_grants(extra) - derived == {
        ("", "secrets", "get"),
        ("dptrain.io", "dptrainingjobs", "list"),
    }


def test_cluster_role_grants_exactly_what_the_operator_calls(helm: str) -> None:
    objects = render()
    roles = {role["metadata"]["name"]: role for role in of_kind(objects, "ClusterRole")}
    account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    granted: set[Grant] = set()
    for binding in of_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        granted |= grants(roles[binding["roleRef"]["name"]]["rules"])
    expected = expected_namespaced_grants() | expected_ledger_grants() | CLUSTER_GRANTS
    assert granted == expected, (
        f"granted but unused: {sorted(granted - expected)}; missing: {sorted(expected - granted)}"
    )


def test_namespaced_roles_grant_exactly_what_the_operator_calls(helm: str) -> None:
    objects = render(*VALUE_SETS["namespaced-rbac"])
    expected = expected_namespaced_grants()
    for role in of_kind(objects, "Role"):
        granted = grants(role["rules"])
        assert granted == expected, (
            f"granted but unused: {sorted(granted - expected)}; missing: {sorted(expected - granted)}"
        )


# --- user roles: what a namespace user can and cannot do to a budget ------------------------------------------------


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    """RBAC's own rule matching (no wildcards are used in the chart)."""
    return any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] for rule in rules)


# The requests each way around a budget needs (the reliability section of README.md lists them).
BYPASSES: dict[str, list[Grant]] = {
    "delete and re-create a charged PrivateDataset": [("dptrain.io", "privatedatasets", "delete")],
    "patch a PrivateDataset's status (its ledger copy)": [
        ("dptrain.io", "privatedatasets/status", "patch"),
        ("dptrain.io", "privatedatasets/status", "update"),
    ],
    "revive a refused job by patching its status": [
        ("dptrain.io", "dptrainingjobs/status", "patch"),
        ("dptrain.io", "dptrainingjobs/status", "update"),
    ],
    "edit a budget": [("dptrain.io", "privatedatasets", "patch"), ("dptrain.io", "privatedatasets", "update")],
    "pre-create a job's children": [
        ("", "configmaps", "create"),
        ("", "persistentvolumeclaims", "create"),
        ("", "pods", "create"),
    ],
    "write a ledger": [
        ("dptrain.io", "privacyledgers", "create"),
        ("dptrain.io", "privacyledgers", "delete"),
        ("dptrain.io", "privacyledgers", "update"),
        ("dptrain.io", "privacyledgers/status", "update"),
    ],
}


def test_a_job_submitter_can_make_none_of_the_requests_around_a_budget(helm: str) -> None:
    roles = {role["metadata"]["name"]: role["rules"] for role in of_kind(render(), "ClusterRole")}
    submitter = roles["dptrain-job-submitter"]
    assert _allowed(submitter, "dptrain.io", "dptrainingjobs", "create")  # what the role is for
    assert _allowed(submitter, "dptrain.io", "privatedatasets", "get")
    for bypass, requests in BYPASSES.items():
        for request in requests:
            assert not _allowed(submitter, *request), f"a submitter could {bypass}: {request}"
    steward = roles["dptrain-data-steward"]
    assert _allowed(steward, "dptrain.io", "privatedatasets", "update")  # the steward sets budgets...
    for request in (*BYPASSES["patch a PrivateDataset's status (its ledger copy)"], *BYPASSES["write a ledger"]):
        assert not _allowed(steward, *request), request  # ...but writes no ledger, directly or through a status
    viewer = roles["dptrain-viewer"]
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in viewer)


def test_user_roles_aggregate_into_the_kubernetes_roles(helm: str) -> None:
    labels = {role["metadata"]["name"]: role["metadata"]["labels"] for role in of_kind(render(), "ClusterRole")}
    submitter = labels["dptrain-job-submitter"]
    assert submitter["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in labels["dptrain-data-steward"]
    assert labels["dptrain-viewer"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    names = {
        role["metadata"]["name"] for role in of_kind(render("--set", "rbac.userRoles.create=false"), "ClusterRole")
    }
    assert not any("submitter" in name or "steward" in name for name in names)


# --- CRDs -------------------------------------------------------------------------------------------------------------


def _strip_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    crd = json.loads(json.dumps(crd))
    metadata = crd["metadata"]
    assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    for label in (
        "helm.sh/chart",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
    ):
        assert label in metadata["labels"], label
        del metadata["labels"][label]
    return crd


def test_chart_crds_equal_crds_dir(helm: str) -> None:
    chart_crds = {
        crd["metadata"]["name"]: _strip_chart_metadata(crd) for crd in of_kind(render(), "CustomResourceDefinition")
    }
    source = {}
    for path in sorted(CRDS_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        source[crd["metadata"]["name"]] = crd
    assert source, "no CRDs in crds/"
    assert chart_crds.keys() == source.keys(), "run `make crds`"
    for name, crd in source.items():
        assert chart_crds[name] == crd, f"{name} differs from crds/: run `make crds`"


def test_chart_crd_templates_are_generated() -> None:
    from dptrain_api.crdgen import main as crdgen

    assert crdgen(["--out", str(CRDS_DIR), "--chart", str(CHART / "templates" / "crds"), "--check"]) == 0, (
        "run `make crds`"
    )


# --- alerts and dashboard ---------------------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Sample names the operator (dptrain_operator.metrics) and the trainer (dptrain.metrics) export."""
    from dptrain.federated.metrics import FederationExporter
    from dptrain.metrics import PrometheusExporter

    names: set[str] = set()
    registries = [
        OperatorMetrics().registry,
        PrometheusExporter(labels={"job": "j", "namespace": "n"}).registry,
        FederationExporter(federation="f", namespace="n").registry,
    ]
    for registry in registries:
        for family in registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (strings, label matchers, grouping labels and functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text))
    return {name for name in names if name not in _PROMQL_KEYWORDS and not re.fullmatch(r"\d+[smhdwy]?|e\d*", name)}


def alert_rules() -> list[dict[str, Any]]:
    rule_object = one(render(*VALUE_SETS["monitoring"]), "PrometheusRule")
    return [rule for group in rule_object["spec"]["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "files" / "dashboard.json").read_text())
    return loaded


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels with queries (rows only group them)."""
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def substitute_dashboard_variables(expr: str, namespace: str = ".*", job: str = ".*") -> str:
    return expr.replace("$namespace", namespace).replace("$job", job).replace("$__rate_interval", "1m")


def test_promtool_accepts_the_rendered_rules(helm: str, promtool: str, tmp_path: Path) -> None:
    rule_object = one(render(*VALUE_SETS["monitoring"]), "PrometheusRule")
    rules_file = tmp_path / "dptrain-rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule_object["spec"], sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout, result.stdout


def test_alerts(helm: str) -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "DptrainDatasetBudgetNearlySpent",
        "DptrainJobFailed",
        "DptrainTrainerNotReporting",
        "DptrainEpsilonAboveTarget",
        "DptrainAuditContradictsEpsilon",
    }
    assert (
        "dptrain_dataset_epsilon_spent / (dptrain_dataset_epsilon_budget > 0) >= 0.9"
        in rules["DptrainDatasetBudgetNearlySpent"]["expr"]
    )
    assert "increase(dptrain_job_failures_total" in rules["DptrainJobFailed"]["expr"]
    assert rules["DptrainTrainerNotReporting"]["expr"].strip() == 'up{job="dptrain-trainer"} == 0'
    assert rules["DptrainEpsilonAboveTarget"]["expr"].strip() == "dptrain_epsilon_spent > dptrain_epsilon_target"
    assert (
        rules["DptrainAuditContradictsEpsilon"]["expr"].strip()
        == "dptrain_audit_epsilon_lower_bound > dptrain_audit_epsilon"
    )
    assert rules["DptrainAuditContradictsEpsilon"]["labels"]["severity"] == "critical"
    exported = exported_metric_names() | {"up"}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        used = promql_metric_names(rule["expr"])
        assert used, name
        assert used <= exported, f"{name} uses metrics nobody exports: {used - exported}"


def test_trainer_exports_the_metrics_the_dashboard_documents() -> None:
    exported = exported_metric_names()
    assert exported >= TRAINER_METRICS
    assert exported >= {"dptrain_jobs", "dptrain_dataset_epsilon_budget", "dptrain_dataset_epsilon_spent"}
    assert "dptrain_dataset_epsilon_remaining" in exported


def test_dashboard(helm: str) -> None:
    board = dashboard()
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exported = exported_metric_names()
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    panels = query_panels(board)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r}: empty expr"
            assert target["datasource"] == panel["datasource"]
            used = promql_metric_names(target["expr"])
            assert used, panel["title"]
            assert used <= exported, f"panel {panel['title']!r} uses metrics nobody exports: {used - exported}"
    for var in variables.values():
        if var["type"] == "query":
            used = promql_metric_names(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["query"]["query"]))
            assert used <= exported | {"__name__"}, var["name"]
    used_everywhere = set().union(*(promql_metric_names(expr) for _, expr in dashboard_queries(board)))
    titles = " | ".join(panel["title"] for panel in panels)
    # the panels the chart's README documents
    for needle in ("ε", "budget", "Held-out loss (DP)", "Held-out metric (DP)", "Steps per second", "Jobs by phase"):
        assert needle in titles, needle
    # the row for federations (issue 13): rounds, ε per site vs target, the global DP metric, round time
    assert [panel["title"] for panel in board["panels"] if panel["type"] == "row"] == ["Federations"]
    assert {
        "dptrain_federation_rounds_completed",
        "dptrain_federation_site_epsilon_spent",
        "dptrain_federation_site_epsilon_target",
        "dptrain_federation_global_auc",
        "dptrain_federation_round_seconds",
    } <= used_everywhere
    assert {"dptrain_epsilon_spent", "dptrain_epsilon_target", "dptrain_dataset_epsilon_remaining"} <= used_everywhere
    assert {
        "dptrain_holdout_loss",
        "dptrain_eval_accuracy",
        "dptrain_steps_total",
        "dptrain_jobs",
    } <= used_everywhere


def test_promtool_accepts_the_dashboard_queries(promtool: str, tmp_path: Path) -> None:
    """Every panel query parses as PromQL (as a recording rule, once the Grafana variables are substituted)."""
    rules = [
        {"record": f"dptrain:dashboard_query_{index}", "expr": substitute_dashboard_variables(expr)}
        for index, (_, expr) in enumerate(dashboard_queries(dashboard()))
    ]
    rules_file = tmp_path / "dashboard-queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promql_metric_names() -> None:
    assert promql_metric_names('max by (namespace, job) (dptrain_epsilon_spent{namespace=~"$namespace"})') == {
        "dptrain_epsilon_spent"
    }
    assert promql_metric_names('delta(dptrain_jobs{phase="Failed"}[15m]) > 0') == {"dptrain_jobs"}
    assert promql_metric_names("a / (b > 0) >= 0.9") == {"a", "b"}
