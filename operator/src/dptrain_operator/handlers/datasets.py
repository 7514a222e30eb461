"""PrivateDataset: bind it to the PrivacyLedger of its identity, accept or refuse budget edits, and keep its status
a true copy of the ledger (for `kubectl get pds` and the metrics).

The ledger outlives the dataset object: deleting a charged PrivateDataset and creating it again continues the
same ledger, and a second PrivateDataset over the same records is refused instead of getting a fresh budget.
"""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from dptrain_api import (
    BoundDataset,
    BudgetChange,
    ConditionType,
    PrivacyBudget,
    PrivacyLedgerStatus,
    PrivateDataset,
    PrivateDatasetStatus,
    Reason,
    describe_validation_error,
    ledger_name,
    source_identity,
)
from dptrain_operator import admission, ledger
from dptrain_operator.conditions import now, set_condition
from dptrain_operator.context import OperatorContext
from dptrain_operator.kube import ConflictError
from dptrain_operator.state import Event


def reconcile_dataset(body: dict[str, Any], ctx: OperatorContext) -> list[Event]:
    """One reconciliation of a PrivateDataset; returns the events to post."""
    metadata = body["metadata"]
    try:
        dataset = PrivateDataset.model_validate(body)
    except ValidationError as error:
        message = "; ".join(describe_validation_error(error))
        _set_ready(ctx, metadata, ready=False, reason=Reason.INVALID_SPEC, message=message)
        return []
    namespace = str(metadata["namespace"])
    identity = source_identity(namespace, dataset.spec.source)
    name = ledger_name(identity)
    _, status = admission.open_ledger(
        ctx, identity=identity, namespace=namespace, dataset=dataset, holdout=dataset.spec.holdout_fraction
    )
    events: list[Event] = []
    refusal = _bind(ctx, name, dataset, status, events)
    if refusal is not None:
        _set_ready(ctx, metadata, ready=False, reason=Reason.SOURCE_ALREADY_REGISTERED, message=refusal)
        return events
    status, refused = _budget(ctx, name, dataset, events)
    admission.mirror_to_dataset(ctx, namespace=namespace, ledger_name=name, status=status)
    if status.holdout_fraction is not None and status.holdout_fraction != dataset.spec.holdout_fraction:
        message = (
            f"spec.holdoutFraction={dataset.spec.holdout_fraction:g}, but these records' ledger {name} holds out "
            f"{status.holdout_fraction:g} (fixed when it was created, so every job holds out the same records); "
            f"jobs use {status.holdout_fraction:g}"
        )
        _set_ready(ctx, metadata, ready=False, reason=Reason.HOLDOUT_CHANGED, message=message)
    elif refused is not None:
        _set_ready(ctx, metadata, ready=False, reason=Reason.BUDGET_BELOW_CHARGED, message=refused)
    else:
        budget = status.budget or dataset.spec.budget
        message = f"ε remaining {status.epsilon_remaining:g} of {budget.epsilon:g} (ledger {name})"
        _set_ready(ctx, metadata, ready=True, reason=Reason.BUDGET_TRACKED, message=message)
    return events


def _bind(
    ctx: OperatorContext, name: str, dataset: PrivateDataset, status: PrivacyLedgerStatus, events: list[Event]
) -> str | None:
    """Make ``dataset`` the one the ledger describes; the refusal when another live PrivateDataset already is."""
    uid = dataset.metadata.uid or ""
    bound = status.dataset
    if bound is not None and bound.uid == uid:
        return None
    if bound is not None:
        other = ctx.kube.get_dataset(dataset.metadata.namespace or "", bound.name)
        if other is not None and other["metadata"]["uid"] == bound.uid:
            return (
                f"PrivateDataset {bound.name!r} already describes these records ({name}); a second one would get "
                f"a fresh budget for the same patients. Use {bound.name!r}, or delete it first"
            )
    entry = BoundDataset(name=dataset.metadata.name or "", uid=uid)
    status = admission.write_ledger(ctx, name, lambda s: s.model_copy(update={"dataset": entry}))
    if status.entries:
        events.append(
            Event(
                "Normal",
                Reason.BUDGET_TRACKED,
                f"these records already have a ledger ({name}): its {len(status.entries)} charge(s) continue to count",
            )
        )
    return None


def _budget(
    ctx: OperatorContext, name: str, dataset: PrivateDataset, events: list[Event]
) -> tuple[PrivacyLedgerStatus, str | None]:
    """Accept the spec's budget when it still covers everything charged (every change evented), else keep the one
    in force; the ledger, and why the spec's budget was refused (None when accepted)."""
    wanted = dataset.spec.budget
    decided: list[Event] = []

    def change(status: PrivacyLedgerStatus) -> PrivacyLedgerStatus:
        decided.clear()  # a retried write decides again
        current = status.budget
        if current == wanted:
            return status
        if current is None:
            reason, text = Reason.BUDGET_SET, f"budget ε={wanted.epsilon:g}, δ={wanted.delta:g}"
        else:
            refusal = _refusal(ctx, status, current, wanted)
            if refusal is not None:
                decided.append(Event("Warning", Reason.BUDGET_BELOW_CHARGED, refusal))
                return status
            reason, text = _budget_reason(current, wanted)
        decided.append(Event("Normal", reason, text))
        history = BudgetChange(
            time=now(),
            epsilon=wanted.epsilon,
            delta=wanted.delta,
            reason="Initial" if reason == Reason.BUDGET_SET else _HISTORY[reason],
            dataset_uid=dataset.metadata.uid,
        )
        return status.model_copy(update={"budget": wanted, "budget_history": [*status.budget_history, history]})

    status = admission.write_ledger(ctx, name, change)
    events.extend(decided)
    refusal = next((event.message for event in decided if event.reason == Reason.BUDGET_BELOW_CHARGED), None)
    return status, refusal


def _refusal(
    ctx: OperatorContext, status: PrivacyLedgerStatus, current: PrivacyBudget, wanted: PrivacyBudget
) -> str | None:
    """Why ``wanted`` may not replace the budget in force (None: it may). Refused: an ε below what the entries
    compose to at the new δ, and a δ raised over entries that charge something (composed at a larger δ they show a
    smaller ε, and the same records could be spent again: 0.5 makes any reservation look free)."""
    epsilon_of = admission.epsilon_of(ctx)
    charged = ledger.composed_epsilon(status.entries, wanted.delta, epsilon_of=epsilon_of)
    kept = f"the budget in force stays ε={current.epsilon:g}, δ={current.delta:g}"
    if charged > wanted.epsilon:
        return (
            f"refused budget ε={wanted.epsilon:g}, δ={wanted.delta:g}: the jobs charged so far compose to "
            f"ε={ledger.round_up(charged):g} at that δ; {kept}"
        )
    if wanted.delta > current.delta:
        before = ledger.composed_epsilon(status.entries, current.delta, epsilon_of=epsilon_of)
        if charged < before:
            return (
                f"refused budget δ={wanted.delta:g} (up from {current.delta:g}): what is charged (ε="
                f"{ledger.round_up(before):g} at δ={current.delta:g}) would show as ε={ledger.round_up(charged):g}, "
                f"freeing records that were spent; {kept}. δ may only be lowered once anything is charged"
            )
    return None


_HISTORY: dict[Reason, Any] = {
    Reason.BUDGET_RAISED: "Raised",
    Reason.BUDGET_LOWERED: "Lowered",
    Reason.BUDGET_DELTA_CHANGED: "DeltaChanged",
}


def _budget_reason(current: PrivacyBudget, wanted: PrivacyBudget) -> tuple[Reason, str]:
    text = f"budget ε {current.epsilon:g} → {wanted.epsilon:g}, δ {current.delta:g} → {wanted.delta:g}"
    if wanted.epsilon > current.epsilon:
        return Reason.BUDGET_RAISED, text
    if wanted.epsilon < current.epsilon:
        return Reason.BUDGET_LOWERED, text
    return Reason.BUDGET_DELTA_CHANGED, text


def _set_ready(ctx: OperatorContext, metadata: dict[str, Any], *, ready: bool, reason: Reason, message: str) -> None:
    """Set the Ready condition (the rest of the status is the ledger's copy)."""

    def attempt() -> None:
        current = ctx.kube.get_dataset(metadata["namespace"], metadata["name"])
        if current is None:
            return
        raw_status = current.get("status") or {}
        try:
            status = PrivateDatasetStatus.model_validate(raw_status)
        except ValidationError:
            status = PrivateDatasetStatus()
        conditions = set_condition(
            status.conditions,
            type=ConditionType.READY,
            status=ready,
            reason=reason,
            message=message,
            generation=current["metadata"].get("generation"),
        )
        wanted = {
            **raw_status,
            "conditions": [condition.to_wire() for condition in conditions],
            "observedGeneration": current["metadata"].get("generation"),
        }
        if wanted != raw_status:
            ctx.kube.replace_dataset_status({**current, "status": wanted})

    admission.retry_on_conflict(attempt, what="writing a PrivateDataset condition", retries=10)


def release_dataset(body: dict[str, Any], ctx: OperatorContext) -> list[Event]:
    """On deletion: wait for the jobs still reserved on the ledger, then unbind it (its charges stay)."""
    metadata = body["metadata"]
    try:
        dataset = PrivateDataset.model_validate(body)
    except ValidationError:
        return []
    name = ledger_name(source_identity(metadata["namespace"], dataset.spec.source))
    raw = ctx.kube.get_ledger(name)
    ctx.metrics.forget_dataset(metadata["namespace"], metadata["name"])
    if raw is None:
        return []
    status = admission.parse_status(raw)
    if status.dataset is None or status.dataset.uid != metadata["uid"]:
        return []
    running = [entry.job_name for entry in status.entries if entry.state == "Reserved"]
    if running:
        raise kopf.TemporaryError(f"waiting for jobs still running on it: {', '.join(running)}", delay=5)
    admission.write_ledger(ctx, name, lambda s: s.model_copy(update={"dataset": None}))
    spent = status.epsilon_spent or 0.0
    return [
        Event(
            "Normal",
            Reason.DATASET_DELETED,
            f"PrivateDataset deleted; its ledger {name} keeps every charge (ε spent {spent:g}): a new PrivateDataset "
            "over the same records continues it",
        )
    ]


__all__ = ["ConflictError", "reconcile_dataset", "release_dataset"]
