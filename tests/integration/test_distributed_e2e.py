"""End to end, distributed: the real operator runs a 2-worker gang on the fake node (two `dptrain run` pods that
rendezvous over torch.distributed with gloo), and a killed follower restarts the gang with every step charged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from kubernetes.client import CoreV1Api

from tests.support.cluster import Cluster
from tests.support.e2e import (
    apply,
    condition,
    dataset_manifest,
    diagnose,
    get,
    job_manifest,
    phase_is,
    pods,
    wait_for,
)
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

DELTA = 1e-5


def gang_job(name: str, *, epochs: int) -> dict[str, object]:
    return job_manifest(
        name,
        dataset={"datasetRef": {"name": "wards"}},
        privacy={"targetEpsilon": 3.0, "accountant": "pld"},
        training={"epochs": epochs, "batchSize": 64},
        distributed={"workers": 2},
    )


def journal_intents(node: FakeNode, namespace: str, job: str) -> list[dict[str, object]]:
    journal = node.pvc_dir(namespace, f"{job}-checkpoint") / "privacy-journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return [entry for entry in entries if entry.get("type") == "intent"]


def pld_epsilon(intents: list[dict[str, object]], *, partition: str) -> float:
    """An independent composition (Google's dp_accounting, PLD) of what the journal says ran in one partition."""
    accountant = pld_privacy_accountant.PLDAccountant()
    for entry in intents:
        if entry["partition"] == partition:
            event = dp_event.PoissonSampledDpEvent(
                float(entry["sampleRate"]),  # type: ignore[arg-type]
                dp_event.GaussianDpEvent(float(entry["noiseMultiplier"])),  # type: ignore[arg-type]
            )
            accountant.compose(event, int(entry["steps"]))  # type: ignore[call-overload]
    return float(accountant.get_epsilon(DELTA))


def test_two_worker_gang_succeeds_with_epsilon_on_status(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, dataset_manifest("wards", epsilon=8.0))
    apply(cluster, namespace, gang_job("pair", epochs=2))
    job = wait_for(
        phase_is(cluster, namespace, "pair", "Succeeded", "Failed"),
        timeout=300,
        what="the 2-worker job to finish",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, node, operator)()
    # The follower ran on the node (quietly: only rank 0 prints; the pod may be gone already, it is deleted once the
    # leader has ended) and the run was one of 2 processes.
    assert node.log_path(namespace, "pair-attempt-1-worker-1").exists()
    assert {pod["metadata"]["name"] for pod in pods(cluster, namespace)} <= {
        "pair-attempt-1",
        "pair-attempt-1-worker-1",
    }
    distributed = job["status"]["distributed"]
    assert distributed["worldSize"] == 2
    assert [(worker["index"], worker["pod"]) for worker in distributed["workers"]] == [
        (0, "pair-attempt-1"),
        (1, "pair-attempt-1-worker-1"),
    ]
    privacy = job["status"]["privacy"]
    assert privacy["steps"] == privacy["plannedSteps"] > 0
    report = json.loads((node.pvc_dir(namespace, "pair-checkpoint") / "privacy-report.json").read_text())
    assert report["guarantee"]["epsilon"] <= privacy["epsilonSpent"] <= report["guarantee"]["epsilon"] + 1e-6
    assert privacy["epsilonSpent"] <= 3.0
    assert report["runtime"]["processes"] == 2
    # The ledger charges the gang once (pod 0's journal), not once per pod.
    (entry,) = get(cluster, namespace, "pds", "wards")["status"]["ledger"]
    intents = journal_intents(node, namespace, "pair")
    charged = sum(int(e["steps"]) for e in intents if e["partition"] == "train")  # type: ignore[call-overload]
    assert (entry["state"], entry["train"]["steps"]) == ("Committed", charged)
    assert charged == privacy["plannedSteps"]
    assert pld_epsilon(intents, partition="train") <= privacy["epsilonSpent"] + 1e-6


def test_killed_follower_restarts_the_gang_and_every_step_is_charged(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, dataset_manifest("wards", epsilon=8.0))
    apply(cluster, namespace, gang_job("relay", epochs=25))  # long enough that the kill lands mid-training
    checkpoint = node.pvc_dir(namespace, "relay-checkpoint") / "checkpoint.pt"
    wait_for(
        checkpoint.exists, timeout=180, what="a first checkpoint", diagnose=diagnose(cluster, namespace, node, operator)
    )
    node.kill(namespace, "relay-attempt-1-worker-1")
    job = wait_for(
        phase_is(cluster, namespace, "relay", "Succeeded", "Failed"),
        timeout=420,
        what="the restarted gang to finish",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, node, operator)()
    assert job["status"]["attempts"] == 2
    assert condition(job, "Succeeded")["status"] == "True"
    assert "resum" in node.logs(namespace, "relay-attempt-2").lower()
    intents = journal_intents(node, namespace, "relay")
    train = [e for e in intents if e["partition"] == "train"]
    assert {e["attempt"] for e in train} == {1, 2}
    charged = sum(int(e["steps"]) for e in train)  # type: ignore[call-overload]
    privacy = job["status"]["privacy"]
    # Every step that ran is charged: the killed attempt's chunks stay in the journal (the one it died in
    # included), the resumed attempt re-charges the steps it re-runs, and the total never exceeds the plan
    # (the run ends up to one chunk early instead).
    assert privacy["plannedSteps"] - 5 <= charged <= privacy["plannedSteps"]
    (entry,) = get(cluster, namespace, "pds", "wards")["status"]["ledger"]
    assert (entry["state"], entry["train"]["steps"], entry["pods"]) == ("Committed", charged, 2)
    assert privacy["epsilonSpent"] <= 3.0 + 1e-9
    assert pld_epsilon(intents, partition="train") <= privacy["epsilonSpent"] + 1e-6


def _gate(cluster: Cluster, namespace: str, name: str, gates: list[dict[str, str]]) -> None:
    patch = {"spec": {"schedulingGates": gates or None}}  # merge patch: null removes the field
    CoreV1Api(cluster.api).patch_namespaced_pod(name, namespace, patch, _content_type="application/merge-patch+json")


def test_a_gated_gang_is_created_whole_and_starts_as_a_unit_when_ungated(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    """What Kueue does with a pod group: its webhook gates every pod at creation, and it admits the group by removing
    the gate from all of them at once. A gang whose followers waited for the leader's IP would deadlock (the leader
    never runs before admission, the group is never complete). Here no node runs yet: once the operator has created
    the whole gang, the test gates its pods as Kueue's webhook would (the testenv serves Pod as a custom resource, so
    the gates can be added after creation), starts a node, sees nothing run, then ungates them all."""
    document = gang_job("queued", epochs=2)
    document["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "ward-queue"}
    apply(cluster, namespace, dataset_manifest("wards", epsilon=8.0), document)
    names = ["queued-attempt-1", "queued-attempt-1-worker-1"]
    created = wait_for(
        lambda: (found := pods(cluster, namespace)) and len(found) == 2 and found,
        timeout=60,
        what="the whole gang to be created before any pod runs",
    )
    assert sorted(pod["metadata"]["name"] for pod in created) == names
    groups = {pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for pod in created}
    assert len(groups) == 1
    assert {pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] for pod in created} == {"2"}
    for name in names:
        _gate(cluster, namespace, name, [{"name": "kueue.x-k8s.io/admission"}])
    with FakeNode(cluster.api, namespace, work_dir=tmp_path / "node") as node:
        time.sleep(3)
        assert all(not pod["spec"].get("nodeName") for pod in pods(cluster, namespace)), "a gated pod was started"
        for name in names:
            _gate(cluster, namespace, name, [])
        job = wait_for(
            phase_is(cluster, namespace, "queued", "Succeeded", "Failed"),
            timeout=300,
            what="the admitted gang to finish",
            diagnose=diagnose(cluster, namespace, node, operator),
        )
        assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, node, operator)()
        assert job["status"]["attempts"] == 1
        report = json.loads((node.pvc_dir(namespace, "queued-checkpoint") / "privacy-report.json").read_text())
        assert report["runtime"]["processes"] == 2
        assert node.errors == []
