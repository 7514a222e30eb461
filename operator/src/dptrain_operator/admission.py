"""Admission: plan a job, reserve its mechanism in the dataset's ledger, and commit what actually ran.

Every ledger write carries a resourceVersion precondition; :func:`retry_on_conflict` re-reads and
retries on 409, so racing jobs can never overshoot a budget together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import kopf

from dptrain_accounting import MechanismPlan, MechanismSegment, compute_epsilon, plan_mechanism
from dptrain_api import DPTrainingJob, PrivateDataset, PrivateDatasetStatus, plan_inputs
from dptrain_operator import ledger
from dptrain_operator.context import OperatorContext
from dptrain_operator.kube import ConflictError

__all__ = ["commit", "plan_job", "reserve", "retry_on_conflict"]

T = TypeVar("T")
_CONFLICT_RETRIES = 50


def retry_on_conflict(attempt: Callable[[], T], *, what: str, retries: int = _CONFLICT_RETRIES) -> T:
    """``attempt()`` until it does not raise :class:`ConflictError` (jittered backoff); a kopf TemporaryError
    (the handler is retried later) when writers keep colliding."""
    for number in range(retries):
        try:
            return attempt()
        except ConflictError:
            time.sleep(min(0.5, 0.005 * 2 ** min(number, 7)) * random.uniform(0.5, 1.5))
    raise kopf.TemporaryError(f"{what}: too many conflicting writers; retrying", delay=1)


def plan_job(job: DPTrainingJob, dataset: PrivateDataset | None) -> MechanismPlan:
    """The job's plan from public numbers only, exactly as the trainer makes it (cached)."""
    return plan_mechanism(**plan_inputs(job, dataset).as_kwargs())


def _write_dataset_status(raw: dict[str, Any], status: PrivateDatasetStatus, ctx: OperatorContext) -> None:
    body = {**raw, "status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}
    written = ctx.kube.replace_dataset_status(body)
    metadata = written["metadata"]
    ctx.metrics.observe_dataset(
        metadata["namespace"],
        metadata["name"],
        budget=float(written["spec"]["budget"]["epsilon"]),
        spent=status.epsilon_spent or 0.0,
        remaining=status.epsilon_remaining or 0.0,
    )


def reserve(
    ctx: OperatorContext, *, namespace: str, dataset: str, job_name: str, job_uid: str, mechanism: MechanismSegment
) -> str | None:
    """Reserve ``mechanism`` for the job in the dataset's ledger; the refusal message when it does not fit."""

    def attempt() -> str | None:
        raw = ctx.kube.get_dataset(namespace, dataset)
        if raw is None:
            return f"PrivateDataset {dataset!r} disappeared"
        current = PrivateDataset.model_validate(raw)
        if ledger.find_entry(current.status, job_uid) is not None:
            return None  # already reserved (an earlier reconciliation)
        entries = current.status.ledger if current.status else []
        admission = ledger.admit(entries, current.spec.budget, mechanism)
        if not admission.admitted:
            alone = compute_epsilon([mechanism], delta=current.spec.budget.delta, accountant=ledger.LEDGER_ACCOUNTANT)
            return (
                f"job needs ε={alone:.4g} of PrivateDataset {dataset!r} (composed total would be "
                f"{admission.epsilon_after:.4g} > budget {current.spec.budget.epsilon:g}); remaining "
                f"ε={max(admission.remaining_before, 0.0):.4g}. Lower epochs or raise the noise, or ask the data "
                "custodian for more budget"
            )
        status = ledger.reserve(
            current.status, current.spec.budget, job_name=job_name, job_uid=job_uid, mechanism=mechanism
        )
        _write_dataset_status(raw, status, ctx)
        return None

    return retry_on_conflict(attempt, what=f"reserving budget in PrivateDataset {dataset!r}")


def commit(ctx: OperatorContext, *, namespace: str, dataset: str, job_uid: str, steps_ran: int | None) -> None:
    """Make the job's ledger entry final at what the journal proves ran (None: unknown, all stays charged)."""

    def attempt() -> None:
        raw = ctx.kube.get_dataset(namespace, dataset)
        if raw is None:
            return
        current = PrivateDataset.model_validate(raw)
        entry = ledger.find_entry(current.status, job_uid)
        if current.status is None or entry is None or entry.state == "Committed":
            return
        status = ledger.commit(current.status, current.spec.budget, job_uid=job_uid, steps_ran=steps_ran)
        _write_dataset_status(raw, status, ctx)

    retry_on_conflict(attempt, what=f"committing to PrivateDataset {dataset!r}")
