"""The privacy ledger of a dataset, as pure functions over a :class:`PrivacyLedgerStatus`.

Each job is one entry with two mechanisms: its DP-SGD steps (the training partition) and its releases of
held-out metrics (the holdout). The dataset's ε composes every entry TIGHTLY (PLD, dp_accounting) within each
partition, and the two partitions in parallel (a record is in one of them only): max(ε_train, ε_holdout).
An entry is Reserved while the job may run (charged at its full plan), Committed once final (charged at what
the trainer's privacy journal proves ran, never below what the operator saw charged; unknown = the whole
reservation stays charged), or Refused (charged nothing). Writing the result back happens elsewhere, under a
resourceVersion precondition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dptrain_accounting import MechanismSegment, partitioned_epsilon
from dptrain_api import LedgerEntry, Mechanism, PrivacyBudget, PrivacyLedgerStatus

LEDGER_ACCOUNTANT = "pld"
_DIGITS = 1e6


def round_up(epsilon: float) -> float:
    """Displayed ε is rounded up (6 decimals): a shown value must never under-state what was spent."""
    return math.ceil(epsilon * _DIGITS) / _DIGITS


def round_down(epsilon: float) -> float:
    return math.floor(epsilon * _DIGITS) / _DIGITS


def segment(mechanism: Mechanism | None) -> MechanismSegment | None:
    if mechanism is None or mechanism.steps == 0:
        return None
    return MechanismSegment(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)


def mechanism(segment: MechanismSegment) -> Mechanism:
    return Mechanism(noise_multiplier=segment.noise_multiplier, sample_rate=segment.sample_rate, steps=segment.steps)


@dataclass(frozen=True)
class LedgerTotals:
    spent: float
    """ε of committed entries."""
    reserved: float
    """ε of all entries minus spent."""
    remaining: float | None
    """budget minus ε of all entries (None without a budget)."""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    epsilon_after: float
    """ε of the ledger with this job's reservation added."""
    remaining_before: float


def charged_segments(entries: Sequence[LedgerEntry]) -> tuple[list[MechanismSegment], list[MechanismSegment]]:
    """(training, holdout) segments every non-refused entry charges now."""
    train = [s for s in (segment(e.train) for e in entries if e.state != "Refused") if s is not None]
    holdout = [s for s in (segment(e.holdout) for e in entries if e.state != "Refused") if s is not None]
    return train, holdout


def composed_epsilon(entries: Sequence[LedgerEntry], delta: float, *, epsilon_of: EpsilonOf | None = None) -> float:
    train, holdout = charged_segments(entries)
    return (epsilon_of or ledger_epsilon)(train, holdout, delta)


def totals(
    entries: Sequence[LedgerEntry], budget: PrivacyBudget | None, *, epsilon_of: EpsilonOf | None = None
) -> LedgerTotals:
    if budget is None:
        return LedgerTotals(spent=0.0, reserved=0.0, remaining=None)
    everything = composed_epsilon(entries, budget.delta, epsilon_of=epsilon_of)
    committed = [entry for entry in entries if entry.state == "Committed"]
    spent = composed_epsilon(committed, budget.delta, epsilon_of=epsilon_of)
    return LedgerTotals(spent=spent, reserved=max(everything - spent, 0.0), remaining=budget.epsilon - everything)


def find_entry(status: PrivacyLedgerStatus | None, job_uid: str) -> LedgerEntry | None:
    if status is None:
        return None
    return next((entry for entry in status.entries if entry.job_uid == job_uid), None)


EpsilonOf = Callable[[Sequence[MechanismSegment], Sequence[MechanismSegment], float], float]
"""(training segments, holdout segments, δ) → composed ε; the operator passes a cached one run in a worker."""


def ledger_epsilon(train: Sequence[MechanismSegment], holdout: Sequence[MechanismSegment], delta: float) -> float:
    return partitioned_epsilon(train, holdout, delta=delta, accountant=LEDGER_ACCOUNTANT)


def admit(
    entries: Sequence[LedgerEntry],
    budget: PrivacyBudget | None,
    train: MechanismSegment,
    holdout: MechanismSegment | None,
    *,
    epsilon_of: EpsilonOf = ledger_epsilon,
) -> Admission:
    """Would reserving (train, holdout) keep the composed ε within the budget? (Always, without a budget.)"""
    if budget is None:
        return Admission(admitted=True, epsilon_after=0.0, remaining_before=math.inf)
    charged_train, charged_holdout = charged_segments(entries)
    before = epsilon_of(charged_train, charged_holdout, budget.delta)
    after = epsilon_of([*charged_train, train], [*charged_holdout, *([holdout] if holdout else [])], budget.delta)
    return Admission(admitted=after <= budget.epsilon, epsilon_after=after, remaining_before=budget.epsilon - before)


def with_totals(status: PrivacyLedgerStatus, *, epsilon_of: EpsilonOf | None = None) -> PrivacyLedgerStatus:
    """The status with the totals, and each entry's own ε at the budget's δ (for reading), recomputed."""
    summary = totals(status.entries, status.budget, epsilon_of=epsilon_of)
    entries = status.entries
    if status.budget is not None:
        delta = status.budget.delta
        entries = [
            entry.model_copy(update={"epsilon": round_up(composed_epsilon([entry], delta, epsilon_of=epsilon_of))})
            if entry.state != "Refused"
            else entry.model_copy(update={"epsilon": 0.0})
            for entry in entries
        ]
    return status.model_copy(
        update={
            "entries": entries,
            "epsilon_spent": round_up(summary.spent) if status.budget else None,
            "epsilon_reserved": round_up(summary.reserved) if status.budget else None,
            "epsilon_remaining": round_down(summary.remaining) if summary.remaining is not None else None,
        }
    )


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC).replace(microsecond=0)


def add_entry(status: PrivacyLedgerStatus, entry: LedgerEntry, *, now: datetime | None = None) -> PrivacyLedgerStatus:
    """The status with ``entry`` (a new job's Reserved or Refused entry) appended; idempotent per job UID.
    (Totals are recomputed by :func:`with_totals`, as every ledger write does.)"""
    if find_entry(status, entry.job_uid) is not None:
        return status
    entry = entry.model_copy(update={"time": _now(now)})
    return status.model_copy(update={"entries": [*status.entries, entry]})


def update_entry(
    status: PrivacyLedgerStatus,
    job_uid: str,
    change: Callable[[LedgerEntry], LedgerEntry],
    *,
    now: datetime | None = None,
) -> PrivacyLedgerStatus:
    """The status with the job's entry replaced by ``change(entry)``."""

    def replaced(entry: LedgerEntry) -> LedgerEntry:
        changed = change(entry)
        return entry if changed == entry else changed.model_copy(update={"time": _now(now)})

    entries = [replaced(entry) if entry.job_uid == job_uid else entry for entry in status.entries]
    return status.model_copy(update={"entries": entries})


def commit(
    status: PrivacyLedgerStatus,
    job_uid: str,
    *,
    steps: int | None,
    releases: int | None,
    outcome: str,
    message: str = "",
    now: datetime | None = None,
) -> PrivacyLedgerStatus:
    """Make the job's entry final. ``steps``/``releases``: what the privacy journal proves was charged; None
    (unknown, e.g. the last pod was killed before it could report) keeps the whole reservation. The commit is
    never below what the operator observed charged."""

    def final(entry: LedgerEntry) -> LedgerEntry:
        if entry.state != "Reserved":
            return entry
        return entry.model_copy(
            update={
                "state": "Committed",
                "train": _charged(entry.train, steps, entry.observed_steps),
                "holdout": _charged(entry.holdout, releases, entry.observed_releases),
                "outcome": outcome,
                "message": message or entry.message,
            }
        )

    return update_entry(status, job_uid, final, now=now)


def _charged(reserved: Mechanism | None, proven: int | None, observed: int) -> Mechanism | None:
    if reserved is None:
        return None
    # The journal is the truth even above the reservation: the trainer caps itself there, so more would be a
    # bug elsewhere, and charging less than ran is never acceptable.
    steps = reserved.steps if proven is None else max(proven, observed)
    return reserved.model_copy(update={"steps": steps})
