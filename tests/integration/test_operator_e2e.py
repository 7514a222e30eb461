"""End to end: the real operator, the live API server, the fake node running real `dptrain run` pods."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from dptrain_accounting import partitioned_epsilon
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
    segment,
    wait_for,
)
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_job_runs_to_success_and_reports_epsilon(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    started = time.monotonic()
    apply(cluster, namespace, job_manifest("tiny"))
    wait_for(lambda: pods(cluster, namespace), timeout=30, what="the trainer pod")
    pod_latency = time.monotonic() - started
    job = wait_for(
        phase_is(cluster, namespace, "tiny", "Succeeded", "Failed"),
        timeout=180,
        what="job to finish",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, node, operator)()
    privacy = job["status"]["privacy"]
    report = json.loads((node.pvc_dir(namespace, "tiny-checkpoint") / "privacy-report.json").read_text())
    assert privacy["epsilonSpent"] <= privacy["targetEpsilon"] == 2.0
    # Status shows the trainer's ε, rounded up (never down) to 6 decimals.
    epsilon = report["guarantee"]["epsilon"]
    assert epsilon <= privacy["epsilonSpent"] <= epsilon + 1e-6
    assert privacy["steps"] == privacy["plannedSteps"]
    assert job["status"]["progress"]["percent"] == "100%"
    assert condition(job, "Succeeded")["status"] == "True"
    assert job["status"]["attempts"] == 1
    assert pod_latency < 30

    def reasons() -> set[str]:
        events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
        return {event["reason"] for event in json.loads(events)["items"]}

    # kopf posts events in the background, just after the status write.
    wait_for(lambda: {"Admitted", "PodCreated", "Succeeded"} <= reasons(), timeout=10, what=f"events, got {reasons()}")
    table = cluster.kubectl("get", "dptj", "tiny", "-n", namespace).stdout
    assert "Succeeded" in table
    assert "100%" in table


def test_budget_refusal_creates_no_pod(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    apply(cluster, namespace, dataset_manifest("small-budget", epsilon=1.0))
    apply(cluster, namespace, job_manifest("greedy", dataset={"datasetRef": {"name": "small-budget"}}))
    job = wait_for(phase_is(cluster, namespace, "greedy", "Failed"), timeout=60, what="refusal")
    failed = condition(job, "Failed")
    assert failed["reason"] == "BudgetExceeded"
    assert "remaining ε=1" in failed["message"]
    assert pods(cluster, namespace) == []
    dataset = get(cluster, namespace, "pds", "small-budget")
    (entry,) = dataset["status"]["ledger"]  # the refusal is recorded in the ledger, and charges nothing
    assert (entry["state"], entry["jobName"]) == ("Refused", "greedy")
    assert dataset["status"]["epsilonRemaining"] == 1.0


def test_racing_jobs_never_overshoot_the_budget(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    """20 identical jobs race for one budget; exactly as many as fit are admitted, the rest refused."""
    budget = 6.0
    apply(cluster, namespace, dataset_manifest("shared", epsilon=budget))
    # Suspended jobs are admitted (budget reserved) but start no pod: the race is about the ledger.
    jobs = [
        job_manifest(f"racer-{i}", dataset={"datasetRef": {"name": "shared"}}, runPolicy={"suspend": True})
        for i in range(20)
    ]
    apply(cluster, namespace, *jobs)
    names = [job["metadata"]["name"] for job in jobs]

    def all_decided() -> list[dict[str, Any]] | None:
        found = [get(cluster, namespace, "dptj", name) for name in names]
        phases = [job.get("status", {}).get("phase") for job in found]
        return found if all(phase in ("Suspended", "Failed") for phase in phases) else None

    decided = wait_for(all_decided, timeout=240, what="all 20 jobs admitted or refused")
    admitted = [job for job in decided if job["status"]["phase"] == "Suspended"]
    refused = [job for job in decided if job["status"]["phase"] == "Failed"]
    refusals = [condition(job, "Failed") for job in refused]
    assert all(refusal["reason"] == "BudgetExceeded" for refusal in refusals), refusals
    entry = get(cluster, namespace, "pds", "shared")["status"]["ledger"][0]
    train, holdout = segment(entry["train"]), segment(entry["holdout"])
    fits = max(k for k in range(1, 21) if partitioned_epsilon([train] * k, [holdout] * k, delta=1e-5) <= budget)
    assert len(admitted) == fits
    dataset = get(cluster, namespace, "pds", "shared")
    reserved = [entry for entry in dataset["status"]["ledger"] if entry["state"] == "Reserved"]
    assert sorted(entry["jobName"] for entry in reserved) == sorted(job["metadata"]["name"] for job in admitted)
    train = [segment(entry["train"]) for entry in reserved]
    holdout = [segment(entry["holdout"]) for entry in reserved]
    assert partitioned_epsilon(train, holdout, delta=1e-5) <= budget
    assert dataset["status"]["epsilonRemaining"] >= 0


def test_trainer_crash_retries_and_resumes(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, dataset_manifest("cohort", epsilon=8.0))
    apply(
        cluster,
        namespace,
        job_manifest("crashy", dataset={"datasetRef": {"name": "cohort"}}, training={"epochs": 30}),
    )
    journal = node.pvc_dir(namespace, "crashy-checkpoint") / "privacy-journal.jsonl"
    checkpoint = node.pvc_dir(namespace, "crashy-checkpoint") / "checkpoint.pt"
    wait_for(checkpoint.exists, timeout=120, what="a first checkpoint")
    node.kill(namespace, "crashy-attempt-1")
    job = wait_for(
        phase_is(cluster, namespace, "crashy", "Succeeded", "Failed"),
        timeout=240,
        what="the retried job to finish",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, node, operator)()
    assert job["status"]["attempts"] == 2
    assert "resum" in node.logs(namespace, "crashy-attempt-2").lower()
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    intents = [entry for entry in entries if entry.get("type") == "intent" and entry["partition"] == "train"]
    assert {entry["attempt"] for entry in intents} == {1, 2}
    charged = sum(entry["steps"] for entry in intents)
    privacy = job["status"]["privacy"]
    assert charged <= privacy["plannedSteps"]
    assert privacy["epsilonSpent"] <= privacy["targetEpsilon"]
    dataset = get(cluster, namespace, "pds", "cohort")
    (entry,) = dataset["status"]["ledger"]
    assert (entry["state"], entry["train"]["steps"], entry["pods"], entry["startedPods"]) == (
        "Committed",
        charged,
        2,
        1,
    )


def test_operator_restart_converges_without_duplicate_pods(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, job_manifest("steady", training={"epochs": 4}))
    wait_for(phase_is(cluster, namespace, "steady", "Running"), timeout=60, what="Running")
    operator.kill()
    time.sleep(2)
    operator.start()
    job = wait_for(
        phase_is(cluster, namespace, "steady", "Succeeded", "Failed"),
        timeout=180,
        what="the job to finish after the operator restart",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert job["status"]["phase"] == "Succeeded"
    assert [pod["metadata"]["name"] for pod in pods(cluster, namespace)] == ["steady-attempt-1"]
    assert job["status"]["attempts"] == 1


def test_suspend_and_resume(cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess) -> None:
    apply(cluster, namespace, job_manifest("pausable", training={"epochs": 6}))
    checkpoint = node.pvc_dir(namespace, "pausable-checkpoint") / "checkpoint.pt"
    wait_for(checkpoint.exists, timeout=120, what="a first checkpoint")
    suspend = json.dumps({"spec": {"runPolicy": {"suspend": True}}})
    cluster.kubectl("patch", "dptj", "pausable", "-n", namespace, "--type", "merge", "-p", suspend)
    wait_for(phase_is(cluster, namespace, "pausable", "Suspended"), timeout=60, what="Suspended")
    wait_for(
        lambda: not pods(cluster, namespace) or None,
        timeout=30,
        what="the pod to be deleted",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert get(cluster, namespace, "pvc", "pausable-checkpoint"), "the checkpoint claim must be kept"
    resume = json.dumps({"spec": {"runPolicy": {"suspend": False}}})
    cluster.kubectl("patch", "dptj", "pausable", "-n", namespace, "--type", "merge", "-p", resume)
    job = wait_for(
        phase_is(cluster, namespace, "pausable", "Succeeded", "Failed"),
        timeout=180,
        what="the resumed job to finish",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert job["status"]["phase"] == "Succeeded"
    assert job["status"]["attempts"] == 2, diagnose(cluster, namespace, node, operator)()
    assert job["status"]["privacy"]["epsilonSpent"] <= 2.0


def test_deadline_fails_the_job_and_stops_its_pod(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    apply(
        cluster,
        namespace,
        job_manifest("slowpoke", training={"epochs": 200}, runPolicy={"activeDeadlineSeconds": 3}),
    )
    job = wait_for(phase_is(cluster, namespace, "slowpoke", "Failed"), timeout=60, what="DeadlineExceeded")
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: (
            all(p.get("status", {}).get("phase") in ("Failed", "Succeeded") for p in pods(cluster, namespace))
            or not pods(cluster, namespace)
        ),
        timeout=30,
        what="the pod to stop",
    )


def test_deletion_cleans_up_and_charges_what_the_journal_proves(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, dataset_manifest("records", epsilon=8.0))
    apply(
        cluster, namespace, job_manifest("doomed", dataset={"datasetRef": {"name": "records"}}, training={"epochs": 50})
    )
    wait_for(phase_is(cluster, namespace, "doomed", "Running"), timeout=60, what="Running")
    planned = get(cluster, namespace, "dptj", "doomed")["status"]["privacy"]["plannedSteps"]
    journal = node.pvc_dir(namespace, "doomed-checkpoint") / "privacy-journal.jsonl"
    wait_for(journal.exists, timeout=60, what="the journal")
    # The pod's finalizer keeps it until the operator read what its journal charged (SIGTERM: it checkpoints
    # and reports), then the job, its pod and its claim go.
    cluster.kubectl("delete", "dptj", "doomed", "-n", namespace, "--wait=true", "--timeout=90s")
    assert pods(cluster, namespace) == []
    assert not get(cluster, namespace, "pvc", "doomed-checkpoint")
    (entry,) = get(cluster, namespace, "pds", "records")["status"]["ledger"]
    charged = sum(
        e["steps"] for e in map(json.loads, journal.read_text().splitlines()[1:]) if e["partition"] == "train"
    )
    assert (entry["state"], entry["outcome"], entry["train"]["steps"]) == ("Committed", "Deleted", charged)
    assert charged < planned  # charged by its journal, not in full


def test_unplannable_job_fails_with_a_clear_reason(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    apply(cluster, namespace, job_manifest("loose-delta", privacy={"delta": 0.01}))
    job = wait_for(phase_is(cluster, namespace, "loose-delta", "Failed"), timeout=60, what="InvalidPlan")
    failed = condition(job, "Failed")
    assert failed["reason"] == "InvalidPlan"
    assert "delta" in failed["message"]
    assert pods(cluster, namespace) == []


def test_operator_exports_dataset_budget_metrics(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    apply(cluster, namespace, dataset_manifest("watched", epsilon=5.0))

    def exported() -> str | None:
        text = operator.metrics()
        return text if 'dataset="watched"' in text else None

    text = wait_for(exported, timeout=30, what="the dataset gauge")
    line = next(row for row in text.splitlines() if row.startswith("dptrain_dataset_epsilon_remaining{"))
    assert float(line.rsplit(" ", 1)[1]) == 5.0
    assert "dptrain_jobs{" in text


def test_finished_job_is_deleted_after_its_ttl(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    apply(
        cluster,
        namespace,
        job_manifest("short-lived", privacy={"delta": 0.01}, runPolicy={"ttlSecondsAfterFinished": 8}),
    )
    wait_for(phase_is(cluster, namespace, "short-lived", "Failed"), timeout=60, what="the job to finish")
    wait_for(
        lambda: not get(cluster, namespace, "dptj", "short-lived") or None,
        timeout=30,
        what="TTL deletion",
        diagnose=lambda: json.dumps(get(cluster, namespace, "dptj", "short-lived"), indent=1) + operator.logs()[-3000:],
    )


def test_replaced_checkpoint_claim_fails_the_job_and_keeps_it_charged(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    """A retry on an empty claim would start a fresh journal and hide what earlier attempts spent."""
    apply(cluster, namespace, dataset_manifest("ward", epsilon=8.0))
    apply(
        cluster,
        namespace,
        job_manifest("fragile", dataset={"datasetRef": {"name": "ward"}}, training={"epochs": 50}),
    )
    job = wait_for(phase_is(cluster, namespace, "fragile", "Running"), timeout=60, what="Running")
    (entry,) = get(cluster, namespace, "pds", "ward")["status"]["ledger"]
    assert entry["checkpointClaimUid"]
    planned = job["status"]["privacy"]["plannedSteps"]
    cluster.kubectl("delete", "pvc", "fragile-checkpoint", "-n", namespace)
    job = wait_for(phase_is(cluster, namespace, "fragile", "Failed"), timeout=60, what="CheckpointLost")
    assert condition(job, "Failed")["reason"] == "CheckpointLost"
    (entry,) = get(cluster, namespace, "pds", "ward")["status"]["ledger"]
    assert (entry["state"], entry["train"]["steps"]) == ("Committed", planned)
