"""Admission and the ledger's I/O: find (or create) a job's PrivacyLedger, plan the job, reserve or refuse it,
record what the operator observes, and commit what actually ran.

The ledger is a cluster-scoped object only the operator writes: admission decisions come from it, never from a
job's status. Every write carries a resourceVersion precondition and :func:`retry_on_conflict` re-reads and
retries on 409, so racing jobs can never overshoot a budget together. Planning and composition run in child
processes with a time limit (:mod:`dptrain_operator.workers`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import kopf
from pydantic import ValidationError

from dptrain_accounting import MechanismPlan, MechanismSegment, compact, plan_mechanism
from dptrain_api import (
    BoundDataset,
    BudgetChange,
    DPTrainingJob,
    LedgerEntry,
    PrivacyLedger,
    PrivacyLedgerSpec,
    PrivacyLedgerStatus,
    PrivateDataset,
    dataset_identity,
    holdout_fraction,
    ledger_name,
    plan_inputs,
)
from dptrain_operator import ledger
from dptrain_operator.conditions import now
from dptrain_operator.context import OperatorContext
from dptrain_operator.kube import ConflictError

__all__ = [
    "Ledger",
    "admit",
    "admit_job",
    "holdout_of",
    "job_identity",
    "mirror_to_dataset",
    "open_ledger",
    "parse_status",
    "plan_job",
    "retry_on_conflict",
    "write_ledger",
]

T = TypeVar("T")
_CONFLICT_RETRIES = 50
_log = logging.getLogger(__name__)


def retry_on_conflict(attempt: Callable[[], T], *, what: str, retries: int = _CONFLICT_RETRIES) -> T:
    """``attempt()`` until it does not raise :class:`ConflictError` (jittered backoff); a kopf TemporaryError
    (the handler is retried later) when writers keep colliding."""
    for number in range(retries):
        try:
            return attempt()
        except ConflictError:
            time.sleep(min(0.5, 0.005 * 2 ** min(number, 7)) * random.uniform(0.5, 1.5))
    raise kopf.TemporaryError(f"{what}: too many conflicting writers; retrying", delay=1)


def job_identity(job: DPTrainingJob, dataset: PrivateDataset | None) -> str:
    """The identity whose ledger keeps ``job``: its PrivateDataset's source, or (a public built-in dataset used
    directly, without a budget) one ledger per namespace and built-in, so every job still has a trusted record."""
    if dataset is not None:
        return dataset_identity(job, dataset)
    assert job.spec.dataset.builtin is not None
    return f"{job.metadata.namespace}/job-data/{job.spec.dataset.builtin.value}"


Ledger = tuple[dict[str, Any], PrivacyLedgerStatus]
"""A ledger as read (its raw body, for the resourceVersion precondition) and its parsed status."""


def parse_status(raw: dict[str, Any]) -> PrivacyLedgerStatus:
    """A ledger's status; a kopf TemporaryError when it does not parse (never read as an empty ledger)."""
    try:
        return PrivacyLedgerStatus.model_validate(raw.get("status") or {})
    except ValidationError as error:
        raise kopf.TemporaryError(
            f"PrivacyLedger {raw['metadata']['name']} does not parse: {error}", delay=30
        ) from None


def _read(ctx: OperatorContext, name: str) -> Ledger | None:
    raw = ctx.kube.get_ledger(name)
    return None if raw is None else (raw, parse_status(raw))


def open_ledger(
    ctx: OperatorContext, *, identity: str, namespace: str, dataset: PrivateDataset | None, holdout: float
) -> Ledger:
    """The ledger of ``identity``, created on first use (bound to ``dataset``, its budget and holdout)."""
    name = ledger_name(identity)
    found = _read(ctx, name)
    if found is not None:
        return found
    manifest = PrivacyLedger(
        metadata={"name": name, "labels": {"app.kubernetes.io/managed-by": "dptrain-operator"}},
        spec=PrivacyLedgerSpec(identity=identity, namespace=namespace),
    ).to_wire()
    ctx.kube.create_ledger(manifest)

    def initial(status: PrivacyLedgerStatus) -> PrivacyLedgerStatus:
        if status.holdout_fraction is not None:  # another writer initialised it first
            return status
        update: dict[str, Any] = {"holdout_fraction": holdout}
        if dataset is not None:  # a budget from the start: no job is ever admitted against none
            budget = dataset.spec.budget
            update["dataset"] = BoundDataset(name=dataset.metadata.name or "", uid=dataset.metadata.uid or "")
            update["budget"] = budget
            update["budget_history"] = [
                BudgetChange(
                    time=now(),
                    epsilon=budget.epsilon,
                    delta=budget.delta,
                    reason="Initial",
                    dataset_uid=dataset.metadata.uid,
                )
            ]
        return status.model_copy(update=update)

    write_ledger(ctx, name, initial)
    found = _read(ctx, name)
    assert found is not None
    return found


def write_ledger(
    ctx: OperatorContext, name: str, change: Callable[[PrivacyLedgerStatus], PrivacyLedgerStatus]
) -> PrivacyLedgerStatus:
    """Apply ``change`` to the ledger's status under a resourceVersion precondition (re-read on conflict), then
    copy the result to the PrivateDataset it describes (best effort: the dataset's timer copies it again)."""

    namespace = ""

    def attempt() -> PrivacyLedgerStatus:
        nonlocal namespace
        found = _read(ctx, name)
        if found is None:
            raise kopf.TemporaryError(f"PrivacyLedger {name} disappeared", delay=5)
        raw, status = found
        namespace = str(raw.get("spec", {}).get("namespace", ""))
        changed = ledger.with_totals(change(status), epsilon_of=epsilon_of(ctx))
        if changed != status:
            body = {**raw, "status": changed.model_dump(mode="json", by_alias=True, exclude_none=True)}
            ctx.kube.replace_ledger_status(body)
        return changed

    with ctx.ledger_locks.of(name):
        status = retry_on_conflict(attempt, what=f"writing PrivacyLedger {name}")
    if status.dataset is not None and namespace:
        with contextlib.suppress(Exception):
            mirror_to_dataset(ctx, namespace=namespace, ledger_name=name, status=status)
    return status


def _unit(raw: dict[str, Any]) -> str | None:
    """The dataset's privacy unit in words, for `kubectl get pds` (None for a spec the dataset handler refuses)."""
    try:
        return PrivateDataset.model_validate(raw).spec.unit_description
    except ValidationError:
        return None


def mirror_to_dataset(ctx: OperatorContext, *, namespace: str, ledger_name: str, status: PrivacyLedgerStatus) -> None:
    """Copy the ledger into its PrivateDataset's status (for `kubectl get pds`), keeping the dataset's conditions."""
    if status.dataset is None:
        return
    bound = status.dataset

    def attempt() -> None:
        raw = ctx.kube.get_dataset(namespace, bound.name)
        if raw is None or raw["metadata"]["uid"] != bound.uid:
            return
        current = raw.get("status") or {}
        mirror = {
            "ledgerName": ledger_name,
            "privacyUnit": _unit(raw),
            "budget": status.budget.to_wire() if status.budget else None,
            "epsilonSpent": status.epsilon_spent,
            "epsilonReserved": status.epsilon_reserved,
            "epsilonRemaining": status.epsilon_remaining,
            "ledger": [entry.to_wire() for entry in status.entries],
        }
        wanted = {**current, **{key: value for key, value in mirror.items() if value is not None}}
        if wanted != current:
            ctx.kube.replace_dataset_status({**raw, "status": wanted})
        if status.budget is not None:
            ctx.metrics.observe_dataset(
                namespace,
                bound.name,
                budget=status.budget.epsilon,
                spent=status.epsilon_spent or 0.0,
                remaining=status.epsilon_remaining or 0.0,
            )

    retry_on_conflict(attempt, what=f"copying the ledger to PrivateDataset {bound.name}", retries=5)


_flights_guard = threading.Lock()
_flights: dict[Hashable, threading.Lock] = {}


def _single_flight(key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` with one caller per key at a time: twenty identical jobs admitted together plan once, the
    other nineteen wait and read the cache ``compute`` fills."""
    with _flights_guard:
        flight = _flights.setdefault(key, threading.Lock())
    with flight:
        try:
            return compute()
        finally:
            with _flights_guard:
                _flights.pop(key, None)


@functools.lru_cache(maxsize=1024)
def _cached_plan(ctx: OperatorContext, kwargs: tuple[tuple[str, Any], ...]) -> MechanismPlan:
    return ctx.workers.call(plan_mechanism, **dict(kwargs))


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(
    ctx: OperatorContext, train: tuple[MechanismSegment, ...], holdout: tuple[MechanismSegment, ...], delta: float
) -> float:
    return ctx.workers.call(ledger.ledger_epsilon, list(train), list(holdout), delta)


def epsilon_of(ctx: OperatorContext) -> ledger.EpsilonOf:
    """A ledger's composition, run in a worker and cached here (racing admissions recompute nothing)."""

    def compose(train: Any, holdout: Any, delta: float) -> float:
        key = (tuple(compact(train)), tuple(compact(holdout)), delta)
        return _single_flight(("epsilon", *key), lambda: _cached_epsilon(ctx, *key))

    return compose


def plan_job(ctx: OperatorContext, job: DPTrainingJob, dataset: PrivateDataset | None, holdout: float) -> MechanismPlan:
    """The job's plan from public numbers only, exactly as the trainer makes it (in a worker, cached)."""
    inputs = plan_inputs(job, dataset)
    kwargs = {**inputs.as_kwargs(), "eval_fraction": holdout}
    key = tuple(sorted(kwargs.items()))
    return _single_flight(("plan", key), lambda: _cached_plan(ctx, key))


def admit(
    ctx: OperatorContext, name: str, *, entry: LedgerEntry, plan: MechanismPlan, needs: str, advice: str
) -> LedgerEntry:
    """Reserve ``entry`` (a job's or a site's, with ``plan``'s mechanisms) in ledger ``name``, or record it Refused
    when the budget cannot take it; the entry as recorded. A refusal says "``needs`` ε=…" and then ``advice``."""
    holdout = plan.holdout_segment

    def decide(status: PrivacyLedgerStatus) -> PrivacyLedgerStatus:
        if ledger.find_entry(status, entry.job_uid) is not None:
            return status  # decided before (an earlier reconciliation)
        admission = ledger.admit(status.entries, status.budget, plan.segment, holdout, epsilon_of=epsilon_of(ctx))
        decided = entry.model_copy(
            update={
                "state": "Reserved" if admission.admitted else "Refused",
                "train": ledger.mechanism(plan.segment),
                "holdout": ledger.mechanism(holdout) if holdout is not None else None,
            }
        )
        if not admission.admitted:
            assert status.budget is not None
            decided = decided.model_copy(
                update={
                    "outcome": "BudgetExceeded",
                    "message": f"{needs} ε={plan.epsilon:.4g} of the dataset (composed total would be "
                    f"{admission.epsilon_after:.4g} > budget {status.budget.epsilon:g}); remaining "
                    f"ε={max(admission.remaining_before, 0.0):.4g}. {advice}",
                }
            )
        return ledger.add_entry(status, decided)

    status = write_ledger(ctx, name, decide)
    recorded = ledger.find_entry(status, entry.job_uid)
    assert recorded is not None
    return recorded


def admit_job(ctx: OperatorContext, name: str, *, job: DPTrainingJob, plan: MechanismPlan) -> LedgerEntry:
    """Reserve the job's plan in ledger ``name``, or record it Refused when the budget cannot take it; the entry."""
    entry = LedgerEntry(
        job_name=job.metadata.name or "",
        job_namespace=job.metadata.namespace,
        job_uid=job.metadata.uid or "",
        state="Refused",
    )
    return admit(
        ctx,
        name,
        entry=entry,
        plan=plan,
        needs="the job needs",
        advice="Lower epochs or raise the noise, or ask the data's steward for more budget",
    )


def holdout_of(job: DPTrainingJob, dataset: PrivateDataset | None, status: PrivacyLedgerStatus) -> float:
    """The holdout fraction in force: a dataset's is the one its ledger fixed when it was created; a job on a
    built-in dataset chooses its own. ValueError when the job asks for another than its dataset's."""
    if dataset is None or status.holdout_fraction is None:
        return holdout_fraction(job, dataset)
    fixed = status.holdout_fraction
    asked = job.spec.training.eval_fraction
    if asked is not None and asked != fixed:
        raise ValueError(
            f"training.evalFraction={asked:g} differs from the holdout of PrivateDataset {dataset.metadata.name!r} "
            f"({fixed:g}), which is fixed for every job on it; leave training.evalFraction unset"
        )
    return fixed
