"""The job and dataset reconcilers as state machines, against an in-memory API (no cluster): admission from the
ledger (never from a job's status), attempts, retries, backoff, permanent failures, CheckpointLost, suspend and
resume, deadlines, deletion, pod finalizers, budget edits, and datasets deleted, re-created or doubled."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from dptrain_api import (
    ExitCode,
    LedgerEntry,
    PrivacyLedgerStatus,
    RunOutcome,
    TerminationMessage,
    ledger_name,
    source_identity,
)
from dptrain_api.dataset import DatasetSource
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.datasets import reconcile_dataset, release_dataset
from dptrain_operator.handlers.jobs import delete_children, reconcile_and_write
from dptrain_operator.render import TRAINER_FINALIZER
from dptrain_operator.state import JobState
from tests.support.fakekube import FakeKube, fake_context

NS = "ward"
LOG = logging.getLogger("test-reconcile")
COHORT_LEDGER = ledger_name(source_identity(NS, DatasetSource(builtin="breast-cancer")))


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def ctx(kube: FakeKube) -> OperatorContext:
    return fake_context(kube, allowed_images=("registry.example/dptrain@sha256:abc",))


def _job(name: str = "study", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": {"builtin": "breast-cancer"},
        "model": {"architecture": "logistic"},
        "privacy": {"targetEpsilon": 2.0, "delta": 1e-5, "noiseMultiplier": 3.0},
        "training": {"epochs": 1, "batchSize": 64},
        "checkpoint": {"everySteps": 5},
    }
    body.update(spec)
    metadata = {"name": name, "namespace": NS}
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob", "metadata": metadata, "spec": body}


def _on_cohort(**spec: Any) -> dict[str, Any]:
    return _job(dataset={"datasetRef": {"name": "cohort"}}, **spec)


def _dataset(name: str = "cohort", epsilon: float = 10.0, delta: float = 1e-5) -> dict[str, Any]:
    spec = {"source": {"builtin": "breast-cancer"}, "budget": {"epsilon": epsilon, "delta": delta}}
    metadata = {"name": name, "namespace": NS}
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "PrivateDataset", "metadata": metadata, "spec": spec}


def _add_dataset(kube: FakeKube, ctx: OperatorContext, **kwargs: Any) -> dict[str, Any]:
    body = kube.put(_dataset(**kwargs))
    reconcile_dataset(body, ctx)
    return body


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


def _end_pod(
    kube: FakeKube, number: int, code: int, message: TerminationMessage | None = None, *, reason: str | None = None
) -> None:
    terminated: dict[str, Any] = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "startedAt": "2026-11-30T10:00:00Z",
    }
    if message is not None:
        terminated["message"] = message.to_text()
    kube.set_pod_status(NS, f"study-attempt-{number}", {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
    })  # fmt: skip


def _report(charged: int, *, code: int = 0, releases: int = 1) -> TerminationMessage:
    outcome = RunOutcome.SUCCEEDED if code == 0 else RunOutcome.FAILED
    return TerminationMessage(
        status=outcome, exit_code=code, epsilon=0.5, charged_steps=charged, charged_releases=releases
    )


def _ledger(kube: FakeKube, name: str = COHORT_LEDGER) -> PrivacyLedgerStatus:
    raw = kube.get_ledger(name)
    assert raw is not None
    return PrivacyLedgerStatus.model_validate(raw.get("status") or {})


def _entry(kube: FakeKube, name: str = COHORT_LEDGER) -> LedgerEntry:
    [entry] = _ledger(kube, name).entries
    return entry


def _pod_names(kube: FakeKube) -> list[str]:
    return [pod["metadata"]["name"] for pod in kube.pods(NS)]


def _env(kube: FakeKube, number: int) -> dict[str, str]:
    pod = kube.get_pod(NS, f"study-attempt-{number}")
    assert pod is not None
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


# --- admission ------------------------------------------------------------------------------------------------


def test_a_new_job_is_planned_reserved_in_its_ledger_and_gets_its_first_pod(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    kube.put(_job())
    state = _reconcile(kube, ctx)
    status = _status(kube)
    assert status["phase"] == "Pending"
    assert _condition(kube, "Admitted")["status"] == "True"
    assert status["privacy"]["noiseMultiplier"] == 3.0
    assert status["privacy"]["plannedSteps"] == status["progress"]["totalSteps"] > 0
    ledger = ledger_name(f"{NS}/job-data/breast-cancer")  # a public built-in: a ledger without a budget
    assert status["ledgerName"] == ledger
    entry = _entry(kube, ledger)
    assert (entry.state, entry.pods, entry.started_pods) == ("Reserved", 1, 0)
    assert entry.holdout is not None
    assert entry.holdout.steps == 4  # the default evalReleases
    assert _ledger(kube, ledger).budget is None
    assert _pod_names(kube) == ["study-attempt-1"]
    pod = kube.get_pod(NS, "study-attempt-1")
    assert pod is not None
    assert pod["metadata"]["finalizers"] == [TRAINER_FINALIZER]
    assert _env(kube, 1)["DPTRAIN_ATTEMPT"] == "1"
    assert "DPTrainingJob" in _env(kube, 1)["DPTRAIN_JOB_MANIFEST"]
    assert entry.checkpoint_claim_uid == kube.get_claim(NS, "study-checkpoint")["metadata"]["uid"]  # type: ignore[index]
    assert [event.reason for event in state.events] == ["Admitted", "PodCreated", "Started"]
    _reconcile(kube, ctx)  # level-triggered: nothing new while the pod is pending
    assert _pod_names(kube) == ["study-attempt-1"]


def test_a_dataset_job_reserves_and_commits_what_its_journal_charged(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    entry = _entry(kube)
    assert entry.state == "Reserved"
    assert entry.train is not None
    planned = entry.train.steps
    assert _env(kube, 1)["DPTRAIN_DATASET_IDENTITY"] == f"{NS}/builtin/breast-cancer"
    _end_pod(kube, 1, 0, _report(3))
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Succeeded"
    assert _status(kube)["privacy"]["steps"] == 3
    entry = _entry(kube)
    assert entry.train is not None
    assert entry.holdout is not None
    assert (entry.state, entry.train.steps, entry.holdout.steps, entry.outcome) == ("Committed", 3, 1, "Succeeded")
    assert planned > 3
    assert kube.get_pod(NS, "study-attempt-1")["metadata"]["finalizers"] == []  # type: ignore[index]
    dataset = kube.get_dataset(NS, "cohort")
    assert dataset is not None
    assert dataset["status"]["ledger"][0]["state"] == "Committed"  # the PrivateDataset shows a copy


@pytest.mark.parametrize(("bound", "reason"), [(0.4, "Audited"), (3.7, "AuditContradictsEpsilon")])
def test_the_trainers_privacy_audit_reaches_status_and_events(
    kube: FakeKube, ctx: OperatorContext, bound: float, reason: str
) -> None:
    kube.put(_job(audit={"canaries": 500}))
    _reconcile(kube, ctx)
    report = _report(3).model_copy(
        update={"audit_epsilon_lower_bound": bound, "audit_epsilon": 1.9, "audit_confidence": 0.95}
    )
    _end_pod(kube, 1, 0, report)
    state = _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Succeeded"  # an audit never changes how the job ended or what it was charged
    assert _status(kube)["audit"] == {
        "epsilonLowerBound": bound,
        "epsilon": 1.9,
        "confidence": 0.95,
        "contradicted": bound > 1.9,
    }
    [event] = [event for event in state.events if event.reason.startswith("Audit")]
    assert (event.reason, event.type) == (reason, "Warning" if bound > 1.9 else "Normal")


def test_a_refused_job_stays_refused_whatever_its_status_says(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx, epsilon=0.1)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Failed"
    assert _condition(kube, "Failed")["reason"] == "BudgetExceeded"
    assert "remaining" in _condition(kube, "Failed")["message"]
    assert _entry(kube).state == "Refused"
    assert _ledger(kube).epsilon_spent == 0.0
    job = kube.get_job(NS, "study")
    assert job is not None
    job["status"] = {"phase": "Pending", "privacy": {"noiseMultiplier": 3.0, "sampleRate": 0.1, "plannedSteps": 5}}
    kube.put(job)  # a user revives it by patching its status
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Failed"
    assert _pod_names(kube) == []


def test_a_finished_job_never_runs_again_whatever_its_status_says(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    _end_pod(kube, 1, 0, _report(3))
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    job["status"] = {"phase": "Pending", "attempts": 0}
    kube.put(job)
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Succeeded"
    assert _pod_names(kube) == ["study-attempt-1"]


def test_reservations_retry_through_conflicting_writers(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    kube.conflicts_to_inject = 5
    _reconcile(kube, ctx)
    assert _entry(kube).state == "Reserved"


def test_an_image_outside_the_allowlist_may_not_run_on_a_private_dataset(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort(image="evil.example/copy-the-data:latest"))
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "ImageNotAllowed"
    assert _ledger(kube).entries == []
    kube.put(_on_cohort(image="registry.example/dptrain@sha256:abc") | {"metadata": {"name": "ok", "namespace": NS}})
    _reconcile(kube, ctx, "ok")
    assert _status(kube, "ok")["phase"] == "Pending"


def test_an_unplannable_job_fails_with_what_to_fix(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job(privacy={"targetEpsilon": 2.0, "delta": 0.1}))
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "InvalidPlan"
    assert "lower privacy.delta" in _condition(kube, "Failed")["message"]
    kube.put(_job("huge", privacy={"targetEpsilon": 100}, training={"batchSize": 1, "epochs": 10000}))
    _reconcile(kube, ctx, "huge")
    assert "more than the maximum" in _condition(kube, "Failed", "huge")["message"]


def test_a_job_asking_for_another_holdout_than_its_datasets_is_refused(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort(training={"epochs": 1, "batchSize": 64, "evalFraction": 0.5}))
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "InvalidSpec"
    assert "fixed for every job" in _condition(kube, "Failed")["message"]


def test_a_missing_dataset_keeps_the_job_pending(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Pending"
    assert _condition(kube, "Admitted")["reason"] == "DatasetNotFound"
    _add_dataset(kube, ctx)
    _reconcile(kube, ctx)
    assert _condition(kube, "Admitted")["status"] == "True"


# --- attempts ---------------------------------------------------------------------------------------------------


def test_a_failed_pod_is_retried_until_the_backoff_limit(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort(runPolicy={"backoffLimit": 1}))
    _reconcile(kube, ctx)
    _end_pod(kube, 1, ExitCode.CRASHED, _report(5, code=1, releases=0))
    state = _reconcile(kube, ctx)
    assert "AttemptFailed" in [event.reason for event in state.events]
    assert _pod_names(kube) == ["study-attempt-1", "study-attempt-2"]
    assert _env(kube, 2)["DPTRAIN_ATTEMPT"] == "2"  # the first trainer ran: its journal must be found
    entry = _entry(kube)
    assert (entry.state, entry.pods, entry.started_pods, entry.failed_pods, entry.observed_steps) == (
        "Reserved", 2, 1, 1, 5
    )  # fmt: skip
    _end_pod(kube, 2, 137)  # killed, no termination message: what ran is unknown
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "BackoffLimitExceeded"
    entry = _entry(kube)
    assert entry.train is not None
    assert entry.state == "Committed"
    assert entry.train.steps == _status(kube)["privacy"]["plannedSteps"]  # unknown: charged in full


def test_a_pod_whose_trainer_never_ran_does_not_make_the_next_expect_a_journal(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    kube.put(_job())
    _reconcile(kube, ctx)
    _end_pod(kube, 1, 128, reason="ErrImagePull")
    _reconcile(kube, ctx)
    assert _env(kube, 2)["DPTRAIN_ATTEMPT"] == "1"


@pytest.mark.parametrize(
    ("code", "reason"),
    [(ExitCode.INVALID_CONFIGURATION, "InvalidConfiguration"), (ExitCode.INVALID_DATA, "InvalidData"),
     (ExitCode.INVALID_MODEL, "InvalidModel"), (ExitCode.CHECKPOINT_UNUSABLE, "CheckpointUnusable"),
     (ExitCode.PRIVACY_BUDGET, "PrivacyBudgetExhausted"), (ExitCode.JOURNAL_LOST, "JournalLost"),
     (ExitCode.DECLARED_SIZE_MISMATCH, "DeclaredSizeMismatch")],
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
    assert kube.get_claim(NS, "study-checkpoint") is None
    _end_pod(kube, 1, ExitCode.CRASHED)
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "PodFailed"
    assert "emptyDir" in _condition(kube, "Failed")["message"]


@pytest.mark.parametrize("said", [None, 4], ids=["killed-silently", "reported-first"])
def test_an_oom_killed_trainer_fails_the_job_with_what_to_raise(
    kube: FakeKube, ctx: OperatorContext, said: int | None
) -> None:
    """A retry with the same memory limit would be killed again: fail at once, say what to raise. The ledger
    commits what is known: the journal's charge when the trainer reported one, else the whole reservation."""
    _add_dataset(kube, ctx)
    kube.put(_on_cohort(resources={"memory": "300Mi"}))
    _reconcile(kube, ctx)
    planned = _status(kube)["privacy"]["plannedSteps"]
    report = _report(said, code=137, releases=0) if said is not None else None
    _end_pod(kube, 1, 137, report, reason="OOMKilled")
    state = _reconcile(kube, ctx)
    failed = _condition(kube, "Failed")
    assert (_status(kube)["phase"], failed["reason"]) == ("Failed", "OOMKilled")
    assert "spec.resources.memory=300Mi" in failed["message"]
    assert "raise spec.resources.memory" in failed["message"]
    assert "AttemptFailed" not in [event.reason for event in state.events]
    assert _pod_names(kube) == ["study-attempt-1"]  # no retry
    entry = _entry(kube)
    assert entry.train is not None
    assert (entry.state, entry.outcome) == ("Committed", "OOMKilled")
    assert entry.train.steps == (planned if said is None else said)
    assert kube.get_pod(NS, "study-attempt-1")["metadata"]["finalizers"] == []  # type: ignore[index]


def test_a_kill_that_is_not_an_oom_kill_is_retried(kube: FakeKube, ctx: OperatorContext) -> None:
    """Only the OOMKilled reason ends the job at once: a SIGKILL for another reason (137, Error) is retried."""
    kube.put(_job())
    _reconcile(kube, ctx)
    _end_pod(kube, 1, 137)
    _reconcile(kube, ctx)
    assert _pod_names(kube) == ["study-attempt-1", "study-attempt-2"]
    assert _status(kube)["phase"] != "Failed"


def test_a_replaced_checkpoint_claim_fails_the_job_and_keeps_it_charged(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    claim = kube.get_claim(NS, "study-checkpoint")
    assert claim is not None
    kube.delete_claim(NS, "study-checkpoint")
    del claim["metadata"]["uid"]
    kube.put(claim)  # same name and owner, new uid: an empty claim
    _reconcile(kube, ctx)  # the running pod is stopped first
    _end_pod(kube, 1, 143)
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "CheckpointLost"
    entry = _entry(kube)
    assert entry.train is not None
    assert (entry.state, entry.train.steps) == ("Committed", _status(kube)["privacy"]["plannedSteps"])


def test_a_claim_this_job_did_not_create_is_never_used(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    squatter = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "study-checkpoint",
                "namespace": NS}, "spec": {}}  # fmt: skip
    kube.put(squatter)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "ChildNameTaken"
    assert _pod_names(kube) == []
    entry = _entry(kube)
    assert entry.train is not None
    assert (entry.state, entry.train.steps) == ("Committed", 0)  # nothing ran, nothing charged


def test_suspend_stops_the_pod_and_resume_starts_the_next_attempt(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job())
    _reconcile(kube, ctx)
    kube.set_pod_status(NS, "study-attempt-1", {"phase": "Running", "containerStatuses": [
        {"name": "trainer", "state": {"running": {"startedAt": "2026-11-30T10:00:00Z"}}}]})  # fmt: skip
    job = kube.get_job(NS, "study")
    assert job is not None
    job["spec"]["runPolicy"] = {"suspend": True}
    kube.put(job)
    _reconcile(kube, ctx)
    pod = kube.get_pod(NS, "study-attempt-1")
    assert pod is not None
    assert pod["metadata"].get("deletionTimestamp")  # stopping; its finalizer keeps it until it is recorded
    _end_pod(kube, 1, 143, _report(5, code=143, releases=0))
    _reconcile(kube, ctx)
    assert _status(kube)["phase"] == "Suspended"
    assert _pod_names(kube) == []  # recorded, released
    ledger = ledger_name(f"{NS}/job-data/breast-cancer")
    assert (_entry(kube, ledger).failed_pods, _entry(kube, ledger).started_pods) == (0, 1)  # a stop, not a failure
    job = kube.get_job(NS, "study")
    assert job is not None
    job["spec"]["runPolicy"] = {"suspend": False}
    kube.put(job)
    _reconcile(kube, ctx)
    assert _condition(kube, "Suspended")["status"] == "False"
    assert _pod_names(kube) == ["study-attempt-2"]  # resumes from the checkpoint in a new pod
    assert _env(kube, 2)["DPTRAIN_ATTEMPT"] == "2"


def test_the_deadline_stops_the_job(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put(_job(runPolicy={"activeDeadlineSeconds": 60}))
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    job["status"]["startTime"] = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.put(job)
    _reconcile(kube, ctx)
    _end_pod(kube, 1, 143, _report(5, code=143, releases=0))
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "DeadlineExceeded"
    entry = _entry(kube, ledger_name(f"{NS}/job-data/breast-cancer"))
    assert entry.train is not None
    assert (entry.state, entry.train.steps) == ("Committed", 5)  # what its journal reported


def test_deleting_a_running_job_charges_what_its_journal_reports(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    with pytest.raises(kopf.TemporaryError, match="waiting"):
        delete_children(job, ctx, LOG)  # the pod must stop and say what it charged first
    _end_pod(kube, 1, 143, _report(7, code=143, releases=0))
    delete_children(job, ctx, LOG)
    entry = _entry(kube)
    assert entry.train is not None
    assert (entry.state, entry.train.steps, entry.outcome) == ("Committed", 7, "Deleted")
    assert _pod_names(kube) == []
    assert kube.get_claim(NS, "study-checkpoint") is None


def test_deleting_a_job_whose_pod_said_nothing_charges_it_in_full(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    job = kube.get_job(NS, "study")
    assert job is not None
    _end_pod(kube, 1, 137)
    delete_children(job, ctx, LOG)
    entry = _entry(kube)
    assert entry.train is not None
    assert entry.train.steps == job["status"]["privacy"]["plannedSteps"]


# --- datasets: budgets, identity, deletion --------------------------------------------------------------------


def _spend(kube: FakeKube, ctx: OperatorContext, name: str = "study", charged: int = 30) -> None:
    kube.put(_on_cohort() | {"metadata": {"name": name, "namespace": NS}})
    _reconcile(kube, ctx, name)
    terminated = {"exitCode": 0, "reason": "Completed", "message": _report(charged).to_text()}
    kube.set_pod_status(NS, f"{name}-attempt-1", {"phase": "Succeeded", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": terminated}}]})  # fmt: skip
    _reconcile(kube, ctx, name)


def test_budget_edits_are_evented_and_never_below_what_is_charged(kube: FakeKube, ctx: OperatorContext) -> None:
    body = _add_dataset(kube, ctx, epsilon=5.0)
    _spend(kube, ctx)
    spent = _ledger(kube).epsilon_spent
    assert spent is not None
    assert 0 < spent < 5
    lowered = dict(body, spec={**body["spec"], "budget": {"epsilon": spent / 2, "delta": 1e-5}})
    events = reconcile_dataset(kube.put(lowered), ctx)
    assert [event.reason for event in events] == ["BudgetBelowCharged"]
    assert _ledger(kube).budget.epsilon == 5.0  # type: ignore[union-attr]
    assert kube.get_dataset(NS, "cohort")["status"]["conditions"][0]["reason"] == "BudgetBelowCharged"  # type: ignore[index]
    raised = dict(body, spec={**body["spec"], "budget": {"epsilon": 8.0, "delta": 1e-5}})
    events = reconcile_dataset(kube.put(raised), ctx)
    assert [event.reason for event in events] == ["BudgetRaised"]
    delta = dict(body, spec={**body["spec"], "budget": {"epsilon": 8.0, "delta": 1e-6}})
    assert [event.reason for event in reconcile_dataset(kube.put(delta), ctx)] == ["BudgetDeltaChanged"]
    status = _ledger(kube)
    assert [change.reason for change in status.budget_history] == ["Initial", "Raised", "DeltaChanged"]
    assert len(status.entries) == 1  # a δ change keeps every charge
    assert status.epsilon_spent is not None
    assert status.epsilon_spent > spent  # the same mechanism costs more ε at a smaller δ
    spent_at_lower_delta = status.epsilon_spent
    # Raising δ over what is charged would show it as cheaper (at 1e-3 the same steps compose to less): refused.
    raised_delta = dict(body, spec={**body["spec"], "budget": {"epsilon": 8.0, "delta": 1e-3}})
    events = reconcile_dataset(kube.put(raised_delta), ctx)
    assert [event.reason for event in events] == ["BudgetBelowCharged"]
    assert "δ may only be lowered" in events[0].message
    status = _ledger(kube)
    assert status.budget is not None
    assert status.budget.delta == 1e-6
    assert status.epsilon_spent == spent_at_lower_delta


def test_a_budget_delta_of_one_over_the_size_is_refused(kube: FakeKube, ctx: OperatorContext) -> None:
    events = reconcile_dataset(kube.put(_dataset(delta=1.0 / 569)), ctx)  # breast-cancer: 569 records
    assert events == []
    condition = kube.get_dataset(NS, "cohort")["status"]["conditions"][0]  # type: ignore[index]
    assert (condition["reason"], condition["status"]) == ("InvalidSpec", "False")
    assert "1/numExamples" in condition["message"]


def test_a_dataset_deleted_and_created_again_continues_its_ledger(kube: FakeKube, ctx: OperatorContext) -> None:
    body = _add_dataset(kube, ctx, epsilon=5.0)
    _spend(kube, ctx)
    spent = _ledger(kube).epsilon_spent
    release_dataset(kube.get_dataset(NS, "cohort") or body, ctx)
    kube.objects.pop(("PrivateDataset", NS, "cohort"))
    assert _ledger(kube).dataset is None
    _add_dataset(kube, ctx, epsilon=5.0)  # same records, new object
    assert _ledger(kube).epsilon_spent == spent
    dataset = kube.get_dataset(NS, "cohort")
    assert dataset is not None
    assert dataset["status"]["epsilonSpent"] == spent


def test_a_dataset_with_running_jobs_waits_before_it_goes(kube: FakeKube, ctx: OperatorContext) -> None:
    body = _add_dataset(kube, ctx)
    kube.put(_on_cohort())
    _reconcile(kube, ctx)
    with pytest.raises(kopf.TemporaryError, match="study"):
        release_dataset(body, ctx)


def test_a_second_dataset_over_the_same_records_gets_no_fresh_budget(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    _spend(kube, ctx)
    twin = kube.put(_dataset("twin", epsilon=100.0))
    reconcile_dataset(twin, ctx)
    ready = kube.get_dataset(NS, "twin")["status"]["conditions"][0]  # type: ignore[index]
    assert (ready["status"], ready["reason"]) == ("False", "SourceAlreadyRegistered")
    kube.put(_job("on-twin", dataset={"datasetRef": {"name": "twin"}}))
    _reconcile(kube, ctx, "on-twin")
    assert _condition(kube, "Failed", "on-twin")["reason"] == "InvalidDataset"
    assert _ledger(kube).budget.epsilon == 10.0  # type: ignore[union-attr]


def test_an_edited_dataset_status_is_restored_from_the_ledger(kube: FakeKube, ctx: OperatorContext) -> None:
    body = _add_dataset(kube, ctx)
    _spend(kube, ctx)
    dataset = kube.get_dataset(NS, "cohort")
    assert dataset is not None
    dataset["status"] = {"ledger": [], "epsilonSpent": 0.0}
    kube.put(dataset)
    reconcile_dataset(kube.get_dataset(NS, "cohort") or body, ctx)
    restored = kube.get_dataset(NS, "cohort")
    assert restored is not None
    assert restored["status"]["epsilonSpent"] == _ledger(kube).epsilon_spent > 0
    assert len(restored["status"]["ledger"]) == 1


# --- multi-worker gangs -----------------------------------------------------------------------------------------


def _gang_env(kube: FakeKube, name: str) -> dict[str, str]:
    pod = kube.get_pod(NS, name)
    assert pod is not None
    return {e["name"]: e.get("value", "<from the pod>") for e in pod["spec"]["containers"][0]["env"]}


def test_a_gang_is_created_whole_and_its_workers_dial_the_leaders_dns_name(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort(distributed={"workers": 3}))
    _reconcile(kube, ctx)
    # all at once (Kueue admits a pod group whole; a follower waiting for the leader's IP would deadlock it)
    assert _pod_names(kube) == ["study-attempt-1", "study-attempt-1-worker-1", "study-attempt-1-worker-2"]
    assert kube.get_child("Service", NS, "study-workers") is not None
    assert kube.get_child("NetworkPolicy", NS, "study-gang") is None  # only with the chart's trainer policy
    leader = _gang_env(kube, "study-attempt-1")
    assert (leader["PET_NNODES"], leader["PET_NODE_RANK"], leader["PET_MASTER_ADDR"]) == ("3", "0", "<from the pod>")
    worker = _gang_env(kube, "study-attempt-1-worker-2")
    address = f"worker-0.study-workers.{NS}.svc"
    assert (worker["PET_NODE_RANK"], worker["PET_MASTER_ADDR"], worker["PET_MASTER_PORT"]) == ("2", address, "29500")
    kube.set_pod_status(NS, "study-attempt-1", {"phase": "Running", "podIP": "10.0.0.7"})
    _reconcile(kube, ctx)
    assert len(_pod_names(kube)) == 3
    follower = kube.get_pod(NS, "study-attempt-1-worker-1")
    assert follower is not None
    assert TRAINER_FINALIZER not in (follower["metadata"].get("finalizers") or [])  # its end charges nothing
    volumes = {v["name"]: v for v in follower["spec"]["volumes"]}
    assert "emptyDir" in volumes["checkpoint"]  # only the leader mounts the journal's claim
    distributed = _status(kube)["distributed"]
    assert (distributed["worldSize"], distributed["ready"]) == (3, "1/3")


def test_a_failed_worker_stops_the_gang_and_the_retry_starts_a_new_one(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    kube.put(_on_cohort(distributed={"workers": 2}))
    _reconcile(kube, ctx)
    kube.set_pod_status(NS, "study-attempt-1", {"phase": "Running", "podIP": "10.0.0.7"})
    _reconcile(kube, ctx)
    kube.set_pod_status(NS, "study-attempt-1-worker-1", {"phase": "Failed"})
    _reconcile(kube, ctx)
    leader = kube.get_pod(NS, "study-attempt-1")
    assert leader is not None
    assert leader["metadata"].get("deletionTimestamp")
    _end_pod(kube, 1, ExitCode.TERMINATED, _report(10, code=ExitCode.TERMINATED, releases=0))
    _reconcile(kube, ctx)
    assert "study-attempt-2" in _pod_names(kube)
    assert _env(kube, 2)["DPTRAIN_ATTEMPT"] == "2"  # the new leader must find the journal
    entry = _entry(kube)
    assert (entry.pods, entry.started_pods, entry.failed_pods, entry.observed_steps) == (2, 1, 1, 10)
    assert entry.settled_pods == ["study-attempt-1"]  # workers are not settled: the leader's report is the charge


def test_a_squatted_gang_service_fails_the_job(kube: FakeKube, ctx: OperatorContext) -> None:
    kube.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "study-workers", "namespace": NS}})
    kube.put(_job(distributed={"workers": 2}))
    _reconcile(kube, ctx)
    assert _condition(kube, "Failed")["reason"] == "ChildNameTaken"
    assert _pod_names(kube) == []
