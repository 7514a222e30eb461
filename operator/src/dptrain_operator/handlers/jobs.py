"""Reconciliation of a DPTrainingJob: level-triggered and idempotent. Every call reads the world
(the job, its dataset, its pods) and moves it one step towards the spec; create/update events and
a timer all call the same function, so a restarted operator converges without duplicate pods."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dptrain_accounting import AccountingError, MechanismSegment
from dptrain_api import (
    PERMANENT_FAILURES,
    ConditionType,
    DPTrainingJob,
    ExitCode,
    JobPhase,
    PrivacyStatus,
    PrivateDataset,
    ProgressStatus,
    Reason,
    TerminationMessage,
    describe_validation_error,
)
from dptrain_operator import admission, ledger
from dptrain_operator.conditions import get_condition, now
from dptrain_operator.context import OperatorContext
from dptrain_operator.jobstate import FINISHED, JobState
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

Logger = logging.Logger | logging.LoggerAdapter[Any]
Pod = dict[str, Any]


def reconcile_and_write(ctx: OperatorContext, namespace: str, name: str, uid: str, logger: Logger) -> JobState | None:
    """Read the job fresh, reconcile it, write its status (when changed) and count a new failure.

    Returns the state (its events still to be posted), or None when the job is gone or was re-created.
    """
    fresh = ctx.kube.get_job(namespace, name)
    if fresh is None or fresh["metadata"]["uid"] != uid:
        return None
    state = reconcile_job(fresh, ctx, logger)
    if state.changed():
        ctx.kube.patch_job_status(namespace, name, state.wire())
    if state.phase == JobPhase.FAILED and (fresh.get("status") or {}).get("phase") != JobPhase.FAILED:
        failed = get_condition(state.status.conditions, ConditionType.FAILED)
        ctx.metrics.job_failures.labels(reason=failed.reason if failed else "Unknown").inc()
    return state


def reconcile_job(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> JobState:
    """One reconciliation step; returns the state whose status the caller writes and whose events it posts."""
    state = JobState.read(body)
    if state.phase in FINISHED:
        _finish_cleanup(state, ctx)
        return state
    try:
        job = DPTrainingJob.model_validate(body)
    except ValidationError as error:
        state.fail(Reason.INVALID_SPEC, "; ".join(describe_validation_error(error, prefix="")))
        return state
    dataset = _load_dataset(job, state, ctx)
    if dataset is None and job.spec.dataset.dataset_ref is not None:
        return state
    mechanism = _admit(job, dataset, state, ctx, logger)
    if mechanism is None:
        return state
    if job.spec.run_policy.suspend:
        _suspend(state, ctx)
    elif _deadline_exceeded(job, state):
        _stop_pods(state, ctx)
        _commit(state, ctx, steps_ran=None)
    else:
        _run(job, dataset, mechanism, state, ctx, logger)
    return state


# --- dataset and admission -------------------------------------------------------------------


def _load_dataset(job: DPTrainingJob, state: JobState, ctx: OperatorContext) -> PrivateDataset | None:
    reference = job.spec.dataset.dataset_ref
    if reference is None:
        return None
    raw = ctx.kube.get_dataset(state.namespace, reference.name)
    if raw is None:
        message = f"PrivateDataset {reference.name!r} not found in namespace {state.namespace}; create it"
        state.transition(JobPhase.PENDING, Reason.DATASET_NOT_FOUND, message)
        state.condition(ConditionType.ADMITTED, False, Reason.DATASET_NOT_FOUND, message)
        return None
    try:
        return PrivateDataset.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(describe_validation_error(error))
        state.fail(Reason.INVALID_DATASET, f"PrivateDataset {reference.name!r} is invalid: {problems}")
        return None


def _admit(
    job: DPTrainingJob, dataset: PrivateDataset | None, state: JobState, ctx: OperatorContext, logger: Logger
) -> MechanismSegment | None:
    """The job's mechanism, reserved in the dataset's ledger (or None after marking the job Failed)."""
    privacy = state.status.privacy
    if privacy and privacy.noise_multiplier and privacy.planned_steps and privacy.sample_rate:
        # Planned before (the plan is immutable): never recalibrate, the reservation holds this one.
        return MechanismSegment(privacy.noise_multiplier, privacy.sample_rate, privacy.planned_steps)
    try:
        mechanism = admission.plan_job(job, dataset).segment
    except (AccountingError, ValueError) as error:
        state.fail(Reason.INVALID_PLAN, str(error))
        return None
    if dataset is not None:
        refusal = admission.reserve(
            ctx,
            namespace=state.namespace,
            dataset=dataset.metadata.name or "",
            job_name=state.name,
            job_uid=state.uid,
            mechanism=mechanism,
        )
        _post_privacy(state, mechanism=mechanism, job=job)
        if refusal is not None:
            state.fail(Reason.BUDGET_EXCEEDED, refusal)
            return None
    _post_privacy(state, mechanism=mechanism, job=job)
    message = f"planned σ={mechanism.noise_multiplier:.4g}, q={mechanism.sample_rate:.4g}, {mechanism.steps} steps"
    if dataset is not None:
        message += f"; reserved in PrivateDataset {dataset.metadata.name}"
    state.condition(ConditionType.ADMITTED, True, Reason.ADMITTED, message)
    state.event(Reason.ADMITTED, message)
    logger.info(message)
    return mechanism


def _post_privacy(state: JobState, *, mechanism: MechanismSegment, job: DPTrainingJob) -> None:
    state.status.privacy = PrivacyStatus(
        epsilon_spent=0.0,
        target_epsilon=job.spec.privacy.target_epsilon,
        delta=job.spec.privacy.delta,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=0,
        planned_steps=mechanism.steps,
        accountant=job.spec.privacy.accountant,
    )
    if state.status.progress is None:
        state.status.progress = ProgressStatus(step=0, total_steps=mechanism.steps, percent="0%")


def _dataset_name(state: JobState) -> str | None:
    reference = (state.body.get("spec") or {}).get("dataset", {}).get("datasetRef")
    return str(reference["name"]) if reference else None


def _commit(state: JobState, ctx: OperatorContext, *, steps_ran: int | None) -> None:
    """Make the ledger entry final with what the journal proves ran (None: unknown, all stays charged)."""
    dataset = _dataset_name(state)
    if dataset is not None:
        admission.commit(ctx, namespace=state.namespace, dataset=dataset, job_uid=state.uid, steps_ran=steps_ran)


# --- running ---------------------------------------------------------------------------------


def _job_pods(state: JobState, ctx: OperatorContext) -> list[Pod]:
    pods = ctx.kube.list_pods(state.namespace, f"{JOB_UID_LABEL}={state.uid}")
    return sorted(pods, key=_pod_attempt)


def _finished(pod: Pod) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _pod_attempt(pod: Pod) -> int:
    return int(pod["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "0"))


def _stop_pods(state: JobState, ctx: OperatorContext) -> None:
    for pod in _job_pods(state, ctx):
        if not _finished(pod):
            ctx.kube.delete_pod(state.namespace, pod["metadata"]["name"])


def _suspend(state: JobState, ctx: OperatorContext) -> None:
    for pod in _job_pods(state, ctx):
        ctx.kube.delete_pod(state.namespace, pod["metadata"]["name"])
    message = "suspended: trainer pod deleted, checkpoint kept; set spec.runPolicy.suspend=false to resume"
    state.transition(JobPhase.SUSPENDED, Reason.SUSPENDED, message)
    state.condition(ConditionType.SUSPENDED, True, Reason.SUSPENDED, message)
    state.condition(ConditionType.RUNNING, False, Reason.SUSPENDED, message)


def _deadline_exceeded(job: DPTrainingJob, state: JobState) -> bool:
    deadline = job.spec.run_policy.active_deadline_seconds
    started = state.status.start_time
    if deadline is None or started is None:
        return False
    elapsed = (datetime.now(UTC) - started).total_seconds()
    if elapsed <= deadline:
        return False
    state.fail(Reason.DEADLINE_EXCEEDED, f"job ran {elapsed:.0f}s, longer than activeDeadlineSeconds={deadline}")
    return True


def _run(  # noqa: PLR0917
    job: DPTrainingJob,
    dataset: PrivateDataset | None,
    mechanism: MechanismSegment,
    state: JobState,
    ctx: OperatorContext,
    logger: Logger,
) -> None:
    if state.phase == JobPhase.SUSPENDED:
        state.condition(ConditionType.SUSPENDED, False, Reason.RESUMED, "resumed from the last checkpoint")
    ctx.kube.create_if_absent(job_config_map(job, dataset))
    if job.spec.checkpoint.volume == "persistentVolumeClaim" and not _checkpoint_claim_intact(job, state, ctx):
        return
    pods = _job_pods(state, ctx)
    if any(pod["metadata"].get("deletionTimestamp") and not _finished(pod) for pod in pods):
        return  # an old trainer is still stopping (it holds the checkpoint): start none beside it
    live = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]
    current = live[-1] if live else None
    # Pods are the truth: a status write lost in an operator crash is recovered from their labels.
    attempts = max(state.status.attempts or 0, max((_pod_attempt(pod) for pod in pods), default=0))
    state.status.attempts = attempts
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
        _succeed(job, state, ctx, summary)
    else:
        _attempt_failed(job, dataset, mechanism, state, ctx, logger, pods=pods, pod=current, summary=summary)


def _succeed(job: DPTrainingJob, state: JobState, ctx: OperatorContext, summary: TerminationMessage | None) -> None:
    _commit(state, ctx, steps_ran=summary.charged_steps if summary else None)
    privacy = state.status.privacy or PrivacyStatus()
    message = f"trained {privacy.steps} steps"
    if privacy.epsilon_spent is not None:
        message += f", ε={privacy.epsilon_spent:.4g} ≤ {job.spec.privacy.target_epsilon:g}"
    state.succeed(message)
    progress = state.status.progress or ProgressStatus()
    state.status.progress = progress.model_copy(update={"percent": "100%"})


def _attempt_failed(  # noqa: PLR0917
    job: DPTrainingJob,
    dataset: PrivateDataset | None,
    mechanism: MechanismSegment,
    state: JobState,
    ctx: OperatorContext,
    logger: Logger,
    *,
    pods: list[Pod],
    pod: Pod,
    summary: TerminationMessage | None,
) -> None:
    """A failed trainer pod: fail the job (permanent error, no resumable storage, backoff spent) or retry."""
    code = exit_code(pod)
    error = (summary.error if summary else None) or f"trainer exited with code {code}"
    charged = summary.charged_steps if summary else None
    permanent = _permanent_failure(code)
    failures = sum(1 for candidate in pods if candidate.get("status", {}).get("phase") == "Failed")
    if permanent is not None:
        reason, message = permanent, str(error)
    elif job.spec.checkpoint.volume == "emptyDir":
        # Without a persistent journal a retry could not know what the failed attempt spent.
        reason, message = (
            Reason.POD_FAILED,
            f"{error} (checkpoint.volume emptyDir cannot resume; use persistentVolumeClaim)",
        )
    elif failures > job.spec.run_policy.backoff_limit:
        reason = Reason.BACKOFF_LIMIT_EXCEEDED
        message = f"{failures} trainer pods failed (backoffLimit {job.spec.run_policy.backoff_limit}); last: {error}"
    else:
        attempt = state.status.attempts or 0
        logger.warning(f"attempt {attempt} failed ({error}); retrying from the last checkpoint")
        state.event(Reason.ATTEMPT_FAILED, f"attempt {attempt} failed: {error}; retrying", warning=True)
        _start_attempt(job, dataset, mechanism, state, ctx, attempt=attempt + 1)
        return
    _commit(state, ctx, steps_ran=charged)
    state.fail(reason, message)


def _permanent_failure(code: int | None) -> Reason | None:
    """The failure reason of a trainer exit that retrying cannot fix (None: retry)."""
    try:
        return PERMANENT_FAILURES.get(ExitCode(code)) if code is not None else None
    except ValueError:
        return None


def _checkpoint_claim_intact(job: DPTrainingJob, state: JobState, ctx: OperatorContext) -> bool:
    """Create the claim on first use and remember its UID. Should it later be replaced (deleted and
    re-created empty), the journal of earlier attempts is gone: a retry would start a fresh journal
    and the ledger could no longer learn what those attempts spent, so the job fails instead."""
    ctx.kube.create_if_absent(checkpoint_claim(job))
    uid = ctx.kube.claim_uid(state.namespace, checkpoint_claim_name(state.name))
    known = state.status.checkpoint_claim_uid
    if uid is not None and known is None:
        state.status.checkpoint_claim_uid = uid
    if known is None or uid == known:
        return True
    _stop_pods(state, ctx)
    _commit(state, ctx, steps_ran=None)
    state.fail(
        Reason.CHECKPOINT_LOST,
        f"checkpoint claim {checkpoint_claim_name(state.name)} was replaced while the job ran: the privacy journal "
        "of earlier attempts is gone, so their spend stays charged in full; create a new job to train again",
    )
    return False


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
    name = pod["metadata"]["name"]
    if ctx.kube.create_if_absent(pod):
        state.event(Reason.POD_CREATED, f"created trainer pod {name}")
    state.status.attempts = attempt
    if state.status.start_time is None:
        state.status.start_time = now()
    state.transition(JobPhase.PENDING, Reason.STARTED, f"attempt {attempt} started")
    state.condition(ConditionType.RUNNING, True, Reason.POD_CREATED, f"trainer pod {name} (attempt {attempt})")
    state.condition(ConditionType.SUSPENDED, False, Reason.RUNNING, "not suspended")


def _observe_running(pod: Pod, state: JobState, ctx: OperatorContext) -> None:
    if pod.get("status", {}).get("phase") != "Running":
        return
    state.transition(JobPhase.RUNNING, Reason.RUNNING, f"trainer pod {pod['metadata']['name']} is running")
    pod_ip = pod.get("status", {}).get("podIP")
    sample = scrape(pod_ip, ctx.settings.trainer_metrics_port) if pod_ip else None
    if sample is None:
        return
    privacy = state.status.privacy or PrivacyStatus()
    progress = state.status.progress or ProgressStatus()
    if sample.epsilon_spent is not None:
        # Never lower what status shows: a fresh attempt reports from its journal, which only grows.
        privacy.epsilon_spent = max(privacy.epsilon_spent or 0.0, ledger.round_up(sample.epsilon_spent))
    if sample.steps is not None:
        progress.step = sample.steps
    total = sample.planned_steps or progress.total_steps
    if total:
        progress.total_steps = total
        progress.percent = f"{min(100, int(100 * (progress.step or 0) / total))}%"
    for key, value in (("loss", sample.loss), ("eval_metric", sample.eval_metric), ("eval_value", sample.eval_value)):
        if value is not None:
            setattr(progress, key, value)
    progress.last_update_time = now()
    state.status.privacy, state.status.progress = privacy, progress


def _apply_summary(summary: TerminationMessage, state: JobState) -> None:
    privacy = state.status.privacy or PrivacyStatus()
    progress = state.status.progress or ProgressStatus()
    if summary.epsilon is not None:
        privacy.epsilon_spent = max(privacy.epsilon_spent or 0.0, ledger.round_up(summary.epsilon))
    if summary.charged_steps is not None:
        privacy.steps = summary.charged_steps
    if summary.steps_run is not None:
        progress.step = summary.steps_run
    name = summary.eval_metric
    if name is not None and name in summary.eval_metrics:
        progress.eval_metric, progress.eval_value = name, summary.eval_metrics[name]
    progress.last_update_time = now()
    state.status.privacy, state.status.progress = privacy, progress


# --- finished jobs and deletion ----------------------------------------------------------------


def _finish_cleanup(state: JobState, ctx: OperatorContext) -> None:
    """TTL after completion; nothing else changes on a finished job."""
    ttl = (state.body.get("spec") or {}).get("runPolicy", {}).get("ttlSecondsAfterFinished")
    finished = state.status.completion_time
    if ttl is None or finished is None:
        return
    if (datetime.now(UTC) - finished).total_seconds() >= ttl:
        ctx.kube.delete_job(state.namespace, state.name)


def delete_children(body: dict[str, Any], ctx: OperatorContext) -> None:
    """On deletion: remove pods, ConfigMap and claim (don't rely on garbage collection alone) and make
    the ledger entry final. A job that started pods and did not report stays charged in full."""
    state = JobState.read(body)
    for pod in _job_pods(state, ctx):
        ctx.kube.delete_pod(state.namespace, pod["metadata"]["name"])
    ctx.kube.delete_config_map(state.namespace, config_map_name(state.name))
    ctx.kube.delete_claim(state.namespace, checkpoint_claim_name(state.name))
    _commit(state, ctx, steps_ran=0 if not state.status.attempts else None)
    ctx.metrics.observe_job(state.uid, None)
