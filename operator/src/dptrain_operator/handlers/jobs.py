"""Reconciliation of a DPTrainingJob: level-triggered and idempotent. Every call reads the world
(the job, its dataset, its pods) and moves it one step towards the spec; create/update events and
a timer all call the same function, so a restarted operator converges without duplicate pods."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dptrain_accounting import AccountingError, MechanismSegment, compute_epsilon, plan_mechanism
from dptrain_api import (
    BUILTIN_DATASET_SIZES,
    DPTrainingJob,
    JobPhase,
    PrivateDataset,
    PrivateDatasetStatus,
    describe_validation_error,
)
from dptrain_operator import ledger
from dptrain_operator.conditions import now_iso, set_condition
from dptrain_operator.context import OperatorContext
from dptrain_operator.kube import ConflictError
from dptrain_operator.render import (
    ATTEMPT_LABEL,
    JOB_UID_LABEL,
    checkpoint_claim,
    checkpoint_claim_name,
    config_map_name,
    job_config_map,
    trainer_pod,
)
from dptrain_operator.scrape import exit_code, scrape, termination_message

FINISHED = (JobPhase.SUCCEEDED.value, JobPhase.FAILED.value)
# Trainer exit codes that retrying cannot fix (bad manifest, bad data, bad model): fail at once.
PERMANENT_EXIT_CODES = {
    2: "InvalidConfiguration",
    3: "InvalidData",
    4: "InvalidModel",
    5: "CheckpointUnusable",  # a damaged journal or another job's checkpoint: retrying cannot help
    6: "PrivacyBudgetExhausted",
}
_LEDGER_RETRIES = 50


@dataclass
class JobState:
    """The job's status as it will be written back (one merge patch per reconciliation)."""

    body: dict[str, Any]
    status: dict[str, Any]
    events: list[tuple[str, str, str]]

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.body["metadata"]["uid"])

    @property
    def generation(self) -> int | None:
        generation = self.body["metadata"].get("generation")
        return int(generation) if generation is not None else None

    @property
    def phase(self) -> str | None:
        phase = self.status.get("phase")
        return str(phase) if phase else None

    def condition(self, type: str, status: bool, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions"),
            type=type,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
        )

    def transition(self, phase: JobPhase, reason: str, message: str) -> None:
        if self.phase != phase.value:
            self.events.append(("Warning" if phase == JobPhase.FAILED else "Normal", reason, message))
        self.status["phase"] = phase.value

    def fail(self, reason: str, message: str) -> None:
        self.transition(JobPhase.FAILED, reason, message)
        self.condition("Failed", True, reason, message)
        self.condition("Running", False, reason, message)
        self.status.setdefault("completionTime", now_iso())


Logger = logging.Logger | logging.LoggerAdapter[Any]


def reconcile_job(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> JobState:
    """One reconciliation step; returns the state whose status the caller writes and whose events it posts."""
    state = JobState(body=body, status=_copy_status(body), events=[])
    if state.phase in FINISHED:
        _finish_cleanup(state, ctx)
        return state
    try:
        job = DPTrainingJob.model_validate(body)
    except ValidationError as error:
        state.fail("InvalidSpec", "; ".join(describe_validation_error(error, prefix="")))
        return state
    dataset = _load_dataset(job, state, ctx)
    if dataset is None and job.spec.dataset.dataset_ref is not None:
        return state
    mechanism = _admit(job, dataset, state, ctx, logger)
    if mechanism is None:
        return state
    if job.spec.run_policy.suspend:
        _suspend(job, state, ctx)
        return state
    if _deadline_exceeded(job, state):
        _stop_pods(state, ctx)
        _commit(state, ctx, steps_ran=None)
        return state
    _run(job, dataset, mechanism, state, ctx, logger)
    return state


def _copy_status(body: dict[str, Any]) -> dict[str, Any]:
    status = body.get("status") or {}
    return {key: (dict(value) if isinstance(value, dict) else value) for key, value in status.items()}


# --- dataset and admission -------------------------------------------------------------------


def _load_dataset(job: DPTrainingJob, state: JobState, ctx: OperatorContext) -> PrivateDataset | None:
    reference = job.spec.dataset.dataset_ref
    if reference is None:
        return None
    raw = ctx.kube.get_dataset(state.namespace, reference.name)
    if raw is None:
        message = f"PrivateDataset {reference.name!r} not found in namespace {state.namespace}; create it"
        state.transition(JobPhase.PENDING, "DatasetNotFound", message)
        state.condition("Admitted", False, "DatasetNotFound", message)
        return None
    try:
        return PrivateDataset.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(describe_validation_error(error))
        state.fail("InvalidDataset", f"PrivateDataset {reference.name!r} is invalid: {problems}")
        return None


def _num_examples(job: DPTrainingJob, dataset: PrivateDataset | None) -> int:
    if dataset is None:
        assert job.spec.dataset.builtin is not None
        return BUILTIN_DATASET_SIZES[job.spec.dataset.builtin]
    if dataset.spec.num_examples is not None:
        return dataset.spec.num_examples
    assert dataset.spec.source.builtin is not None
    return BUILTIN_DATASET_SIZES[dataset.spec.source.builtin]


def _admit(
    job: DPTrainingJob,
    dataset: PrivateDataset | None,
    state: JobState,
    ctx: OperatorContext,
    logger: Logger,
) -> MechanismSegment | None:
    """The job's mechanism, reserved in the dataset's ledger (or None after marking the job Failed)."""
    privacy = state.status.get("privacy") or {}
    if privacy.get("noiseMultiplier") and privacy.get("plannedSteps") and privacy.get("sampleRate"):
        # Planned before (the plan is immutable): never recalibrate, the reservation holds this one.
        return MechanismSegment(
            float(privacy["noiseMultiplier"]), float(privacy["sampleRate"]), int(privacy["plannedSteps"])
        )
    spec = job.spec
    try:
        plan = plan_mechanism(
            num_examples=_num_examples(job, dataset),
            eval_fraction=spec.training.eval_fraction,
            batch_size=spec.training.batch_size,
            epochs=spec.training.epochs,
            target_epsilon=spec.privacy.target_epsilon,
            delta=spec.privacy.delta,
            accountant=spec.privacy.accountant.value,
            noise_multiplier=spec.privacy.noise_multiplier,
        )
    except (AccountingError, ValueError) as error:
        state.fail("InvalidPlan", str(error))
        return None
    mechanism = plan.segment
    if dataset is not None:
        refusal = _reserve(job, dataset, mechanism, state, ctx)
        if refusal is not None:
            state.fail("BudgetExceeded", refusal)
            _post_privacy(state, mechanism=mechanism, job=job)
            return None
    _post_privacy(state, mechanism=mechanism, job=job)
    message = f"planned σ={mechanism.noise_multiplier:.4g}, q={mechanism.sample_rate:.4g}, {mechanism.steps} steps"
    if dataset is not None:
        message += f"; reserved in PrivateDataset {dataset.metadata.name}"
    state.condition("Admitted", True, "Admitted", message)
    state.events.append(("Normal", "Admitted", message))
    logger.info(message)
    return mechanism


def _post_privacy(state: JobState, *, mechanism: MechanismSegment, job: DPTrainingJob) -> None:
    state.status["privacy"] = {
        "epsilonSpent": 0.0,
        "targetEpsilon": job.spec.privacy.target_epsilon,
        "delta": job.spec.privacy.delta,
        "noiseMultiplier": mechanism.noise_multiplier,
        "sampleRate": mechanism.sample_rate,
        "steps": 0,
        "plannedSteps": mechanism.steps,
        "accountant": job.spec.privacy.accountant.value,
    }
    state.status.setdefault("progress", {"step": 0, "totalSteps": mechanism.steps, "percent": "0%"})


def _reserve(
    job: DPTrainingJob, dataset: PrivateDataset, mechanism: MechanismSegment, state: JobState, ctx: OperatorContext
) -> str | None:
    """Reserve under a resourceVersion precondition, retrying on conflict: racing jobs never overshoot."""
    name = dataset.metadata.name or ""
    for _ in range(_LEDGER_RETRIES):
        raw = ctx.kube.get_dataset(state.namespace, name)
        if raw is None:
            return f"PrivateDataset {name!r} disappeared"
        current = PrivateDataset.model_validate(raw)
        if ledger.find_entry(current.status, state.uid) is not None:
            return None  # already reserved (an earlier reconciliation)
        entries = current.status.ledger if current.status else []
        admission = ledger.admit(entries, current.spec.budget, mechanism)
        if not admission.admitted:
            return (
                f"job needs ε={_job_epsilon(mechanism, current):.4g} of PrivateDataset {name!r} "
                f"(composed total would be {admission.epsilon_after:.4g} > budget {current.spec.budget.epsilon:g}); "
                f"remaining ε={max(admission.remaining_before, 0.0):.4g}. Lower epochs or raise the noise, "
                "or ask the data custodian for more budget"
            )
        status = ledger.reserve(
            current.status, current.spec.budget, job_name=state.name, job_uid=state.uid, mechanism=mechanism
        )
        try:
            _write_dataset_status(raw, status, ctx)
        except ConflictError:
            time.sleep(0.01)
            continue
        return None
    raise RuntimeError(f"could not reserve budget in PrivateDataset {name!r}: too many conflicting writers")


def _job_epsilon(mechanism: MechanismSegment, dataset: PrivateDataset) -> float:
    return compute_epsilon([mechanism], delta=dataset.spec.budget.delta, accountant=ledger.LEDGER_ACCOUNTANT)


def _write_dataset_status(raw: dict[str, Any], status: PrivateDatasetStatus, ctx: OperatorContext) -> None:
    body = dict(raw)
    body["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    written = ctx.kube.replace_dataset_status(body)
    metadata = written["metadata"]
    ctx.metrics.observe_dataset(
        metadata["namespace"],
        metadata["name"],
        budget=float(written["spec"]["budget"]["epsilon"]),
        spent=status.epsilon_spent or 0.0,
        remaining=status.epsilon_remaining or 0.0,
    )


def _commit(state: JobState, ctx: OperatorContext, *, steps_ran: int | None) -> None:
    """Make the ledger entry final with what the journal proves ran (None: unknown, all stays charged)."""
    reference = (state.body.get("spec") or {}).get("dataset", {}).get("datasetRef")
    if not reference:
        return
    name = reference["name"]
    for _ in range(_LEDGER_RETRIES):
        raw = ctx.kube.get_dataset(state.namespace, name)
        if raw is None:
            return
        current = PrivateDataset.model_validate(raw)
        entry = ledger.find_entry(current.status, state.uid)
        if current.status is None or entry is None or entry.state == "Committed":
            return
        status = ledger.commit(current.status, current.spec.budget, job_uid=state.uid, steps_ran=steps_ran)
        try:
            _write_dataset_status(raw, status, ctx)
        except ConflictError:
            time.sleep(0.01)
            continue
        return
    raise RuntimeError(f"could not commit to PrivateDataset {name!r}: too many conflicting writers")


# --- running ---------------------------------------------------------------------------------


def _job_pods(state: JobState, ctx: OperatorContext) -> list[dict[str, Any]]:
    pods = ctx.kube.list_pods(state.namespace, f"{JOB_UID_LABEL}={state.uid}")
    return sorted(pods, key=lambda pod: int(pod["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "0")))


def _stop_pods(state: JobState, ctx: OperatorContext) -> None:
    for pod in _job_pods(state, ctx):
        if not _finished(pod):
            ctx.kube.delete_pod(state.namespace, pod["metadata"]["name"])


def _suspend(job: DPTrainingJob, state: JobState, ctx: OperatorContext) -> None:
    for pod in _job_pods(state, ctx):
        ctx.kube.delete_pod(state.namespace, pod["metadata"]["name"])
    message = "suspended: trainer pod deleted, checkpoint kept; set spec.runPolicy.suspend=false to resume"
    state.transition(JobPhase.SUSPENDED, "Suspended", message)
    state.condition("Suspended", True, "Suspended", message)
    state.condition("Running", False, "Suspended", message)


def _deadline_exceeded(job: DPTrainingJob, state: JobState) -> bool:
    deadline = job.spec.run_policy.active_deadline_seconds
    started = state.status.get("startTime")
    if deadline is None or not started:
        return False
    elapsed = (datetime.now(UTC) - datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds()
    if elapsed <= deadline:
        return False
    state.fail("DeadlineExceeded", f"job ran {elapsed:.0f}s, longer than activeDeadlineSeconds={deadline}")
    return True


def _run(  # noqa: PLR0917
    job: DPTrainingJob,
    dataset: PrivateDataset | None,
    mechanism: MechanismSegment,
    state: JobState,
    ctx: OperatorContext,
    logger: Logger,
) -> None:
    if state.status.get("phase") == JobPhase.SUSPENDED.value:
        state.condition("Suspended", False, "Resumed", "resumed from the last checkpoint")
    ctx.kube.create_if_absent(job_config_map(job, dataset))
    if job.spec.checkpoint.volume == "persistentVolumeClaim" and not _checkpoint_claim_intact(job, state, ctx):
        return
    pods = _job_pods(state, ctx)
    if any(pod["metadata"].get("deletionTimestamp") and not _finished(pod) for pod in pods):
        return  # an old trainer is still stopping (it holds the checkpoint): start none beside it
    live = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]
    current = live[-1] if live else None
    # Pods are the truth: a status write lost in an operator crash is recovered from their labels.
    attempts = max(int(state.status.get("attempts") or 0), _last_attempt(pods))
    state.status["attempts"] = attempts
    if current is None or _pod_attempt(current) < attempts:
        _start_attempt(job, dataset, mechanism, state, ctx, attempt=attempts + 1)
        return
    phase = current.get("status", {}).get("phase", "Pending")
    if phase in ("Pending", "Running", "Unknown"):
        _observe_running(current, state, ctx)
        return
    summary = termination_message(current)
    if summary is not None:
        _apply_summary(summary, state)
    if phase == "Succeeded":
        _commit(state, ctx, steps_ran=_charged_steps(summary))
        message = f"trained {state.status.get('privacy', {}).get('steps')} steps"
        epsilon = state.status.get("privacy", {}).get("epsilonSpent")
        if epsilon is not None:
            message += f", ε={epsilon:.4g} ≤ {job.spec.privacy.target_epsilon:g}"
        state.transition(JobPhase.SUCCEEDED, "Succeeded", message)
        state.condition("Succeeded", True, "Succeeded", message)
        state.condition("Running", False, "Succeeded", message)
        state.status["completionTime"] = now_iso()
        state.status.setdefault("progress", {})["percent"] = "100%"
        return
    code = exit_code(current)
    error = (summary or {}).get("error") or f"trainer exited with code {code}"
    if code in PERMANENT_EXIT_CODES:
        _commit(state, ctx, steps_ran=_charged_steps(summary))
        state.fail(PERMANENT_EXIT_CODES[code], str(error))
        return
    if job.spec.checkpoint.volume == "emptyDir":
        # Without a persistent journal a retry could not know what the failed attempt spent.
        _commit(state, ctx, steps_ran=_charged_steps(summary))
        state.fail("PodFailed", f"{error} (checkpoint.volume emptyDir cannot resume; use persistentVolumeClaim)")
        return
    failures = sum(1 for pod in pods if pod.get("status", {}).get("phase") == "Failed")
    if failures > job.spec.run_policy.backoff_limit:
        _commit(state, ctx, steps_ran=_charged_steps(summary))
        state.fail(
            "BackoffLimitExceeded",
            f"{failures} trainer pods failed (backoffLimit {job.spec.run_policy.backoff_limit}); last: {error}",
        )
        return
    logger.warning(f"attempt {attempts} failed ({error}); retrying from the last checkpoint")
    state.events.append(("Warning", "AttemptFailed", f"attempt {attempts} failed: {error}; retrying"))
    _start_attempt(job, dataset, mechanism, state, ctx, attempt=attempts + 1)


def _checkpoint_claim_intact(job: DPTrainingJob, state: JobState, ctx: OperatorContext) -> bool:
    """Create the claim on first use and remember its UID. Should it later be replaced (deleted and
    re-created empty), the journal of earlier attempts is gone: a retry would start a fresh journal
    and the ledger could no longer learn what those attempts spent, so the job fails instead."""
    ctx.kube.create_if_absent(checkpoint_claim(job))
    uid = ctx.kube.claim_uid(state.namespace, checkpoint_claim_name(state.name))
    known = state.status.get("checkpointClaimUid")
    if uid is not None and known is None:
        state.status["checkpointClaimUid"] = uid
    if known is None or uid == known:
        return True
    _stop_pods(state, ctx)
    _commit(state, ctx, steps_ran=None)
    state.fail(
        "CheckpointLost",
        f"checkpoint claim {checkpoint_claim_name(state.name)} was replaced while the job ran: the privacy journal "
        "of earlier attempts is gone, so their spend stays charged in full; create a new job to train again",
    )
    return False


def _finished(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _pod_attempt(pod: dict[str, Any]) -> int:
    return int(pod["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "0"))


def _last_attempt(pods: list[dict[str, Any]]) -> int:
    return max((_pod_attempt(pod) for pod in pods), default=0)


def _start_attempt(
    job: DPTrainingJob,
    dataset: PrivateDataset | None,
    mechanism: MechanismSegment,
    state: JobState,
    ctx: OperatorContext,
    *,
    attempt: int,
) -> None:
    pod = trainer_pod(job, attempt=attempt, mechanism=mechanism, dataset=dataset, settings=ctx.settings)
    if ctx.kube.create_if_absent(pod):
        state.events.append(("Normal", "PodCreated", f"created trainer pod {pod['metadata']['name']}"))
    state.status["attempts"] = attempt
    state.status.setdefault("startTime", now_iso())
    state.transition(JobPhase.PENDING, "Started", f"attempt {attempt} started")
    state.condition("Running", True, "PodCreated", f"trainer pod {pod['metadata']['name']} (attempt {attempt})")
    state.condition("Suspended", False, "Running", "not suspended")


def _observe_running(pod: dict[str, Any], state: JobState, ctx: OperatorContext) -> None:
    if pod.get("status", {}).get("phase") != "Running":
        return
    state.transition(JobPhase.RUNNING, "Running", f"trainer pod {pod['metadata']['name']} is running")
    pod_ip = pod.get("status", {}).get("podIP")
    if not pod_ip:
        return
    sample = scrape(pod_ip, ctx.settings.trainer_metrics_port)
    if sample is None:
        return
    privacy = state.status.setdefault("privacy", {})
    progress = state.status.setdefault("progress", {})
    if sample.epsilon_spent is not None:
        # Never lower what status shows: a fresh attempt reports from its journal, which only grows.
        privacy["epsilonSpent"] = max(float(privacy.get("epsilonSpent") or 0.0), ledger.round_up(sample.epsilon_spent))
    if sample.steps is not None:
        progress["step"] = sample.steps
    total = sample.planned_steps or progress.get("totalSteps")
    if total:
        progress["totalSteps"] = total
        progress["percent"] = f"{min(100, int(100 * (progress.get('step') or 0) / total))}%"
    for key, value in (("loss", sample.loss), ("evalMetric", sample.eval_metric), ("evalValue", sample.eval_value)):
        if value is not None:
            progress[key] = value
    progress["lastUpdateTime"] = now_iso()


def _charged_steps(summary: dict[str, Any] | None) -> int | None:
    """Steps the privacy journal charged (all attempts), from the trainer's termination message."""
    if not summary:
        return None
    if isinstance(summary.get("chargedSteps"), int):
        return int(summary["chargedSteps"])
    journal = summary.get("journal")
    if isinstance(journal, dict) and isinstance(journal.get("chargedSteps"), int):
        return int(journal["chargedSteps"])
    segments = journal.get("segments") if isinstance(journal, dict) else journal
    if isinstance(segments, list):
        try:
            return sum(int(segment["steps"]) for segment in segments)
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _apply_summary(summary: dict[str, Any], state: JobState) -> None:
    privacy = state.status.setdefault("privacy", {})
    progress = state.status.setdefault("progress", {})
    if isinstance(summary.get("epsilon"), (int, float)):
        privacy["epsilonSpent"] = max(float(privacy.get("epsilonSpent") or 0.0), ledger.round_up(summary["epsilon"]))
    charged = _charged_steps(summary)
    if charged is not None:
        privacy["steps"] = charged
    if isinstance(summary.get("stepsRun"), int):
        progress["step"] = summary["stepsRun"]
    metrics = summary.get("evalMetrics") or {}
    name = summary.get("evalMetric")
    if isinstance(metrics, dict) and isinstance(metrics.get(name), (int, float)):
        progress["evalMetric"], progress["evalValue"] = name, float(metrics[name])
    progress["lastUpdateTime"] = now_iso()


# --- finished jobs and deletion ----------------------------------------------------------------


def _finish_cleanup(state: JobState, ctx: OperatorContext) -> None:
    """TTL after completion; nothing else changes on a finished job."""
    ttl = (state.body.get("spec") or {}).get("runPolicy", {}).get("ttlSecondsAfterFinished")
    finished = state.status.get("completionTime")
    if ttl is None or not finished:
        return
    age = (datetime.now(UTC) - datetime.fromisoformat(finished.replace("Z", "+00:00"))).total_seconds()
    if age >= ttl:
        ctx.kube.delete_job(state.namespace, state.name)


def delete_children(body: dict[str, Any], ctx: OperatorContext) -> None:
    """On deletion: remove pods, ConfigMap and claim (don't rely on garbage collection alone) and make
    the ledger entry final. A job that started pods and did not report stays charged in full."""
    state = JobState(body=body, status=_copy_status(body), events=[])
    for pod in _job_pods(state, ctx):
        ctx.kube.delete_pod(state.namespace, pod["metadata"]["name"])
    ctx.kube.delete_config_map(state.namespace, config_map_name(state.name))
    ctx.kube.delete_claim(state.namespace, checkpoint_claim_name(state.name))
    steps_ran = 0 if not state.status.get("attempts") else None
    _commit(state, ctx, steps_ran=steps_ran)
    ctx.metrics.observe_job(state.uid, None)
