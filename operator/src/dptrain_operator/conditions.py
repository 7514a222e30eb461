"""Standard Kubernetes conditions (metav1.Condition shape), as pure functions over the status models."""

from __future__ import annotations

from datetime import UTC, datetime

from dptrain_api import Condition, ConditionStatus, ConditionType, Reason


def now() -> datetime:
    """The current time in UTC, to the second (Kubernetes timestamps have no fractions)."""
    return datetime.now(UTC).replace(microsecond=0)


def set_condition(
    conditions: list[Condition],
    *,
    type: ConditionType,
    status: bool,
    reason: Reason,
    message: str,
    generation: int | None,
) -> list[Condition]:
    """The list with ``type`` set; lastTransitionTime changes only when the status does."""
    value = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    result = []
    found = False
    for existing in conditions:
        condition = existing
        if condition.type == type:
            found = True
            condition = existing.model_copy(
                update={
                    "status": value,
                    "reason": reason.value,
                    "message": message,
                    "last_transition_time": condition.last_transition_time if condition.status == value else now(),
                    "observed_generation": generation if generation is not None else condition.observed_generation,
                }
            )
        result.append(condition)
    if not found:
        result.append(
            Condition(
                type=type.value,
                status=value,
                reason=reason.value,
                message=message,
                last_transition_time=now(),
                observed_generation=generation,
            )
        )
    return result


def get_condition(conditions: list[Condition], type: ConditionType) -> Condition | None:
    return next((condition for condition in conditions if condition.type == type), None)
