"""Ledger maths: tight PLD composition of heterogeneous jobs, admission, reservation and commit."""

from __future__ import annotations

from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from dptrain_accounting import PLD_DISCRETIZATION, MechanismSegment, compute_epsilon
from dptrain_api import PrivacyBudget, PrivateDatasetStatus
from dptrain_operator import ledger

BUDGET = PrivacyBudget(epsilon=4.0, delta=1e-5)
JOB_A = MechanismSegment(1.5, 0.02, 200)  # ε ≈ 0.86 alone
JOB_B = MechanismSegment(1.2, 0.1, 30)  # ε ≈ 2.96 alone; together ≈ 3.08 (tight), not 3.82 (summed)


def _direct_pld(segments: list[MechanismSegment], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    events = [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(s.sample_rate, dp_event.GaussianDpEvent(s.noise_multiplier)), s.steps
        )
        for s in segments
    ]
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _reserve_both() -> PrivateDatasetStatus:
    status = ledger.reserve(None, BUDGET, job_name="a", job_uid="uid-a", mechanism=JOB_A)
    return ledger.reserve(status, BUDGET, job_name="b", job_uid="uid-b", mechanism=JOB_B)


def test_composition_is_tight_pld_not_a_sum() -> None:
    status = _reserve_both()
    composed = ledger.composed_epsilon(status.ledger, BUDGET.delta)
    assert composed == pytest.approx(_direct_pld([JOB_A, JOB_B], BUDGET.delta), rel=1e-9)
    separate = sum(compute_epsilon([job], delta=BUDGET.delta) for job in (JOB_A, JOB_B))
    assert composed < separate  # composing tightly beats adding ε
    assert status.epsilon_reserved is not None
    assert status.epsilon_reserved >= composed
    assert status.epsilon_spent == 0.0
    assert status.epsilon_remaining == pytest.approx(BUDGET.epsilon - composed, abs=2e-6)
    assert status.epsilon_remaining is not None
    assert status.epsilon_remaining <= BUDGET.epsilon - composed


def test_admission_refuses_what_would_exceed_the_budget() -> None:
    status = _reserve_both()
    big = MechanismSegment(0.6, 0.3, 500)
    refused = ledger.admit(status.ledger, BUDGET, big)
    assert not refused.admitted
    assert refused.epsilon_after > BUDGET.epsilon
    small = MechanismSegment(20.0, 0.01, 10)
    accepted = ledger.admit(status.ledger, BUDGET, small)
    assert accepted.admitted
    assert accepted.epsilon_after == pytest.approx(_direct_pld([JOB_A, JOB_B, small], BUDGET.delta), rel=1e-9)


def test_reserve_is_idempotent() -> None:
    status = _reserve_both()
    again = ledger.reserve(status, BUDGET, job_name="a", job_uid="uid-a", mechanism=JOB_A)
    assert again == status
    assert len(again.ledger) == 2


def test_commit_charges_what_the_journal_proves() -> None:
    status = ledger.commit(_reserve_both(), BUDGET, job_uid="uid-a", steps_ran=120)
    entry = ledger.find_entry(status, "uid-a")
    assert entry is not None
    assert entry.state == "Committed"
    assert entry.steps == 120
    expected_spent = compute_epsilon(
        [MechanismSegment(JOB_A.noise_multiplier, JOB_A.sample_rate, 120)], delta=BUDGET.delta
    )
    assert status.epsilon_spent == pytest.approx(expected_spent, abs=2e-6)
    assert status.epsilon_spent is not None
    assert status.epsilon_spent >= expected_spent  # shown values round up, never down


def test_unknown_progress_keeps_the_whole_reservation() -> None:
    status = ledger.commit(_reserve_both(), BUDGET, job_uid="uid-b", steps_ran=None)
    entry = ledger.find_entry(status, "uid-b")
    assert entry is not None
    assert (entry.state, entry.steps) == ("Committed", JOB_B.steps)


def test_commit_never_charges_less_than_the_journal() -> None:
    status = ledger.commit(_reserve_both(), BUDGET, job_uid="uid-b", steps_ran=JOB_B.steps + 5)
    entry = ledger.find_entry(status, "uid-b")
    assert entry is not None
    assert entry.steps == JOB_B.steps + 5


def test_commit_is_final() -> None:
    once = ledger.commit(_reserve_both(), BUDGET, job_uid="uid-a", steps_ran=10)
    twice = ledger.commit(once, BUDGET, job_uid="uid-a", steps_ran=0)
    assert ledger.find_entry(twice, "uid-a") == ledger.find_entry(once, "uid-a")


def test_recompute_after_budget_change() -> None:
    status = _reserve_both()
    bigger = PrivacyBudget(epsilon=10.0, delta=1e-5)
    recomputed = ledger.recompute(status, bigger)
    assert recomputed.epsilon_remaining is not None
    assert status.epsilon_remaining is not None
    assert recomputed.epsilon_remaining == pytest.approx(status.epsilon_remaining + 6.0, abs=2e-6)


def test_ledger_charge_equals_the_trainers_journal_epsilon(tmp_path: Path) -> None:
    """The same mechanism costs the same ε in the operator's ledger and in the trainer's journal."""
    from dptrain.journal import PrivacyJournal  # the trainer, imported by the test only

    journal = PrivacyJournal(tmp_path / "journal.jsonl")
    sigma, q = JOB_A.noise_multiplier, JOB_A.sample_rate
    journal.initialise(job_hash="h", noise_multiplier=sigma, sample_rate=q, max_steps=200)
    for start in range(0, 200, 50):
        journal.append_intent(MechanismSegment(sigma, q, 50), attempt=1, start_step=start)
    reserved = ledger.reserve(None, BUDGET, job_name="a", job_uid="uid-a", mechanism=JOB_A)
    committed = ledger.commit(reserved, BUDGET, job_uid="uid-a", steps_ran=journal.charged_steps)
    trainer_epsilon = journal.epsilon(BUDGET.delta, "pld")
    assert committed.epsilon_spent == ledger.round_up(trainer_epsilon)
    assert ledger.composed_epsilon(committed.ledger, BUDGET.delta) == pytest.approx(trainer_epsilon, rel=1e-12)
