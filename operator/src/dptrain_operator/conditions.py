"""Standard Kubernetes conditions (metav1.Condition shape), as pure functions over plain dicts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]] | None,
    *,
    type: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """The list with `type` set; lastTransitionTime changes only when the status does."""
    value = "True" if status else "False"
    result = [dict(condition) for condition in conditions or []]
    for condition in result:
        if condition.get("type") == type:
            if condition.get("status") != value:
                condition["lastTransitionTime"] = now_iso()
            condition.update(status=value, reason=reason, message=message)
            if generation is not None:
                condition["observedGeneration"] = generation
            return result
    new: dict[str, Any] = {
        "type": type,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_iso(),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    result.append(new)
    return result


def get_condition(conditions: list[dict[str, Any]] | None, type: str) -> dict[str, Any] | None:
    return next((condition for condition in conditions or [] if condition.get("type") == type), None)
