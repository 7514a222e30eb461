"""Reconciliation of a DPTrainingJob: level-triggered and idempotent. Every call reads the world (the job, its
dataset, its PrivacyLedger entry, its pods) and moves it one step towards the spec; create/update events and a
timer all call the same function, so a restarted operator converges without duplicate pods.

What a job may spend, how many pods it has had and what they were seen to charge live in its ledger entry,
which only the operator writes; the job's status is a display of it, never an input.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dptrain_accounting import AccountingError, MechanismPlan
from dptrain_api import (
    AuditStatus,
    ConditionType,
    DistributedStatus,
    DPTrainingJob,
    JobPhase,
    LedgerEntry,
    PrivacyStatus,
    PrivateDataset,
    ProgressStatus,
    Reason,
    ReservedMechanisms,
    TerminationMessage,
    WorkerStatus,
    dataset_identity,
    describe_validation_error,
    holdout_fraction,
    ledger_name,
)
from dptrain_operator import admission, ledger, pods
from dptrain_operator.conditions import get_condition, now
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.charged import (
    ChargedReconciliation,
    permanent_failure,
    write_reconciled,
)
from dptrain_operator.render import (
    PodContract,
    checkpoint_claim,
    checkpoint_claim_name,
    gang_network_policy,
    gang_policy_name,
    gang_service,
    gang_service_name,
    owned_by,
    pod_name,
    trainer_pod,
)
from dptrain_operator.scrape import scrape
from dptrain_operator.state import FINISHED, JobState, read_job_state
from dptrain_operator.workers import AccountingTimeout

Logger = logging.Logger | logging.LoggerAdapter[Any]
Pod = dict[str, Any]


def reconcile_and_write(ctx: OperatorContext, namespace: str, name: str, uid: str, logger: Logger) -> JobState | None:
    """Read the job fresh, reconcile it, write its status (when changed) and count a new failure.

    Returns the state (its events still to be posted), or None when the job is gone or was re-created.
    """
    written = write_reconciled(
        lambda: ctx.kube.get_job(namespace, name),
        lambda fresh: reconcile_job(fresh, ctx, logger),
        lambda status: ctx.kube.patch_job_status(namespace, name, status),
        uid=uid,
    )
    if written is None:
        return None
    fresh, state = written
    if state.phase == JobPhase.FAILED and (fresh.get("status") or {}).get("phase") != JobPhase.FAILED:
        failed = get_condition(state.status.conditions, ConditionType.FAILED)
        ctx.metrics.job_failures.labels(reason=failed.reason if failed else "Unknown").inc()
    return state


class JobReconciliation(ChargedReconciliation[JobState]):
    """One reconciliation of one job: the job as read, its dataset, its ledger, and the status being written."""

    noun = "job"

    def __init__(self, body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> None:
        super().__init__(read_job_state(body), ctx, logger)
        self.job: DPTrainingJob

    # --- entry point ---------------------------------------------------------------------------------------

    def run(self) -> JobState:
        try:
            self.job = DPTrainingJob.model_validate(self.state.body)
        except ValidationError as error:
            self.state.fail(Reason.INVALID_SPEC, "; ".join(describe_validation_error(error, prefix="")))
            return self.state
        if not self._load_dataset():
            return self.state
        # A job that ended before admission (a bad spec or plan) has no entry: only its TTL is left to do. A
        # status saying "ended" never stops a job that has an entry: the entry decides.
        entry = self._entry(admit=self.state.phase not in FINISHED)
        if entry is None:
            self._ttl()
            return self.state
        self._show_plan(entry)
        if entry.state == "Refused":
            self._release_ended()
            self.state.fail(Reason(entry.outcome or Reason.BUDGET_EXCEEDED), entry.message or "refused")
        elif entry.state == "Committed":
            self._finished(entry)
        else:
            self._run(entry)
        return self.state

    # --- dataset, ledger, admission ------------------------------------------------------------------------

    def _load_dataset(self) -> bool:
        reference = self.job.spec.dataset.dataset_ref
        if reference is None:
            return True
        self.dataset = self._read_dataset(reference.name)
        return self.dataset is not None

    def _entry(self, *, admit: bool) -> LedgerEntry | None:
        """The job's ledger entry, admitting the job first when it has none and ``admit`` (None: the job failed,
        waits, or was not to be admitted)."""
        identity = admission.job_identity(self.job, self.dataset)
        self.ledger = ledger_name(identity)
        try:
            initial = holdout_fraction(self.job, self.dataset)
            _, status = admission.open_ledger(
                self.ctx, identity=identity, namespace=self.namespace, dataset=self.dataset, holdout=initial
            )
            self.state.status.ledger_name = self.ledger
            if not self._bound(status):
                return None
            entry = ledger.find_entry(status, self.uid)
            if entry is not None or not admit:
                return entry
            holdout = admission.holdout_of(self.job, self.dataset, status)
        except ValueError as error:
            self.state.fail(Reason.INVALID_SPEC, str(error))
            return None
        plan = self._plan(holdout)
        if plan is None or not self._image_allowed(self.job.spec.image):
            return None
        entry = admission.admit_job(self.ctx, self.ledger, job=self.job, plan=plan)
        if entry.state == "Reserved":
            message = f"planned σ={plan.noise_multiplier:.4g}, q={plan.sample_rate:.4g}, {plan.steps} steps"
            if plan.releases:
                message += f", {plan.releases} held-out releases (σ={plan.holdout_noise_multiplier:.4g})"
            if self.dataset is not None:
                message += f"; reserved in PrivateDataset {self.dataset.metadata.name} (ledger {self.ledger})"
            self.state.condition(ConditionType.ADMITTED, True, Reason.ADMITTED, message)
            self.state.event(Reason.ADMITTED, message)
            self.logger.info(message)
        return entry

    def _plan(self, holdout: float) -> MechanismPlan | None:
        try:
            return admission.plan_job(self.ctx, self.job, self.dataset, holdout)
        except (AccountingError, ValueError) as error:
            self.state.fail(Reason.INVALID_PLAN, str(error))
        except AccountingTimeout as error:
            self.state.fail(
                Reason.PLAN_TIMEOUT,
                f"planning did not finish within its limits ({error}: {self.ctx.settings.plan_timeout_seconds:g} "
                f"CPU seconds, {self.ctx.settings.plan_memory_mib} MiB); lower epochs or raise batchSize (fewer "
                "steps plan faster)",
            )
        return None

    def _show_plan(self, entry: LedgerEntry) -> None:
        self._show_planned_privacy(entry, self.job.spec.privacy)
        if self.state.status.progress is None:
            assert entry.train is not None
            self.state.status.progress = ProgressStatus(step=0, total_steps=entry.train.steps, percent="0%")

    # --- finished jobs ---------------------------------------------------------------------------------------

    def _finished(self, entry: LedgerEntry) -> None:
        """A committed entry is final whatever the job's status says: stop what runs, show the outcome, TTL."""
        self._show_committed(entry, default_message="succeeded")
        self._ttl()

    def _ttl(self) -> None:
        """Delete a finished job ttlSecondsAfterFinished after it finished."""
        ttl = self.job.spec.run_policy.ttl_seconds_after_finished
        finished = self.state.status.completion_time
        if self.state.phase not in FINISHED or ttl is None or finished is None:
            return
        if (datetime.now(UTC) - finished).total_seconds() >= ttl:
            self.ctx.kube.delete_job(self.namespace, self.state.name)

    # --- running ----------------------------------------------------------------------------------------------

    def _run(self, entry: LedgerEntry) -> None:
        if self.job.spec.run_policy.suspend:
            self._suspend(entry)
            return
        if self._deadline_exceeded(entry):
            return
        persistent = self.job.spec.checkpoint.volume == "persistentVolumeClaim"
        if persistent and not self._claim_intact(entry, checkpoint_claim(self.job)):
            return
        if self.state.phase == JobPhase.SUSPENDED:
            self.state.condition(ConditionType.SUSPENDED, False, Reason.RESUMED, "resumed from the last checkpoint")
        live = pods.job_pods(self.ctx.kube, self.namespace, self.uid)
        if any(pods.terminating(pod) for pod in live):
            return  # an old trainer is still stopping (it holds the checkpoint): start none beside it
        if self.job.spec.distributed.workers > 1 and not self._gang_objects_ready(entry):
            return
        # An attempt is a gang: its leader (worker 0, rank 0) owns the journal and the checkpoint, and its report
        # is the charge; the other workers live and die with it.
        gang = [pod for pod in live if pods.number(pod) == entry.pods]
        leader = next((pod for pod in gang if pods.worker(pod) == 0), None)
        latest_settled = pod_name(self.state.name, entry.pods) in entry.settled_pods
        if entry.pods == 0 or latest_settled:
            self._start_pod(entry, number=entry.pods + 1)  # the last attempt's end is recorded: the next one
        elif leader is None:
            self._start_pod(entry, number=entry.pods)  # recorded in the ledger, not created yet (a crash between)
        elif not pods.ended(leader):
            if any(pods.phase(pod) == "Failed" for pod in gang):
                self._stop_gang(gang)  # a worker failed: the leader stops too, and its end decides (retry or fail)
            else:
                self._complete_gang(entry, gang)
                self._observe(entry, leader)
        else:
            self._stop_gang(gang)  # the leader ended: the others have nothing left to do
            self._pod_ended(entry, leader)
        self._show_gang(entry)
        self._release_settled(entry, live)

    def _start_pod(self, entry: LedgerEntry, *, number: int) -> None:
        """Start attempt ``number``: its whole gang at once (the leader first; the others dial its DNS name, so a
        queue such as Kueue can admit all of them together)."""
        if number > entry.pods:
            entry = self._update(lambda e: e.model_copy(update={"pods": number}))
        name = self._create_pod(entry, number=number, worker=0)
        if name is None or not self._complete_gang(entry, []):
            return
        self.state.status.attempts = number
        if self.state.status.start_time is None:
            self.state.status.start_time = now()
        self.state.transition(JobPhase.PENDING, Reason.STARTED, f"attempt {number} started")
        self.state.condition(ConditionType.RUNNING, True, Reason.POD_CREATED, f"trainer pod {name} (attempt {number})")
        self.state.condition(ConditionType.SUSPENDED, False, Reason.RUNNING, "not suspended")

    def _create_pod(self, entry: LedgerEntry, *, number: int, worker: int) -> str | None:
        """Create worker ``worker`` of attempt ``number``; its name, or None when the job failed (name taken)."""
        assert entry.train is not None  # a Reserved entry holds its plan
        contract = PodContract(
            pod_number=number,
            attempt=entry.started_pods + 1,
            reserved=ReservedMechanisms(train=entry.train, holdout=entry.holdout),
            identity=dataset_identity(self.job, self.dataset),  # what the trainer may read (not the ledger's key)
            worker=worker,
        )
        manifest = trainer_pod(self.job, dataset=self._dataset_for_pod(), contract=contract, settings=self.ctx.settings)
        name = str(manifest["metadata"]["name"])
        if self.ctx.kube.create_if_absent(manifest):
            self.state.event(Reason.POD_CREATED, f"created trainer pod {name}")
        elif not owned_by(self.ctx.kube.get_pod(self.namespace, name) or {}, self.uid):
            self._child_name_taken("pod", name, entry)
            return None
        return name

    # --- multi-worker gangs -----------------------------------------------------------------------------------

    def _gang_objects_ready(self, entry: LedgerEntry) -> bool:
        """The headless Service (and, with the chart's NetworkPolicy, the gang's own policy) exist and are ours."""
        wanted = [gang_service(self.job)]
        if self.ctx.settings.gang_network_policy:
            wanted.append(gang_network_policy(self.job))
        for manifest in wanted:
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            existing = self.ctx.kube.get_child(kind, self.namespace, name)  # read first: no POST answered 409
            if existing is None and self.ctx.kube.create_if_absent(manifest):
                continue
            existing = existing or self.ctx.kube.get_child(kind, self.namespace, name)
            if existing is not None and not owned_by(existing, self.uid):
                self._child_name_taken(kind, name, entry)
                return False
        return True

    def _complete_gang(self, entry: LedgerEntry, gang: list[Pod]) -> bool:
        """Workers 1..N-1 of attempt ``entry.pods`` that do not exist yet; False when one could not be created."""
        present = {pods.worker(pod) for pod in gang}
        for worker in range(1, self.job.spec.distributed.workers):
            if worker not in present and self._create_pod(entry, number=entry.pods, worker=worker) is None:
                return False
        return True

    def _stop_gang(self, gang: list[Pod]) -> None:
        for pod in gang:
            if not pods.ended(pod) and not pod["metadata"].get("deletionTimestamp"):
                self.ctx.kube.delete_pod(self.namespace, pod["metadata"]["name"])

    def _show_gang(self, entry: LedgerEntry) -> None:
        """status.distributed: the world size and each pod of the current attempt."""
        workers = self.job.spec.distributed.workers
        if workers <= 1:
            return
        current = {
            pods.worker(pod): pod
            for pod in pods.job_pods(self.ctx.kube, self.namespace, self.uid)
            if pods.number(pod) == entry.pods
        }
        rows = [
            WorkerStatus(
                index=index,
                pod=pod_name(self.state.name, entry.pods, index),
                phase=pods.phase(current[index]) if index in current else None,
            )
            for index in range(workers)
        ]
        running = sum(1 for row in rows if row.phase == "Running")
        self.state.status.distributed = DistributedStatus(
            world_size=workers * max(self.job.spec.resources.gpus, 1), ready=f"{running}/{workers}", workers=rows
        )

    def _dataset_for_pod(self) -> PrivateDataset | None:
        """The PrivateDataset as the trainer must see it: with the holdout the ledger fixed for it."""
        if self.dataset is None:
            return None
        raw = self.ctx.kube.get_ledger(self.ledger) or {}
        fixed = (raw.get("status") or {}).get("holdoutFraction")
        if fixed is None:
            return self.dataset
        spec = self.dataset.spec.model_copy(update={"holdout_fraction": fixed})
        return self.dataset.model_copy(update={"spec": spec})

    def _observe(self, entry: LedgerEntry, pod: Pod) -> None:
        if pods.phase(pod) != "Running":
            return
        self.state.transition(JobPhase.RUNNING, Reason.RUNNING, f"trainer pod {pod['metadata']['name']} is running")
        pod_ip = pod.get("status", {}).get("podIP")
        sample = scrape(pod_ip, self.ctx.settings.trainer_metrics_port) if pod_ip else None
        if sample is None:
            return
        steps, releases = sample.charged_steps or 0, sample.charged_releases or 0
        if steps > entry.observed_steps or releases > entry.observed_releases:  # the operator's own record
            self._update(
                lambda e: e.model_copy(
                    update={
                        "observed_steps": max(e.observed_steps, steps),
                        "observed_releases": max(e.observed_releases, releases),
                    }
                )
            )
        _show_sample(self.state, sample)

    def _pod_ended(self, entry: LedgerEntry, pod: Pod) -> None:
        report = pods.report(pod)
        if report is not None:
            _show_report(self.state, report)
        if pods.phase(pod) == "Succeeded":
            message = _success_message(self.state, self.job)
            self._commit(report=report, outcome=Reason.SUCCEEDED, message=message)
            self.state.succeed(message)
            progress = self.state.status.progress or ProgressStatus()
            self.state.status.progress = progress.model_copy(update={"percent": "100%"})
            return
        code = pods.code(pod)
        error = (report.error if report else None) or f"trainer exited with code {code}"
        final = self._final_failure(entry, code, error, oom=pods.oom_killed(pod))
        if final is not None:
            self._fail_and_commit(*final, report=report)
            return
        self.logger.warning(f"attempt {entry.pods} failed ({error}); retrying from the last checkpoint")
        self.state.event(Reason.ATTEMPT_FAILED, f"attempt {entry.pods} failed: {error}; retrying", warning=True)
        entry = self._settle(pod, report=report, failed=True)
        self._start_pod(entry, number=entry.pods + 1)

    def _final_failure(
        self, entry: LedgerEntry, code: int | None, error: str, *, oom: bool = False
    ) -> tuple[Reason, str] | None:
        """Why a failed pod ends the job (None: retry from the checkpoint)."""
        if oom:  # the same memory limit would be killed again: no retry, say what to change
            memory = self.job.spec.resources.memory
            return (
                Reason.OOM_KILLED,
                f"the trainer was killed for exceeding its memory limit (OOMKilled at spec.resources.memory={memory}); "
                "raise spec.resources.memory (or lower training.maxPhysicalBatchSize) and submit the job again",
            )
        permanent = permanent_failure(code)
        if permanent is not None:
            return permanent, error
        if self.job.spec.checkpoint.volume == "emptyDir":  # no persistent journal: a retry could not know the spend
            return Reason.POD_FAILED, f"{error} (checkpoint.volume emptyDir cannot resume; use persistentVolumeClaim)"
        failures, limit = entry.failed_pods + 1, self.job.spec.run_policy.backoff_limit
        if failures > limit:
            return (
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{failures} trainer pods failed (backoffLimit {limit}); last: {error}",
            )
        return None

    # --- stopping: suspend, deadline, lost checkpoint ---------------------------------------------------

    def _suspend(self, entry: LedgerEntry) -> None:
        stopped = self._stop_and_settle(entry)
        message = "suspended: trainer pod deleted, checkpoint kept; set spec.runPolicy.suspend=false to resume"
        if stopped is not None:
            self.state.transition(JobPhase.SUSPENDED, Reason.SUSPENDED, message)
        self.state.condition(ConditionType.SUSPENDED, True, Reason.SUSPENDED, message)
        self.state.condition(ConditionType.RUNNING, False, Reason.SUSPENDED, message)

    def _deadline_exceeded(self, entry: LedgerEntry) -> bool:
        deadline = self.job.spec.run_policy.active_deadline_seconds
        started = self.state.status.start_time
        if deadline is None or started is None:
            return False
        elapsed = (datetime.now(UTC) - started).total_seconds()
        if elapsed <= deadline:
            return False
        stopped = self._stop_and_settle(entry)
        if stopped is not None:
            message = f"job ran {elapsed:.0f}s, longer than activeDeadlineSeconds={deadline}"
            self._fail_and_commit(Reason.DEADLINE_EXCEEDED, message, report=stopped[1])
        return True


def reconcile_job(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> JobState:
    """One reconciliation step; returns the state whose status the caller writes and whose events it posts."""
    return JobReconciliation(body, ctx, logger).run()


def delete_children(body: dict[str, Any], ctx: OperatorContext, logger: Logger) -> None:
    """On deletion: stop the trainer pods, wait until they have ended (their finalizers keep them), commit the
    ledger entry at what the last pod's journal reported (in full when unknown), then remove pods, claim, and the
    gang's Service and NetworkPolicy."""
    work = JobReconciliation(body, ctx, logger)
    try:
        work.job = DPTrainingJob.model_validate(body)
    except ValidationError:
        return
    reference = work.job.spec.dataset.dataset_ref
    if reference is not None:
        raw = ctx.kube.get_dataset(work.namespace, reference.name)
        work.dataset = PrivateDataset.model_validate(raw) if raw is not None else None
    if reference is None or work.dataset is not None:
        work.ledger = ledger_name(admission.job_identity(work.job, work.dataset))
    work._delete(claim_name=checkpoint_claim_name(work.state.name))
    for kind, name in (
        ("Service", gang_service_name(work.state.name)),
        ("NetworkPolicy", gang_policy_name(work.state.name)),
    ):
        child = ctx.kube.get_child(kind, work.namespace, name)
        if child is not None and owned_by(child, work.uid):
            ctx.kube.delete_child(kind, work.namespace, name)
    ctx.metrics.observe_job(work.uid, None)


# --- small helpers ------------------------------------------------------------------------------------------


def _success_message(state: JobState, job: DPTrainingJob) -> str:
    privacy = state.status.privacy or PrivacyStatus()
    message = f"trained {privacy.steps} steps"
    if privacy.epsilon_spent is not None:
        message += f", ε={privacy.epsilon_spent:.4g} ≤ {job.spec.privacy.target_epsilon:g}"
    return message


def _show_sample(state: JobState, sample: Any) -> None:
    privacy = state.status.privacy or PrivacyStatus()
    progress = state.status.progress or ProgressStatus()
    if sample.epsilon_spent is not None:
        # Never lower what status shows: a fresh attempt reports from its journal, which only grows.
        privacy.epsilon_spent = max(privacy.epsilon_spent or 0.0, ledger.round_up(sample.epsilon_spent))
    if sample.charged_steps is not None:
        privacy.steps = max(privacy.steps or 0, sample.charged_steps)
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


def _show_report(state: JobState, report: TerminationMessage) -> None:
    privacy = state.status.privacy or PrivacyStatus()
    progress = state.status.progress or ProgressStatus()
    if report.epsilon is not None:
        privacy.epsilon_spent = max(privacy.epsilon_spent or 0.0, ledger.round_up(report.epsilon))
    if report.charged_steps is not None:
        privacy.steps = report.charged_steps
    if report.steps_run is not None:
        progress.step = report.steps_run
    name = report.eval_metric
    if name is not None and name in report.eval_metrics:
        progress.eval_metric, progress.eval_value = name, report.eval_metrics[name]
    if "loss" in report.eval_metrics:
        progress.loss = report.eval_metrics["loss"]
    progress.last_update_time = now()
    state.status.privacy, state.status.progress = privacy, progress
    if report.audit_epsilon_lower_bound is not None:
        _show_audit(state, report)


def _show_audit(state: JobState, report: TerminationMessage) -> None:
    """The privacy audit's result (spec.audit) into status.audit, with one event the first time it is seen."""
    bound, claimed = report.audit_epsilon_lower_bound, report.audit_epsilon
    assert bound is not None
    contradicted = claimed is not None and bound > claimed
    first = state.status.audit is None
    state.status.audit = AuditStatus(
        epsilon_lower_bound=bound, epsilon=claimed, confidence=report.audit_confidence, contradicted=contradicted
    )
    if not first:
        return
    confidence = f"{report.audit_confidence:.0%} confidence" if report.audit_confidence is not None else "audit"
    if contradicted:
        state.event(
            Reason.AUDIT_CONTRADICTS_EPSILON,
            f"privacy audit: ε̂={bound:.4g} > claimed ε={claimed:.4g} ({confidence}): the training pipeline is NOT as "
            "private as claimed; do not release the model, keep the trainer's audit-report.json and report it",
            warning=True,
        )
    else:
        state.event(Reason.AUDITED, f"privacy audit: ε̂={bound:.4g} ≤ ε={claimed:.4g} ({confidence}): not contradicted")


__all__ = ["FINISHED", "delete_children", "reconcile_and_write", "reconcile_job"]
