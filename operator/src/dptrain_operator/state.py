"""The status of a DPTrainingJob being reconciled: a typed model, changed in memory, written once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dptrain_api import ConditionType, DPTrainingJobStatus, JobPhase, Reason
from dptrain_operator.conditions import now, set_condition

FINISHED = (JobPhase.SUCCEEDED, JobPhase.FAILED)


@dataclass(frozen=True)
class Event:
    type: str
    """Normal or Warning."""
    reason: Reason
    message: str


@dataclass
class JobState:
    """The job as read, and its status as it will be written back (one merge patch per reconciliation)."""

    body: dict[str, Any]
    status: DPTrainingJobStatus
    events: list[Event] = field(default_factory=list)

    @classmethod
    def read(cls, body: dict[str, Any]) -> JobState:
        """The state of ``body``; a status that no longer parses (pruned by hand, say) starts afresh."""
        try:
            status = DPTrainingJobStatus.model_validate(body.get("status") or {})
        except ValidationError:
            status = DPTrainingJobStatus()
        return cls(body=body, status=status)

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
    def phase(self) -> JobPhase | None:
        return self.status.phase

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

    def transition(self, phase: JobPhase, reason: Reason, message: str) -> None:
        if self.phase != phase:
            self.event(reason, message, warning=phase == JobPhase.FAILED)
        self.status.phase = phase

    def fail(self, reason: Reason, message: str) -> None:
        self.transition(JobPhase.FAILED, reason, message)
        self.condition(ConditionType.FAILED, True, reason, message)
        self.condition(ConditionType.RUNNING, False, reason, message)
        if self.status.completion_time is None:
            self.status.completion_time = now()

    def succeed(self, message: str) -> None:
        self.transition(JobPhase.SUCCEEDED, Reason.SUCCEEDED, message)
        self.condition(ConditionType.SUCCEEDED, True, Reason.SUCCEEDED, message)
        self.condition(ConditionType.RUNNING, False, Reason.SUCCEEDED, message)
        self.status.completion_time = now()
