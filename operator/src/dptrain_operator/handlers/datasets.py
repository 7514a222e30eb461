"""PrivateDataset: keep the ledger's totals (spent / reserved / remaining) true and exported."""

from __future__ import annotations

import contextlib
from typing import Any

from pydantic import ValidationError

from dptrain_api import ConditionType, PrivateDataset, PrivateDatasetStatus, Reason, describe_validation_error
from dptrain_operator import ledger
from dptrain_operator.conditions import set_condition
from dptrain_operator.context import OperatorContext
from dptrain_operator.kube import ConflictError


def reconcile_dataset(body: dict[str, Any], ctx: OperatorContext) -> None:
    """Recompute the totals from the ledger (a new dataset, or a changed budget). Conflicts mean a job
    handler wrote the ledger meanwhile; its write already carries fresh totals, so nothing is lost."""
    metadata = body["metadata"]
    try:
        dataset = PrivateDataset.model_validate(body)
    except ValidationError as error:
        # The CRD schema refuses nearly everything first; what it cannot see is reported here.
        try:
            previous = PrivateDatasetStatus.model_validate(body.get("status") or {})
        except ValidationError:
            previous = PrivateDatasetStatus()
        conditions = set_condition(
            previous.conditions,
            type=ConditionType.READY,
            status=False,
            reason=Reason.INVALID_SPEC,
            message="; ".join(describe_validation_error(error)),
            generation=metadata.get("generation"),
        )
        wired = [condition.to_wire() for condition in conditions]
        _write(body, {**(body.get("status") or {}), "conditions": wired}, ctx)
        return
    status = ledger.recompute(dataset.status, dataset.spec.budget)
    status.conditions = set_condition(
        status.conditions,
        type=ConditionType.READY,
        status=True,
        reason=Reason.BUDGET_TRACKED,
        message=f"ε remaining {status.epsilon_remaining:g} of {dataset.spec.budget.epsilon:g}",
        generation=metadata.get("generation"),
    )
    status.observed_generation = metadata.get("generation")
    wire = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    if wire != (body.get("status") or {}):
        _write(body, wire, ctx)
    ctx.metrics.observe_dataset(
        metadata["namespace"],
        metadata["name"],
        budget=dataset.spec.budget.epsilon,
        spent=status.epsilon_spent or 0.0,
        remaining=status.epsilon_remaining or 0.0,
    )


def _write(body: dict[str, Any], status: dict[str, Any], ctx: OperatorContext) -> None:
    with contextlib.suppress(ConflictError):
        ctx.kube.replace_dataset_status({**body, "status": status})


def forget_dataset(body: dict[str, Any], ctx: OperatorContext) -> None:
    ctx.metrics.forget_dataset(body["metadata"]["namespace"], body["metadata"]["name"])
