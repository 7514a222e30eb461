"""The generated CRDs on a live API server: valid manifests accepted with the models' defaults,
the bad-manifest corpus refused naming the field, immutability, printer columns, kubectl explain."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from dptrain_api import parse_resource
from tests.support.manifests import REPO, BadCase, bad_cases, base_manifest, example_documents

pytestmark = pytest.mark.integration


def _apply(cluster: Any, namespace: str, document: dict[str, Any], *, check: bool = True) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document), check=check)


def _get(cluster: Any, namespace: str, kind: str, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def _patch_status(cluster: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    patch = json.dumps(status)
    cluster.kubectl("patch", "dptj", name, "-n", namespace, "--subresource", "status", "--type", "merge", "-p", patch)


def test_examples_are_accepted(cluster: Any, namespace: str) -> None:
    documents = example_documents()
    assert documents
    for _, document in documents:
        _apply(cluster, namespace, document)


@pytest.mark.parametrize("kind", ["job", "dataset"])
def test_server_defaults_equal_the_models_defaults(cluster: Any, namespace: str, kind: str) -> None:
    """Defaults are written once (in api/): what the server stores equals what the models fill in."""
    document = base_manifest(kind)
    _apply(cluster, namespace, document)
    stored = _get(cluster, namespace, document["kind"], document["metadata"]["name"])
    assert stored["spec"] == parse_resource(document).to_wire()["spec"]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda case: case.name)
def test_bad_manifest_is_refused_naming_the_field(cluster: Any, namespace: str, case: BadCase) -> None:
    result = _apply(cluster, namespace, case.document, check=False)
    assert result.returncode != 0, f"{case.name} was accepted"
    assert case.field in result.stderr, result.stderr


def test_privacy_and_plan_are_immutable(cluster: Any, namespace: str) -> None:
    document = base_manifest("job")
    _apply(cluster, namespace, document)
    name = document["metadata"]["name"]
    for patch in ({"privacy": {"targetEpsilon": 8}}, {"training": {"epochs": 50}}, {"dataset": {"builtin": "digits"}}):
        result = cluster.kubectl(
            "patch", "dptj", name, "-n", namespace, "--type", "merge", "-p", json.dumps({"spec": patch}), check=False
        )
        assert result.returncode != 0
        assert "immutable" in result.stderr
    # Run policy stays mutable: suspend/resume must work.
    cluster.kubectl(
        "patch", "dptj", name, "-n", namespace, "--type", "merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}'
    )
    assert _get(cluster, namespace, "dptj", name)["spec"]["runPolicy"]["suspend"] is True


def test_printer_columns_and_short_names(cluster: Any, namespace: str) -> None:
    job = base_manifest("job")
    _apply(cluster, namespace, job)
    status = {"status": {"phase": "Running", "privacy": {"epsilonSpent": 1.25}, "progress": {"percent": "42%"}}}
    _patch_status(cluster, namespace, job["metadata"]["name"], status)
    table = cluster.kubectl("get", "dptj", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "EPSILON", "TARGET", "PROGRESS", "AGE"]
    row = table[1].split()
    assert row[:5] == [job["metadata"]["name"], "Running", "1.25", "3", "42%"]
    _apply(cluster, namespace, base_manifest("dataset"))
    header = cluster.kubectl("get", "pds", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "UNIT", "BUDGET", "SPENT", "RESERVED", "REMAINING", "AGE"]
    listed = cluster.kubectl("get", "dptrain", "-n", namespace, "-o", "name").stdout.split()
    # The `dptrain` category lists jobs and datasets together (and the cluster-scoped PrivacyLedgers, which tests
    # that ran earlier in the session may have left).
    both = [name for name in listed if not name.startswith("privacyledger.")]
    assert sorted(name.split(".")[0] for name in both) == ["dptrainingjob", "privatedataset"]


def test_status_schema_prunes_unknown_fields(cluster: Any, namespace: str) -> None:
    job = base_manifest("job")
    _apply(cluster, namespace, job)
    name = job["metadata"]["name"]
    _patch_status(cluster, namespace, name, {"status": {"phase": "Pending", "bogus": 1}})
    assert _get(cluster, namespace, "dptj", name)["status"] == {"phase": "Pending"}


def test_kubectl_explain_reads_well(cluster: Any) -> None:
    text = cluster.kubectl("explain", "dptj.spec.privacy").stdout
    for needle in ("targetEpsilon", "-required-", "delta", "maxGradNorm", "accountant", "pld", "noiseMultiplier"):
        assert needle in text
    assert "immutable" in text
    dataset = cluster.kubectl("explain", "pds.spec.source.file.features").stdout
    assert "PUBLIC" in dataset
    assert "min" in dataset
    assert "Admitted" in cluster.kubectl("explain", "dptj.status.conditions").stdout


def test_crds_apply_idempotently(cluster: Any) -> None:
    result = cluster.kubectl("apply", "-f", str(REPO / "crds"))
    assert "unchanged" in result.stdout
    crd = yaml.safe_load(cluster.kubectl("get", "crd", "dptrainingjobs.dptrain.io", "-o", "yaml").stdout)
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
