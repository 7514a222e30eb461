"""The privacy plan: q, T and σ from public numbers; refusals before anything is charged."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dptrain.errors import ConfigurationError, PlanMismatchError
from dptrain.plan import TrainingPlan, make_plan, reserved_from_env
from dptrain_accounting import MechanismSegment, compute_epsilon
from dptrain_api import DPTrainingJob, Mechanism, PodEnv, PrivateDataset, ReservedMechanisms

BREAST_CANCER = 569  # public size of the built-in dataset


def _job(*, privacy: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> DPTrainingJob:
    return DPTrainingJob.model_validate(
        {
            "metadata": {"name": "plan-test"},
            "spec": {
                "dataset": {"builtin": "breast-cancer"},
                "model": {"architecture": "logistic"},
                "privacy": {"targetEpsilon": 3.0, "delta": 1e-5, **(privacy or {})},
                "training": {"epochs": 5, "batchSize": 64, **(training or {})},
            },
        }
    )


def test_calibrated_plan_meets_the_target() -> None:
    plan = make_plan(_job(), num_examples=BREAST_CANCER)
    assert plan.train_size == 456  # 569 minus floor(0.2 * 569) = 113 held out
    assert plan.eval_size == 113
    assert plan.sample_rate == 64 / 456
    assert plan.steps == math.ceil(5 / (64 / 456))
    assert plan.planned_epsilon <= 3.0
    assert plan.planned_epsilon > 2.9  # calibrated, not wastefully noisy
    train = compute_epsilon([MechanismSegment(plan.noise_multiplier, plan.sample_rate, plan.steps)], delta=1e-5)
    assert plan.holdout_segment is not None
    assert plan.holdout_segment.steps == plan.releases == 4  # the default evalReleases
    holdout = compute_epsilon([plan.holdout_segment], delta=1e-5)
    assert plan.planned_epsilon == max(train, holdout)  # the two partitions compose in parallel
    assert 2.9 < holdout <= 3.0  # the releases are calibrated to the target too
    assert plan.holdout_fraction == 0.2
    assert plan.accountant == "pld"
    assert plan.physical_batch_size == 64
    assert not plan.reserved


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_with_other_accountants_meets_the_target(accountant: str) -> None:
    plan = make_plan(_job(privacy={"accountant": accountant}), num_examples=BREAST_CANCER)
    assert plan.accountant == accountant
    assert plan.planned_epsilon <= 3.0
    segment = MechanismSegment(plan.noise_multiplier, plan.sample_rate, plan.steps)
    assert compute_epsilon([segment], delta=1e-5, accountant=accountant) <= 3.0


def test_fixed_noise_multiplier_is_used_or_refused() -> None:
    plan = make_plan(_job(privacy={"noiseMultiplier": 3.0}), num_examples=BREAST_CANCER)
    assert plan.noise_multiplier == 3.0
    assert plan.planned_epsilon <= 3.0
    with pytest.raises(ConfigurationError, match="above targetEpsilon"):
        make_plan(_job(privacy={"noiseMultiplier": 0.5}), num_examples=BREAST_CANCER)


def test_delta_must_be_below_one_over_the_training_set() -> None:
    with pytest.raises(ConfigurationError, match=r"1/456"):
        make_plan(_job(privacy={"delta": 0.01}), num_examples=BREAST_CANCER)


def test_batch_larger_than_the_training_set_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="batchSize"):
        make_plan(_job(training={"batchSize": 500}), num_examples=BREAST_CANCER)


def test_physical_batch_size_is_carried() -> None:
    plan = make_plan(
        _job(privacy={"noiseMultiplier": 3.0}, training={"maxPhysicalBatchSize": 16}), num_examples=BREAST_CANCER
    )
    assert plan.physical_batch_size == 16
    assert plan.batch_size == 64


def _reserved(sigma: float, rate: float, steps: int, holdout: tuple[float, int] | None = None) -> ReservedMechanisms:
    train = Mechanism(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    if holdout is None:
        return ReservedMechanisms(train=train)
    return ReservedMechanisms(
        train=train, holdout=Mechanism(noise_multiplier=holdout[0], sample_rate=1.0, steps=holdout[1])
    )


def test_reserved_mechanism_sets_sigma() -> None:
    reference = make_plan(_job(), num_examples=BREAST_CANCER)
    assert reference.holdout_noise_multiplier is not None
    holdout = (reference.holdout_noise_multiplier * 1.1, reference.releases)
    reserved = _reserved(reference.noise_multiplier * 1.2, 64 / 456, reference.steps + 10, holdout)
    plan = make_plan(_job(), num_examples=BREAST_CANCER, reserved=reserved)
    assert plan.reserved
    assert plan.noise_multiplier == reserved.train.noise_multiplier
    assert plan.holdout_noise_multiplier == holdout[0]
    assert plan.steps == reference.steps  # the job's plan, within the reservation
    assert plan.planned_epsilon < reference.planned_epsilon


def test_reserved_sample_rate_mismatch_is_refused() -> None:
    reserved = _reserved(2.0, 64 / 457, 100, (3.0, 4))  # the operator planned for another dataset size
    with pytest.raises(PlanMismatchError, match="reserved q") as caught:
        make_plan(_job(), num_examples=BREAST_CANCER, reserved=reserved)
    assert isinstance(caught.value, ConfigurationError)
    assert caught.value.exit_code == 2


def test_reserved_too_few_steps_or_releases_are_refused() -> None:
    with pytest.raises(PlanMismatchError, match="only 10 were reserved"):
        make_plan(_job(), num_examples=BREAST_CANCER, reserved=_reserved(2.0, 64 / 456, 10, (3.0, 4)))
    with pytest.raises(PlanMismatchError, match="did not reserve"):
        make_plan(_job(), num_examples=BREAST_CANCER, reserved=_reserved(3.0, 64 / 456, 1000))
    with pytest.raises(PlanMismatchError, match="did not reserve"):
        make_plan(_job(), num_examples=BREAST_CANCER, reserved=_reserved(3.0, 64 / 456, 1000, (3.0, 2)))


def test_reserved_sigma_too_small_for_the_target_is_refused() -> None:
    with pytest.raises(PlanMismatchError, match="above targetEpsilon"):
        make_plan(_job(), num_examples=BREAST_CANCER, reserved=_reserved(0.5, 64 / 456, 1000, (3.0, 4)))
    with pytest.raises(PlanMismatchError, match="above targetEpsilon"):
        make_plan(_job(), num_examples=BREAST_CANCER, reserved=_reserved(3.0, 64 / 456, 1000, (0.5, 4)))


def test_a_datasets_holdout_is_fixed_for_every_job_on_it() -> None:
    dataset = PrivateDataset.model_validate(
        {"metadata": {"name": "cohort"}, "spec": {"source": {"builtin": "breast-cancer"}, "budget": {"epsilon": 5},
                                                 "holdoutFraction": 0.3}}
    )  # fmt: skip
    job = DPTrainingJob.model_validate(
        {"metadata": {"name": "j"}, "spec": {"dataset": {"datasetRef": {"name": "cohort"}},
                                            "privacy": {"targetEpsilon": 3.0}, "training": {"batchSize": 64}}}
    )  # fmt: skip
    assert make_plan(job, dataset=dataset).holdout_fraction == 0.3
    other = job.model_copy(deep=True)
    other.spec.training.eval_fraction = 0.1
    with pytest.raises(ConfigurationError, match="fixed for every job"):
        make_plan(other, dataset=dataset)


def test_no_holdout_means_no_releases() -> None:
    plan = make_plan(_job(training={"evalFraction": 0.0}), num_examples=BREAST_CANCER)
    assert (plan.releases, plan.holdout_segment, plan.eval_size) == (0, None, 0)
    assert set(plan.mechanisms()) == {"train"}


def test_a_plan_of_too_many_steps_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="more than the maximum"):
        make_plan(_job(training={"batchSize": 1, "epochs": 10000}), num_examples=BREAST_CANCER)


def test_reserved_from_env() -> None:
    assert reserved_from_env({}) is None
    text = _reserved(1.5, 0.1, 50, (2.0, 3)).model_dump_json(by_alias=True)
    parsed = reserved_from_env({PodEnv.RESERVED_MECHANISM: text})
    assert parsed == _reserved(1.5, 0.1, 50, (2.0, 3))
    for bad in (
        "not json",
        "[1, 2]",
        json.dumps({"noiseMultiplier": 1.5}),
        json.dumps({"train": {"noiseMultiplier": -1, "sampleRate": 0.1, "steps": 1}}),
    ):
        with pytest.raises(ConfigurationError, match=PodEnv.RESERVED_MECHANISM):
            reserved_from_env({PodEnv.RESERVED_MECHANISM: bad})


def test_plan_round_trips_through_a_dict() -> None:
    plan = make_plan(_job(privacy={"noiseMultiplier": 3.0}), num_examples=BREAST_CANCER)
    data = plan.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert TrainingPlan.from_dict(data) == plan
    assert {"noiseMultiplier", "sampleRate", "steps", "delta", "targetEpsilon", "plannedEpsilon"} <= set(data)
    assert plan.segment == MechanismSegment(3.0, plan.sample_rate, plan.steps)
    assert plan.epochs == pytest.approx(plan.steps * plan.sample_rate)
