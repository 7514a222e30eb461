"""Federated DP-SGD end to end (issue 13) on the test API server: the real operator, real Flower processes (SuperLink,
SuperNodes, ServerApp, ClientApps) run as pods by the fake kubelet, three hospital namespaces each with its own
PrivateDataset and PrivacyLedger.

* three sites, three rounds: a SuperNode killed mid-round (the round goes on with the others; the site is restarted,
  rejoins and is charged for every step its journal proves ran) and then the coordinator killed (it resumes from the
  last round's global checkpoint); the federation Succeeds and every site's ledger equals an independent
  dp_accounting composition of what that site's journal charged;
* refusals: a dataset without consent (FederationNotAllowed) and one without budget (BudgetExceeded) leave fewer
  than minSites: the federation fails with NotEnoughSites, nothing reserved for the refused;
* a site in a second cluster (its own API server and operator), with TLS and SuperNode authentication, next to an
  in-cluster site and a site refused for its budget: the others finish.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, purge_namespace, raw_request, start_cluster, stop_cluster
from tests.support.e2e import apply, get, wait_for
from tests.support.federation import (
    charged,
    dataset_manifest,
    federation_manifest,
    free_port,
    independent_epsilon,
    journal_entries,
    put_hospital_data,
)
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

FEDERATION_ENV = {"DPTRAIN_FEDERATION_ALLOW_INSECURE": "1", "DPTRAIN_FEDERATION_LOOPBACK": "1"}
SIZES = {"hospital-a": 3200, "hospital-b": 2300, "hospital-c": 2400}


def _namespace(cluster: Cluster, stem: str) -> str:
    name = f"t-{stem}-{uuid.uuid4().hex[:6]}"
    raw_request(
        cluster.api, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    return name


@pytest.fixture
def namespaces(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """A coordinator namespace and one namespace per hospital."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:12].strip("-")
    names = {
        role: _namespace(cluster, f"{stem}-{role[-1] if role != 'coordinator' else 'co'}")
        for role in ("coordinator", "hospital-a", "hospital-b", "hospital-c")
    }
    yield names
    for name in names.values():
        purge_namespace(cluster, name)


@pytest.fixture
def fednode(cluster: Cluster, tmp_path: Path) -> Iterator[FakeNode]:
    """One fake kubelet for every namespace (the pods share the loopback network: distinct 127.0.0.x addresses)."""
    node = FakeNode(cluster.api, None, work_dir=tmp_path / "node", max_grace_seconds=15)
    node.start()
    yield node
    node.stop()
    assert node.errors == []


@pytest.fixture
def operators(tmp_path: Path) -> Iterator[Any]:
    """Start operators (each watching some namespaces of some cluster); all are stopped after the test."""
    started: list[OperatorProcess] = []

    def start(cluster: Cluster, namespaces: list[str], name: str = "operator") -> OperatorProcess:
        process = OperatorProcess(cluster.kubeconfig, ",".join(namespaces), tmp_path / name, extra_env=FEDERATION_ENV)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def _running_pod(node: FakeNode, namespace: str, prefix: str) -> str:
    """The pod whose name starts with ``prefix`` that runs on the node now (the latest attempt)."""
    for number in range(10, 0, -1):
        name = f"{prefix}-{number}"
        if node.pid(namespace, name) is not None:
            return name
    raise AssertionError(f"no running pod {prefix}-N in {namespace}")


def _site(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "datasetRef": {"name": "cohort"}}


def _diagnose(cluster: Cluster, namespaces: dict[str, str], node: FakeNode, operator: OperatorProcess):  # type: ignore[no-untyped-def]
    def text() -> str:
        parts = []
        for namespace in namespaces.values():
            parts.append(
                cluster.kubectl("get", "dpfj,dpfs,pds,pods", "-n", namespace, "-o", "yaml", check=False).stdout[-3000:]
            )
            for pod in json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]:
                parts.append(f"--- {pod['metadata']['name']}\n{node.logs(namespace, pod['metadata']['name'])[-2500:]}")
        return "\n".join(parts) + f"\n--- operator\n{operator.logs()[-5000:]}"

    return text


def _ledger_of(cluster: Cluster, namespace: str) -> dict[str, Any]:
    dataset = get(cluster, namespace, "pds", "cohort")
    found = cluster.kubectl("get", "privacyledger", dataset["status"]["ledgerName"], "-o", "json")
    return dict(json.loads(found.stdout))


def _check_site_ledger(cluster: Cluster, node: FakeNode, namespace: str, site_object: str) -> dict[str, Any]:
    """The site's ledger entry is Committed at exactly what its journal charged, and the dataset's ε equals an
    independent dp_accounting composition of the journal (never below it)."""

    def committed() -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(the ledger, the site's entry) once the entry is Committed: the site's operator commits it when its
        SuperNode has ended, which may be a moment after the coordinator's verdict."""
        ledger = _ledger_of(cluster, namespace)
        (entry,) = [e for e in ledger["status"]["entries"] if e.get("kind") == "DPFederatedSite"]
        return (ledger, entry) if entry["state"] == "Committed" else None

    ledger, entry = wait_for(committed, timeout=120, what=f"the ledger entry of {namespace}/{site_object} committed")
    journal = node.pvc_dir(namespace, f"{site_object}-journal") / "privacy-journal.jsonl"
    entries = journal_entries(journal)
    assert entry["train"]["steps"] == charged(entries, "train"), (entry, entries)
    assert (entry.get("holdout") or {}).get("steps", 0) == charged(entries, "holdout"), (entry, entries)
    reference = independent_epsilon(entries, 1e-5)
    spent = ledger["status"]["epsilonSpent"]
    assert reference <= spent <= reference * 1.01 + 1e-3, (spent, reference)
    assert spent <= 3.0
    return {"entries": entries, "spent": spent, "reference": reference}


def test_federation_of_three_sites_survives_a_killed_supernode_and_coordinator(
    cluster: Cluster, namespaces: dict[str, str], fednode: FakeNode, operators: Any
) -> None:
    coordinator = namespaces["coordinator"]
    for hospital in ("hospital-a", "hospital-b", "hospital-c"):
        path = put_hospital_data(fednode.pvc_dir(namespaces[hospital], "cohort"), hospital)
        apply(
            cluster,
            namespaces[hospital],
            dataset_manifest(path=path, num_examples=SIZES[hospital], budget=8.0, allow=[(coordinator, "hospitals")]),
        )
    operator = operators(cluster, list(namespaces.values()))
    diagnose = _diagnose(cluster, namespaces, fednode, operator)
    sites = [_site(hospital, namespaces[hospital]) for hospital in ("hospital-a", "hospital-b", "hospital-c")]
    apply(
        cluster,
        coordinator,
        federation_manifest("hospitals", sites=sites, port=free_port(), rounds=3, round_timeout=90.0),
    )
    started = time.monotonic()
    killed_site = namespaces["hospital-b"]
    site_object = "hospitals-hospital-b"
    journal = fednode.pvc_dir(killed_site, f"{site_object}-journal") / "privacy-journal.jsonl"

    # 1. Kill hospital-b's SuperNode as soon as its journal charges round 2 (the round is then under way).
    def round_two_charged() -> bool:
        return journal.exists() and charged(journal_entries(journal)) >= 10

    wait_for(round_two_charged, timeout=360, what="hospital-b charging round 2", diagnose=diagnose)
    victim = _running_pod(fednode, killed_site, f"{site_object}-supernode")
    fednode.kill(killed_site, victim)
    # 2. The round goes on with the two others; the operator restarts hospital-b's SuperNode (journal continues).
    wait_for(
        lambda: (
            get(cluster, coordinator, "dpfj", "hospitals").get("status", {}).get("rounds", {}).get("completed", 0) >= 2
        ),
        timeout=300,
        what="round 2 aggregated without hospital-b",
        diagnose=diagnose,
    )
    wait_for(
        lambda: get(cluster, killed_site, "pod", f"{site_object}-supernode-2"),
        timeout=60,
        what="hospital-b's second SuperNode",
        diagnose=diagnose,
    )
    # 3. Kill the coordinator (SuperLink and ServerApp): the next attempt resumes after round 2.
    fednode.kill(coordinator, "hospitals-coordinator-1")
    done = wait_for(
        lambda: (
            (job := get(cluster, coordinator, "dpfj", "hospitals")).get("status", {}).get("phase")
            in ("Succeeded", "Failed")
            and job
        ),
        timeout=420,
        what="the federation to end",
        diagnose=diagnose,
    )
    elapsed = time.monotonic() - started
    assert done["status"]["phase"] == "Succeeded", diagnose()
    assert done["status"]["rounds"]["completed"] == 3
    assert done["status"]["attempts"] == 2
    # the second coordinator resumed from round 2's global checkpoint (it did not start over)
    claim = fednode.pvc_dir(coordinator, "hospitals-federation")
    assert (claim / "resume-from-0002.pt").exists()
    assert "resuming after round 2" in fednode.logs(coordinator, "hospitals-coordinator-2")
    # Every site finished and its ledger holds exactly what its journal charged.
    results = {}
    for hospital in ("hospital-a", "hospital-b", "hospital-c"):
        namespace = namespaces[hospital]
        site = wait_for(
            lambda ns=namespace, h=hospital: (
                (s := get(cluster, ns, "dpfs", f"hospitals-{h}")).get("status", {}).get("phase")
                in ("Succeeded", "Failed")
                and s
            ),
            timeout=120,
            what=f"{hospital} to end",
            diagnose=diagnose,
        )
        results[hospital] = _check_site_ledger(cluster, fednode, namespace, f"hospitals-{hospital}")
        results[hospital]["phase"] = site["status"]["phase"]
    # hospital-b's killed round is charged: its journal has a chunk from SuperNode attempt 1 that no update left with.
    assert results["hospital-b"]["phase"] in ("Succeeded", "Failed")
    statuses = {site["name"]: site for site in done["status"]["sites"]}
    for hospital in ("hospital-a", "hospital-c"):
        assert results[hospital]["phase"] == "Succeeded"
        assert statuses[hospital]["rounds"] == 3
    assert done["status"]["globalMetric"]["metric"] == "auc"
    ledgers = {hospital: (result["spent"], result["reference"]) for hospital, result in results.items()}
    print(f"\nfederation with two kills: {elapsed:.0f}s; ledger ε vs dp_accounting: {json.dumps(ledgers)}")


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


def _wait_phase(cluster: Cluster, namespace: str, kind: str, name: str, *, diagnose: Any, timeout: float = 120) -> Any:
    return wait_for(
        lambda: (
            (obj := get(cluster, namespace, kind, name)).get("status", {}).get("phase") in ("Succeeded", "Failed")
            and obj
        ),
        timeout=timeout,
        what=f"{kind} {namespace}/{name} to end",
        diagnose=diagnose,
    )


def test_sites_without_consent_or_budget_are_refused_and_too_few_remain(
    cluster: Cluster, namespaces: dict[str, str], fednode: FakeNode, operators: Any
) -> None:
    coordinator = namespaces["coordinator"]
    budgets = {"hospital-a": 8.0, "hospital-b": 1.0, "hospital-c": 8.0}
    consent = {"hospital-a": [], "hospital-b": [(coordinator, "refusals")], "hospital-c": [(coordinator, "refusals")]}
    for hospital, budget in budgets.items():
        path = put_hospital_data(fednode.pvc_dir(namespaces[hospital], "cohort"), hospital)
        document = dataset_manifest(path=path, num_examples=SIZES[hospital], budget=budget, allow=consent[hospital])
        apply(cluster, namespaces[hospital], document)
    operator = operators(cluster, list(namespaces.values()))
    diagnose = _diagnose(cluster, namespaces, fednode, operator)
    sites = [_site(hospital, namespaces[hospital]) for hospital in budgets]
    apply(cluster, coordinator, federation_manifest("refusals", sites=sites, port=free_port(), rounds=2))
    done = _wait_phase(cluster, coordinator, "dpfj", "refusals", diagnose=diagnose, timeout=180)
    assert done["status"]["phase"] == "Failed"
    failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NotEnoughSites", failed
    assert "minSites=2" in failed["message"]
    shown = {site["name"]: site for site in done["status"]["sites"]}
    assert (shown["hospital-a"]["phase"], shown["hospital-a"]["reason"]) == ("Refused", "FederationNotAllowed")
    assert (shown["hospital-b"]["phase"], shown["hospital-b"]["reason"]) == ("Refused", "BudgetExceeded")
    # hospital-a: the dataset does not name the federation; nothing was reserved on its ledger
    site_a = _wait_phase(cluster, namespaces["hospital-a"], "dpfs", "refusals-hospital-a", diagnose=diagnose)
    condition = next(c for c in site_a["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "FederationNotAllowed"
    assert "spec.allowFederations" in condition["message"]
    assert not _ledger_of(cluster, namespaces["hospital-a"])["status"].get("entries")
    # hospital-b: its plan does not fit its budget: a Refused entry that charges nothing
    site_b = _wait_phase(cluster, namespaces["hospital-b"], "dpfs", "refusals-hospital-b", diagnose=diagnose)
    condition = next(c for c in site_b["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "BudgetExceeded"
    assert "remaining" in condition["message"]
    ledger_b = _ledger_of(cluster, namespaces["hospital-b"])
    assert [e["state"] for e in ledger_b["status"]["entries"]] == ["Refused"]
    assert ledger_b["status"]["epsilonSpent"] == 0
    # hospital-c was admitted, then told to stop: its entry is committed at what its journal charged (nothing)
    site_c = _wait_phase(cluster, namespaces["hospital-c"], "dpfs", "refusals-hospital-c", diagnose=diagnose)
    assert site_c["spec"]["stop"] is True
    ledger_c = _ledger_of(cluster, namespaces["hospital-c"])
    (entry,) = ledger_c["status"]["entries"]
    assert entry["state"] == "Committed"
    assert entry["train"]["steps"] == 0
    assert ledger_c["status"]["epsilonSpent"] == 0


def test_a_hospital_joins_from_its_own_cluster_with_tls_and_supernode_authentication(
    cluster: Cluster, namespaces: dict[str, str], fednode: FakeNode, operators: Any, tmp_path: Path
) -> None:
    """A second API server with its own operator stands in for another hospital's cluster: its steward applies a
    DPFederatedSite pointing at the coordinator's SuperLink (TLS, its own SuperNode key); its dataset's ledger, in its
    cluster, records the charge. hospital-b (in the coordinator's cluster) has too little budget: refused, while
    hospital-a and the external hospital finish."""
    from dptrain.federated.pki import make_server_pki, make_site_key
    from dptrain_api import DPFederatedJob, SuperLinkConnection, parse_federation_resource, site_object

    coordinator, hospital_a, hospital_b = namespaces["coordinator"], namespaces["hospital-a"], namespaces["hospital-b"]
    pki = make_server_pki(tmp_path / "pki", hosts=["127.0.0.1"])
    keys = {name: make_site_key(tmp_path / "pki", name) for name in ("hospital-a", "hospital-x")}
    ca = pki.ca_certificate.read_text()
    port = free_port()
    # --- the coordinator's cluster: the TLS Secret, hospital-a (consent, its Secrets), hospital-b (no budget left)
    apply(
        cluster,
        coordinator,
        _secret("fed-tls", {"tls.crt": pki.certificate.read_text(), "tls.key": pki.key.read_text(), "ca.crt": ca}),
    )
    apply(
        cluster,
        hospital_a,
        _secret("joint-superlink-ca", {"ca.crt": ca}),
        _secret("joint-hospital-a-supernode-key", {"ssh-privatekey": keys["hospital-a"].private_key.read_text()}),
    )
    for hospital, budget in (("hospital-a", 8.0), ("hospital-b", 1.0)):
        path = put_hospital_data(fednode.pvc_dir(namespaces[hospital], "cohort"), hospital)
        apply(
            cluster,
            namespaces[hospital],
            dataset_manifest(path=path, num_examples=SIZES[hospital], budget=budget, allow=[(coordinator, "joint")]),
        )
    sites = [
        {**_site("hospital-a", hospital_a), "publicKey": keys["hospital-a"].public_key},
        {**_site("hospital-b", hospital_b), "publicKey": "ecdsa-sha2-nistp384 AAAA unused"},
        {"name": "hospital-x", "publicKey": keys["hospital-x"].public_key, "declaredSize": 2400},
    ]
    federation = federation_manifest(
        "joint", sites=sites, port=port, rounds=2, superlink={"tlsSecretName": "fed-tls", "nodeAuthentication": True}
    )
    # --- the hospital's own cluster: its API server, operator and kubelet; its steward's objects
    other = start_cluster(tmp_path / "hospital-cluster")
    other_node = FakeNode(other.api, None, work_dir=tmp_path / "hospital-node", ip_block=200, max_grace_seconds=15)
    try:
        other_node.start()
        remote = _namespace(other, "hospital-x")
        operators(other, [remote], name="hospital-operator")
        path = put_hospital_data(other_node.pvc_dir(remote, "cohort"), "hospital-c")
        apply(
            other,
            remote,
            dataset_manifest(path=path, num_examples=2400, budget=8.0, allow=[(coordinator, "joint")]),
            _secret("superlink-ca", {"ca.crt": ca}),
            _secret("supernode-key", {"ssh-privatekey": keys["hospital-x"].private_key.read_text()}),
        )
        job = parse_federation_resource({**federation, "metadata": {"name": "joint", "namespace": coordinator}})
        assert isinstance(job, DPFederatedJob)
        connection = SuperLinkConnection(
            address=f"127.0.0.1:{port}", ca_secret_name="superlink-ca", auth_key_secret_name="supernode-key"
        )
        external = {**job.spec.sites[2].model_dump(), "namespace": remote, "dataset_ref": {"name": "cohort"}}
        site = site_object(
            job, type(job.spec.sites[2]).model_validate(external), superlink=connection, name="joint-hospital-x"
        )
        document = site.to_wire()
        document["metadata"] = {"name": "joint-hospital-x"}
        apply(other, remote, document)
        # --- the federation
        operator = operators(cluster, list(namespaces.values()))
        diagnose = _diagnose(cluster, namespaces, fednode, operator)
        apply(cluster, coordinator, federation)
        done = _wait_phase(cluster, coordinator, "dpfj", "joint", diagnose=diagnose, timeout=480)

        def remote_diagnose() -> str:
            pods = json.loads(other.kubectl("get", "pods", "-n", remote, "-o", "json").stdout)["items"]
            logs = "\n".join(other_node.logs(remote, pod["metadata"]["name"])[-2000:] for pod in pods)
            objects = other.kubectl("get", "dpfs,pds", "-n", remote, "-o", "yaml").stdout[-3000:]
            return f"{diagnose()}\n--- hospital cluster\n{objects}\n{logs}"

        assert done["status"]["phase"] == "Succeeded", remote_diagnose()
        shown = {entry["name"]: entry for entry in done["status"]["sites"]}
        assert shown["hospital-b"]["phase"] == "Refused"
        assert shown["hospital-b"]["reason"] == "BudgetExceeded"
        assert shown["hospital-x"]["external"] is True
        assert shown["hospital-x"]["rounds"] == 2
        assert shown["hospital-a"]["rounds"] == 2
        # the hospital's own cluster recorded its charge: its journal, its ledger, its site's status
        remote_site = _wait_phase(other, remote, "dpfs", "joint-hospital-x", diagnose=remote_diagnose)
        assert remote_site["status"]["phase"] == "Succeeded", remote_diagnose()
        checked = _check_site_ledger(other, other_node, remote, "joint-hospital-x")
        assert charged(checked["entries"]) == 2 * 5
        assert remote_site["status"]["privacy"]["epsilonSpent"] <= 3.0
        assert _check_site_ledger(cluster, fednode, hospital_a, "joint-hospital-a")["spent"] <= 3.0
        # TLS and SuperNode authentication were on: the SuperLink registered both sites' keys by name
        superlink_log = (fednode.pvc_dir(coordinator, "joint-federation") / "flower" / "superlink.log").read_text()
        assert "--insecure" not in " ".join(
            json.loads(get(cluster, coordinator, "pod", "joint-coordinator-1") and "[]")
        )
        assert "SuperNode" in superlink_log or superlink_log
    finally:
        other_node.stop()
        stop_cluster(other)
