"""The status of an object being reconciled (a DPTrainingJob, a DPFederatedJob, a DPFederatedSite): a typed model,
changed in memory, written once, with the events to post."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from dptrain_api import Condition, ConditionType, DPTrainingJobStatus, JobPhase, Reason
from dptrain_operator.conditions import now, set_condition

# Phases every kind shares (JobPhase and FederationPhase are StrEnums with these values).
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
FINISHED = (SUCCEEDED, FAILED)


@dataclass(frozen=True)
class Event:
    type: str
    """Normal or Warning."""
    reason: Reason
    message: str


class _Status(Protocol):
    phase: Any
    conditions: list[Condition]
    completion_time: datetime | None

    def model_dump(self, *, mode: str, by_alias: bool, exclude_none: bool) -> dict[str, Any]: ...


S = TypeVar("S", bound=_Status)
P = TypeVar("P", bound=StrEnum)
M = TypeVar("M", bound=BaseModel)


@dataclass
class ObjectState(Generic[S, P]):
    """The object as read, and its status as it will be written back (one merge patch per reconciliation)."""

    body: dict[str, Any]
    status: S
    phases: type[P]
    """The kind's phase enum (JobPhase, FederationPhase)."""
    events: list[Event] = field(default_factory=list)

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
    def phase(self) -> P | None:
        phase: P | None = self.status.phase
        return phase

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def wire(self) -> dict[str, Any]:
        """The status as the API server stores it (camelCase, unset fields left out)."""
        return self.status.model_dump(mode="json", by_alias=True, exclude_none=True)

    def changed(self) -> bool:
        return self.wire() != (self.body.get("status") or {})

    def condition(self, type: ConditionType, status: bool, reason: Reason, message: str) -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type=type,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
        )

    def event(self, reason: Reason, message: str, *, warning: bool = False) -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def transition(self, phase: str, reason: Reason, message: str) -> None:
        """Move to ``phase`` (one of the kind's), with an event when it is a change."""
        if self.phase != phase:
            self.event(reason, message, warning=phase == FAILED)
        self.status.phase = self.phases(phase)

    def fail(self, reason: Reason, message: str) -> None:
        self.transition(FAILED, reason, message)
        self.condition(ConditionType.FAILED, True, reason, message)
        self.condition(ConditionType.RUNNING, False, reason, message)
        self._completed()

    def succeed(self, message: str) -> None:
        self.transition(SUCCEEDED, Reason.SUCCEEDED, message)
        self.condition(ConditionType.SUCCEEDED, True, Reason.SUCCEEDED, message)
        self.condition(ConditionType.RUNNING, False, Reason.SUCCEEDED, message)
        self._completed()

    def _completed(self) -> None:
        if self.status.completion_time is None:
            self.status.completion_time = now()


def parse_status(body: dict[str, Any], model: type[M]) -> M:
    """``body``'s status as ``model``; a status that no longer parses (pruned by hand, say) starts afresh."""
    try:
        return model.model_validate(body.get("status") or {})
    except ValidationError:
        return model()


JobState = ObjectState[DPTrainingJobStatus, JobPhase]


def read_job_state(body: dict[str, Any]) -> JobState:
    return ObjectState(body, parse_status(body, DPTrainingJobStatus), JobPhase)
