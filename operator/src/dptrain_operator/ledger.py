"""The privacy ledger of a PrivateDataset, as pure functions over its status.

Each job is one entry: a Poisson-subsampled Gaussian mechanism (σ, q, steps). The dataset's ε is
the TIGHT composition of all entries with PLD (dp_accounting), not a sum of per-job ε. An entry is
Reserved while the job may run (charged at its full plan) and Committed once final (charged at
what the trainer's privacy journal proves ran; unknown = the full reservation stays charged).
Writing the result back happens elsewhere, under a resourceVersion precondition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dptrain_accounting import MechanismSegment, compute_epsilon
from dptrain_api import LedgerEntry, PrivacyBudget, PrivateDatasetStatus

LEDGER_ACCOUNTANT = "pld"
_DIGITS = 1e6


def round_up(epsilon: float) -> float:
    """Displayed ε is rounded up (6 decimals): a shown value must never under-state what was spent."""
    return math.ceil(epsilon * _DIGITS) / _DIGITS


def round_down(epsilon: float) -> float:
    return math.floor(epsilon * _DIGITS) / _DIGITS


@dataclass(frozen=True)
class LedgerTotals:
    spent: float
    """ε of committed entries."""
    reserved: float
    """ε of all entries minus spent."""
    remaining: float
    """budget minus ε of all entries."""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    epsilon_after: float
    """ε of the ledger with this job's reservation added."""
    remaining_before: float


def _segments(entries: Sequence[LedgerEntry]) -> list[MechanismSegment]:
    return [
        MechanismSegment(entry.noise_multiplier, entry.sample_rate, entry.steps) for entry in entries if entry.steps
    ]


def composed_epsilon(entries: Sequence[LedgerEntry], delta: float) -> float:
    return compute_epsilon(_segments(entries), delta=delta, accountant=LEDGER_ACCOUNTANT)


def totals(entries: Sequence[LedgerEntry], budget: PrivacyBudget) -> LedgerTotals:
    everything = composed_epsilon(entries, budget.delta)
    spent = composed_epsilon([entry for entry in entries if entry.state == "Committed"], budget.delta)
    return LedgerTotals(spent=spent, reserved=max(everything - spent, 0.0), remaining=budget.epsilon - everything)


def find_entry(status: PrivateDatasetStatus | None, job_uid: str) -> LedgerEntry | None:
    if status is None:
        return None
    return next((entry for entry in status.ledger if entry.job_uid == job_uid), None)


def admit(entries: Sequence[LedgerEntry], budget: PrivacyBudget, mechanism: MechanismSegment) -> Admission:
    """Would reserving `mechanism` keep the composed ε within the budget?"""
    before = composed_epsilon(entries, budget.delta)
    after = compute_epsilon(
        [*_segments(entries), mechanism] if mechanism.steps else _segments(entries),
        delta=budget.delta,
        accountant=LEDGER_ACCOUNTANT,
    )
    return Admission(admitted=after <= budget.epsilon, epsilon_after=after, remaining_before=budget.epsilon - before)


def _with_totals(
    status: PrivateDatasetStatus, entries: list[LedgerEntry], budget: PrivacyBudget
) -> PrivateDatasetStatus:
    summary = totals(entries, budget)
    return status.model_copy(
        update={
            "ledger": entries,
            "epsilon_spent": round_up(summary.spent),
            "epsilon_reserved": round_up(summary.reserved),
            "epsilon_remaining": round_down(summary.remaining),
        }
    )


def recompute(status: PrivateDatasetStatus | None, budget: PrivacyBudget) -> PrivateDatasetStatus:
    """The status with totals recomputed from the ledger (after a budget change, say)."""
    status = status or PrivateDatasetStatus()
    return _with_totals(status, list(status.ledger), budget)


def reserve(
    status: PrivateDatasetStatus | None,
    budget: PrivacyBudget,
    *,
    job_name: str,
    job_uid: str,
    mechanism: MechanismSegment,
    now: datetime | None = None,
) -> PrivateDatasetStatus:
    """The status with a Reserved entry for the job (idempotent: an existing entry is kept as is)."""
    status = status or PrivateDatasetStatus()
    if find_entry(status, job_uid) is not None:
        return status
    entry = LedgerEntry(
        job_name=job_name,
        job_uid=job_uid,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=mechanism.steps,
        state="Reserved",
        epsilon=round_up(compute_epsilon([mechanism], delta=budget.delta, accountant=LEDGER_ACCOUNTANT)),
        time=now or datetime.now(UTC),
    )
    return _with_totals(status, [*status.ledger, entry], budget)


def commit(
    status: PrivateDatasetStatus,
    budget: PrivacyBudget,
    *,
    job_uid: str,
    steps_ran: int | None,
    now: datetime | None = None,
) -> PrivateDatasetStatus:
    """Make the job's entry final. `steps_ran` is what the privacy journal proves was charged; None
    (unknown, e.g. the last pod was killed before it could report) keeps the whole reservation."""
    entries = []
    for entry in status.ledger:
        if entry.job_uid != job_uid or entry.state != "Reserved":
            entries.append(entry)
            continue
        # The journal is the truth, even above the reservation (the trainer caps itself there, so
        # that would be a bug elsewhere; charging less than ran is never acceptable).
        steps = entry.steps if steps_ran is None else max(steps_ran, 0)
        segment = MechanismSegment(entry.noise_multiplier, entry.sample_rate, steps)
        epsilon = compute_epsilon([segment], delta=budget.delta, accountant=LEDGER_ACCOUNTANT) if steps else 0.0
        update = {"steps": steps, "state": "Committed", "epsilon": round_up(epsilon), "time": now or datetime.now(UTC)}
        entries.append(entry.model_copy(update=update))
    return _with_totals(status, entries, budget)
