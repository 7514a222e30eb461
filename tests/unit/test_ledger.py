"""Ledger maths: tight PLD composition of heterogeneous jobs within a partition, the training partition and the
holdout in parallel, admission, commit, and the same ε as the trainer's journal."""

from __future__ import annotations

from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from dptrain_accounting import PLD_DISCRETIZATION, PLD_SAFETY_MARGIN, MechanismSegment, compute_epsilon
from dptrain_api import LedgerEntry, PrivacyBudget, PrivacyLedgerStatus
from dptrain_operator import ledger

BUDGET = PrivacyBudget(epsilon=4.0, delta=1e-5)
JOB_A = MechanismSegment(1.5, 0.02, 200)  # ε ≈ 0.86 alone
JOB_B = MechanismSegment(1.2, 0.1, 30)  # ε ≈ 2.96 alone; together ≈ 3.08 (tight), not 3.82 (summed)
RELEASES = MechanismSegment(3.0, 1.0, 4)  # held-out metric releases (Gaussian mechanisms)


def _direct_pld(segments: list[MechanismSegment], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    events = [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(s.sample_rate, dp_event.GaussianDpEvent(s.noise_multiplier)), s.steps
        )
        for s in segments
    ]
    accountant.compose(dp_event.ComposedDpEvent(events))
    raw = float(accountant.get_epsilon(delta))
    return raw + PLD_SAFETY_MARGIN[0] + PLD_SAFETY_MARGIN[1] * raw


def _entry(uid: str, train: MechanismSegment, holdout: MechanismSegment | None = None) -> LedgerEntry:
    return LedgerEntry(
        job_name=uid,
        job_uid=uid,
        state="Reserved",
        train=ledger.mechanism(train),
        holdout=ledger.mechanism(holdout) if holdout is not None else None,
    )


def _add(status: PrivacyLedgerStatus, entry: LedgerEntry) -> PrivacyLedgerStatus:
    """Add an entry as a ledger write does: then recompute the totals."""
    return ledger.with_totals(ledger.add_entry(status, entry))


def _reserve_both() -> PrivacyLedgerStatus:
    status = PrivacyLedgerStatus(budget=BUDGET, holdout_fraction=0.2)
    status = _add(status, _entry("uid-a", JOB_A))
    return _add(status, _entry("uid-b", JOB_B))


def test_composition_is_tight_pld_not_a_sum() -> None:
    status = _reserve_both()
    composed = ledger.composed_epsilon(status.entries, BUDGET.delta)
    assert composed == pytest.approx(_direct_pld([JOB_A, JOB_B], BUDGET.delta), rel=1e-9)
    separate = sum(compute_epsilon([job], delta=BUDGET.delta) for job in (JOB_A, JOB_B))
    assert composed < separate  # composing tightly beats adding ε
    assert status.epsilon_reserved is not None
    assert status.epsilon_reserved >= composed
    assert status.epsilon_spent == 0.0
    assert status.epsilon_remaining == pytest.approx(BUDGET.epsilon - composed, abs=2e-6)
    assert status.epsilon_remaining is not None
    assert status.epsilon_remaining <= BUDGET.epsilon - composed


def test_the_holdout_composes_in_parallel_with_training() -> None:
    """A record is held out or trained on, never both: the ledger's ε is the larger partition's, not their sum."""
    status = _add(PrivacyLedgerStatus(budget=BUDGET), _entry("uid-a", JOB_A, RELEASES))
    status = _add(status, _entry("uid-b", JOB_B, RELEASES))
    train = _direct_pld([JOB_A, JOB_B], BUDGET.delta)
    holdout = _direct_pld([RELEASES, RELEASES], BUDGET.delta)
    assert ledger.composed_epsilon(status.entries, BUDGET.delta) == pytest.approx(max(train, holdout), rel=1e-9)
    assert ledger.composed_epsilon(status.entries, BUDGET.delta) < train + holdout


def test_admission_refuses_what_would_exceed_the_budget() -> None:
    status = _reserve_both()
    big = MechanismSegment(0.6, 0.3, 500)
    refused = ledger.admit(status.entries, BUDGET, big, None)
    assert not refused.admitted
    assert refused.epsilon_after > BUDGET.epsilon
    small = MechanismSegment(20.0, 0.01, 10)
    accepted = ledger.admit(status.entries, BUDGET, small, RELEASES)
    assert accepted.admitted
    assert accepted.epsilon_after == pytest.approx(_direct_pld([JOB_A, JOB_B, small], BUDGET.delta), rel=1e-9)
    greedy_holdout = MechanismSegment(0.5, 1.0, 50)
    assert not ledger.admit(status.entries, BUDGET, small, greedy_holdout).admitted  # the holdout counts too


def test_without_a_budget_everything_is_admitted_and_nothing_is_totalled() -> None:
    status = _add(PrivacyLedgerStatus(), _entry("uid-a", JOB_A))
    assert ledger.admit(status.entries, None, MechanismSegment(0.5, 0.5, 10000), None).admitted
    assert (status.epsilon_spent, status.epsilon_remaining) == (None, None)


def test_an_entry_is_added_once() -> None:
    status = _reserve_both()
    again = _add(status, _entry("uid-a", JOB_A))
    assert again == status
    assert len(again.entries) == 2


def test_refused_entries_charge_nothing() -> None:
    status = _add(_reserve_both(), _entry("uid-c", JOB_B).model_copy(update={"state": "Refused"}))
    assert ledger.composed_epsilon(status.entries, BUDGET.delta) == ledger.composed_epsilon(
        _reserve_both().entries, BUDGET.delta
    )


def _commit(status: PrivacyLedgerStatus, uid: str, steps: int | None, releases: int | None = 0) -> PrivacyLedgerStatus:
    return ledger.with_totals(ledger.commit(status, uid, steps=steps, releases=releases, outcome="Succeeded"))


def test_commit_charges_what_the_journal_proves() -> None:
    status = _commit(_reserve_both(), "uid-a", 120)
    entry = ledger.find_entry(status, "uid-a")
    assert entry is not None
    assert entry.train is not None
    assert (entry.state, entry.train.steps, entry.outcome) == ("Committed", 120, "Succeeded")
    expected_spent = compute_epsilon(
        [MechanismSegment(JOB_A.noise_multiplier, JOB_A.sample_rate, 120)], delta=BUDGET.delta
    )
    assert status.epsilon_spent == pytest.approx(expected_spent, abs=2e-6)
    assert status.epsilon_spent is not None
    assert status.epsilon_spent >= expected_spent  # shown values round up, never down


def test_unknown_progress_keeps_the_whole_reservation() -> None:
    status = _add(_reserve_both(), _entry("uid-c", JOB_A, RELEASES))
    status = _commit(status, "uid-c", None, None)
    entry = ledger.find_entry(status, "uid-c")
    assert entry is not None
    assert entry.train is not None
    assert entry.holdout is not None
    assert (entry.state, entry.train.steps, entry.holdout.steps) == ("Committed", JOB_A.steps, RELEASES.steps)


def test_commit_never_charges_less_than_the_journal_or_the_operator_saw() -> None:
    status = _commit(_reserve_both(), "uid-b", JOB_B.steps + 5)
    entry = ledger.find_entry(status, "uid-b")
    assert entry is not None
    assert entry.train is not None
    assert entry.train.steps == JOB_B.steps + 5  # the journal is the truth, even above the reservation
    seen = ledger.update_entry(_reserve_both(), "uid-a", lambda e: e.model_copy(update={"observed_steps": 90}))
    entry = ledger.find_entry(_commit(seen, "uid-a", 40), "uid-a")
    assert entry is not None
    assert entry.train is not None
    assert entry.train.steps == 90  # a fresh journal that forgot earlier charges cannot lower the commit


def test_commit_is_final() -> None:
    once = _commit(_reserve_both(), "uid-a", 10)
    twice = _commit(once, "uid-a", 0)
    assert ledger.find_entry(twice, "uid-a") == ledger.find_entry(once, "uid-a")


def test_totals_follow_a_budget_change() -> None:
    status = _reserve_both()
    recomputed = ledger.with_totals(status.model_copy(update={"budget": PrivacyBudget(epsilon=10.0, delta=1e-5)}))
    assert recomputed.epsilon_remaining is not None
    assert status.epsilon_remaining is not None
    assert recomputed.epsilon_remaining == pytest.approx(status.epsilon_remaining + 6.0, abs=2e-6)


def test_ledger_charge_equals_the_trainers_journal_epsilon(tmp_path: Path) -> None:
    """The same mechanisms cost the same ε in the operator's ledger and in the trainer's journal."""
    from dptrain.journal import HOLDOUT, PrivacyJournal  # the trainer, imported by the test only

    journal = PrivacyJournal(tmp_path / "journal.jsonl")
    journal.initialise(job_hash="h", mechanisms={"train": JOB_A, "holdout": RELEASES})
    for start in range(0, 200, 50):
        journal.append_intent(50, attempt=1, start_step=start)
        journal.append_intent(1, attempt=1, start_step=start + 50, partition=HOLDOUT)
    status = _add(PrivacyLedgerStatus(budget=BUDGET), _entry("uid-a", JOB_A, RELEASES))
    committed = _commit(status, "uid-a", journal.charged_steps, journal.charged_releases)
    trainer_epsilon = journal.epsilon(BUDGET.delta, "pld")
    assert committed.epsilon_spent == ledger.round_up(trainer_epsilon)
    assert ledger.composed_epsilon(committed.entries, BUDGET.delta) == pytest.approx(trainer_epsilon, rel=1e-12)
