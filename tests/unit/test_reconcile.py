"""The job reconciler as a state machine, against an in-memory API (no cluster): admission, attempts, retries,
backoff, permanent failures, CheckpointLost, suspend/resume, deadlines, ledger reservation and commit."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dptrain_api import ExitCode, LedgerEntry, PrivateDataset, RunOutcome, TerminationMessage
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.jobs import delete_children, reconcile_and_write
from dptrain_operator.jobstate import JobState
from dptrain_operator.metrics import OperatorMetrics
from dptrain_operator.settings import Settings
from tests.support.fakekube import FakeKube

NS = "ward"
LOG = logging.getLogger("test-reconcile")


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def ctx(kube: FakeKube) -> OperatorContext:
    return OperatorContext(settings=Settings(metrics_port=0, liveness_port=0), kube=kube, metrics=OperatorMetrics())


def _job(name: str = "study", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"builtin": "breast-cancer"},
        "model": {"architecture": "logistic"},
        "privacy": {"targetEpsilon": 2.0, "delta": 1e-5, "noiseMultiplier": 3.0},
        "training": {"epochs": 1, "batchSize": 64},
        "checkpoint": {"everySteps": 5},
    }
    body.update(spec)
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob", "metadata": {"name": name, "namespace": NS},
            "spec": body}  # fmt: skip


def _dataset(name: str = "cohort", epsilon: float = 10.0) -> dict[str, Any]:
    spec = {"source": {"builtin": "breast-cancer"}, "budget": {"epsilon": epsilon, "delta": 1e-5}}
    metadata = {"name": name, "namespace": NS}
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "PrivateDataset", "metadata": metadata, "spec": spec}


def _reconcile(kube: FakeKube, ctx: OperatorContext, name: str = "study") -> JobState:
    job = kube.get_job(NS, name)
    assert job is not None
    state = reconcile_and_write(ctx, NS, name, job["metadata"]["uid"], LOG)
    assert state is not None
    return state


def _status(kube: FakeKube, name: str = "study") -> dict[str, Any]:
    job = kube.get_job(NS, name)
    assert job is not None
    return dict(job.get("status") or {})


def _condition(kube: FakeKube, type: str, name: str = "study") -> dict[str, Any]:
    return next(c for c in _status(kube, name)["conditions"] if c["type"] == type)


def _end_pod(kube: FakeKube, attempt: int, code: int, message: TerminationMessage | None = None) -> None:
    terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
    if message is not None:
        terminated["message"] = message.to_text()
    kube.set_pod_status(NS, f"study-attempt-{attempt}", {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
    })  # fmt: skip


def _ledger(kube: FakeKube) -> list[LedgerEntry]:
    dataset = kube.get_dataset(NS, "cohort")
    assert dataset is not None
    status = PrivateDataset.model_validate(dataset).status
    return list(status.ledger) if status is not None else []


def _pod_names(kube: FakeKube) -> list[str]:
    return [pod["metadata"]["name"] for pod in kube.pods(NS)]


def test_a_new_job_is_planned_admitted_and_gets_its_first_pod(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job())
    state = _reconcile(kube, ctx)
    status = _status(kube)
    assert status["phase"] == "Pending"
    assert _condition(kube, "Admitted")["status"] == "True"
    assert status["privacy"]["noiseMultiplier"] == 3.0
    assert status["privacy"]["plannedSteps"] == status["progress"]["totalSteps"] > 0
    assert status["attempts"] == 1
    assert _pod_names(kube) == ["study-attempt-1"]
    assert kube.get("ConfigMap", NS, "study-config") is not None
    assert status["checkpointClaimUid"] == kube.claim_uid(NS, "study-checkpoint")
    assert [event.reason for event in state.events] == ["Admitted", "PodCreated", "Started"]
    _reconcile(kube, ctx)  # level-triggered: nothing new while the pod is pending
    assert _pod_names(kube) == ["study-attempt-1"]


def test_a_dataset_job_reserves_and_commits_what_the_journal_charged(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_dataset())
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}))
    _reconcile(kube, ctx)
    [entry] = _ledger(kube)
    assert entry.state == "Reserved"
    planned = entry.steps
    _end_pod(kube, 1, 0, TerminationMessage(status=RunOutcome.SUCCEEDED, exit_code=0, epsilon=0.5, charged_steps=3))
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Succeeded"
    assert _status(kube)["privacy"]["steps"] == 3
    [entry] = _ledger(kube)
    assert (entry.state, entry.steps) == ("Committed", 3)
    assert planned > 3


def test_a_job_that_does_not_fit_the_budget_fails_without_a_pod(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_dataset(epsilon=0.1))
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}))
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Failed"
    assert _condition(kube, "Failed")["reason"] == "BudgetExceeded"
    assert "remaining" in _condition(kube, "Failed")["message"]
    assert _pod_names(kube) == []
    assert _ledger(kube) == []


def test_reservations_retry_through_conflicting_writers(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_dataset())
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}))
    kube.conflicts_to_inject = 5
    _reconcile(kube, ctx)
    assert [entry.state for entry in _ledger(kube)] == ["Reserved"]


def test_a_failed_pod_is_retried_until_the_backoff_limit(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_dataset())
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}, runPolicy={"backoffLimit": 1}))
    _reconcile(kube, ctx)
    _end_pod(kube, 1, ExitCode.CRASHED)
    state = _reconcile(kube, ctx)
    assert "AttemptFailed" in [event.reason for event in state.events]
    assert _pod_names(kube) == ["study-attempt-1", "study-attempt-2"]
    assert _status(kube)["attempts"] == 2
    assert _ledger(kube)[0].state == "Reserved"
    _end_pod(kube, 2, 137)  # killed, no termination message: what ran is unknown
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "BackoffLimitExceeded"
    [entry] = _ledger(kube)
    assert entry.state == "Committed"
    assert entry.steps == _status(kube)["privacy"]["plannedSteps"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [(ExitCode.INVALID_CONFIGURATION, "InvalidConfiguration"), (ExitCode.INVALID_DATA, "InvalidData"),
     (ExitCode.INVALID_MODEL, "InvalidModel"), (ExitCode.CHECKPOINT_UNUSABLE, "CheckpointUnusable"),
     (ExitCode.PRIVACY_BUDGET, "PrivacyBudgetExhausted")],
)  # fmt: skip
def test_an_exit_that_retrying_cannot_fix_fails_at_once(
    kube: FakeKube, ctx: OperatorContext, code: int, reason: str
) -> None:
    kube.put(_job())
    _reconcile(kube, ctx)
    message = TerminationMessage(status=RunOutcome.FAILED, exit_code=code, error="what to fix", charged_steps=0)
    _end_pod(kube, 1, code, message)
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == reason
    assert _condition(kube, "Failed")["message"] == "what to fix"
    assert _pod_names(kube) == ["study-attempt-1"]


def test_an_empty_dir_job_cannot_resume_so_a_failure_is_final(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job(checkpoint={"volume": "emptyDir"}))
    _reconcile(kube, ctx)
    assert kube.get("PersistentVolumeClaim", NS, "study-checkpoint") is None
    _end_pod(kube, 1, ExitCode.CRASHED)
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "PodFailed"
    assert "emptyDir" in _condition(kube, "Failed")["message"]


def test_a_replaced_checkpoint_claim_fails_the_job_and_keeps_it_charged(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_dataset())
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}))
    _reconcile(kube, ctx)
    claim = kube.get("PersistentVolumeClaim", NS, "study-checkpoint")
    assert claim is not None
    kube.delete_claim(NS, "study-checkpoint")
    kube.put({**claim, "metadata": {"name": "study-checkpoint", "namespace": NS}})  # same name, new uid
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "CheckpointLost"
    assert _pod_names(kube) == []
    [entry] = _ledger(kube)
    assert (entry.state, entry.steps) == ("Committed", _status(kube)["privacy"]["plannedSteps"])


def test_suspend_deletes_the_pod_and_resume_starts_the_next_attempt(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job())
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    job["spec"]["runPolicy"] = {"suspend": True}
    kube.put(job)
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Suspended"
    assert _condition(kube, "Suspended")["status"] == "True"
    assert _pod_names(kube) == []
    job = kube.get_job(NS, "study")
    assert job is not None
    job["spec"]["runPolicy"] = {"suspend": False}
    kube.put(job)
    _reconcile(kube, ctx)
    assert _condition(kube, "Suspended")["status"] == "False"
    assert _pod_names(kube) == ["study-attempt-2"]  # resumes from the checkpoint in a new pod


def test_lost_status_is_recovered_from_the_pods(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job())
    _reconcile(kube, ctx)
    _end_pod(kube, 1, ExitCode.CRASHED)
    _reconcile(kube, ctx)
    assert _pod_names(kube) == ["study-attempt-1", "study-attempt-2"]
    job = kube.get_job(NS, "study")
    assert job is not None
    job["status"]["attempts"] = 1  # an operator crash lost the last status write
    kube.put(job)
    _reconcile(kube, ctx)
    assert _pod_names(kube) == ["study-attempt-1", "study-attempt-2"]  # no duplicate pod
    assert _status(kube)["attempts"] == 2


def test_the_deadline_stops_the_job(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job(runPolicy={"activeDeadlineSeconds": 60}))
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    job["status"]["startTime"] = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.put(job)
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "DeadlineExceeded"
    assert _pod_names(kube) == []


def test_a_missing_dataset_keeps_the_job_pending(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}))
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Pending"
    assert _condition(kube, "Admitted")["reason"] == "DatasetNotFound"
    kube.put(_dataset())
    _reconcile(kube, ctx)
    assert _condition(kube, "Admitted")["status"] == "True"


def test_an_unplannable_job_fails_with_what_to_fix(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job(privacy={"targetEpsilon": 2.0, "delta": 0.1}))
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "InvalidPlan"
    assert "lower privacy.delta" in _condition(kube, "Failed")["message"]


def test_deleting_a_job_removes_its_children_and_commits_in_full(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_dataset())
    kube.put(_job(dataset={"datasetRef": {"name": "cohort"}}))
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    delete_children(job, ctx)
    assert _pod_names(kube) == []
    assert kube.get("ConfigMap", NS, "study-config") is None
    assert kube.get("PersistentVolumeClaim", NS, "study-checkpoint") is None
    [entry] = _ledger(kube)
    assert entry.state == "Committed"
    assert entry.steps == job["status"]["privacy"]["plannedSteps"]
