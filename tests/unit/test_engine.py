"""The DP-SGD engine: ε from the journal, write-ahead charging, resume, clipping modes, Poisson sampling."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from dptrain.checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint
from dptrain.data import PreparedData, load_data
from dptrain.dpsgd import PoissonSampler, make_private_training
from dptrain.engine import train
from dptrain.errors import CheckpointError, JournalError, JournalLostError, TrainingInterrupted
from dptrain.evaluation import dp_release, holdout_sums, release_schedule, sensitivity
from dptrain.events import Progress, TrainingResult
from dptrain.journal import JOURNAL_NAME, PrivacyJournal
from dptrain.models import build_model
from dptrain.plan import TrainingPlan, make_plan
from dptrain.randomness import GeneratorBits
from dptrain.runtime import cpu_thread_limit
from dptrain_accounting import MechanismSegment, compact, compute_epsilon, partitioned_epsilon
from dptrain_api import DPTrainingJob

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPTRAIN_CPU_LIMIT", "1")


def _job(name: str = "engine-test", *, dataset: str = "breast-cancer", **spec: Any) -> DPTrainingJob:
    body: dict[str, Any] = {
        "dataset": {"builtin": dataset},
        "model": {"architecture": "logistic"},
        "privacy": {"targetEpsilon": 10.0, "delta": 1e-5, "noiseMultiplier": 2.0},
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.5, "seed": 7},
        "checkpoint": {"everySteps": 5},
    }
    body.update(spec)
    return DPTrainingJob.model_validate({"metadata": {"name": name}, "spec": body})


@pytest.fixture(scope="module")
def breast_cancer() -> PreparedData:
    return load_data(_job().spec.dataset)


@pytest.fixture(scope="module")
def plan(breast_cancer: PreparedData) -> TrainingPlan:
    return make_plan(_job(), num_examples=breast_cancer.num_examples)


class Recorder:
    def __init__(self, action: Any = None) -> None:
        self.started: list[tuple[int, int]] = []
        self.steps: list[Progress] = []
        self.finished: list[TrainingResult] = []
        self.failures: list[tuple[str, float, int, int]] = []
        self.action = action

    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None:
        self.started.append((resumed_from_step, attempt))

    def on_step(self, progress: Progress) -> None:
        self.steps.append(progress)
        if self.action is not None:
            self.action(progress)

    def on_finish(self, result: TrainingResult) -> None:
        self.finished.append(result)

    def on_failure(self, error: BaseException, *, epsilon_spent: float, charged_steps: int, step: int) -> None:
        self.failures.append((type(error).__name__, epsilon_spent, charged_steps, step))


def test_uninterrupted_run_reports_the_journal_epsilon(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    assert plan.steps == 15
    recorder = Recorder()
    result = train(_job(), breast_cancer, plan, workdir=tmp_path, observers=[recorder])
    journal = PrivacyJournal(tmp_path / JOURNAL_NAME)
    train_part = compact(journal.segments("train"))
    holdout_part = compact(journal.segments("holdout"))
    assert train_part == [plan.segment]  # uninterrupted: exactly the planned DP-SGD steps
    assert result.epsilon == partitioned_epsilon(train_part, holdout_part, delta=plan.delta, accountant=plan.accountant)
    assert result.epsilon <= plan.planned_epsilon <= plan.target_epsilon
    assert result.steps_run == result.charged_steps == journal.charged_steps == plan.steps
    steps = [entry for entry in result.journal if entry["partition"] == "train"]
    assert [entry["steps"] for entry in steps] == [5, 5, 5]
    assert [entry["startStep"] for entry in steps] == [0, 5, 10]
    # Held-out metrics were released before the first step (the declared-size check) and at checkpoints (one
    # release each at most), each charged before computed.
    releases = [entry for entry in result.journal if entry["partition"] == "holdout"]
    assert [entry["startStep"] for entry in releases] == [0, 5, 10, 15]
    assert result.charged_releases == 4 == plan.releases
    assert result.attempts == 1
    assert result.resumed_from_step == 0
    assert result.clipping_mode == "bookkeeping"  # logistic regression: Linear layers only
    assert set(result.eval_metrics) == {"accuracy", "auc", "loss"}
    assert 0.0 <= result.eval_metrics["accuracy"] <= 1.0
    assert [h["step"] for h in result.history if not h.get("released")] == list(range(1, plan.steps + 1))
    assert [h["step"] for h in result.history if h.get("released")] == [0, 5, 10, 15]
    assert all("loss" not in h for h in result.history if not h.get("released"))  # never the training loss
    assert recorder.started == [(0, 1)]
    assert recorder.finished == [result]
    assert [p.step for p in recorder.steps] == list(range(1, plan.steps + 1))
    assert [p.step for p in recorder.steps if p.checkpointed] == [5, 10, 15]
    assert recorder.steps[-1].epsilon_spent == result.epsilon
    assert recorder.steps[-1].eval_value == result.eval_metrics["accuracy"]
    assert recorder.steps[-1].loss == result.eval_metrics["loss"]  # the DP held-out loss, not the training loss
    assert result.threads == 1
    state = torch.load(result.model_path, weights_only=True)
    model, _ = build_model(_job().spec.model, input_shape=breast_cancer.input_shape, num_classes=2)
    model.load_state_dict(state)
    assert result.model_path == tmp_path / MODEL_NAME


def test_every_step_is_charged_on_disk_before_it_runs(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    seen: list[tuple[int, int]] = []

    def check(progress: Progress) -> None:
        on_disk = PrivacyJournal(tmp_path / JOURNAL_NAME)  # what a crash right now would leave
        seen.append((progress.step, on_disk.charged_steps))
        assert on_disk.charged_steps >= progress.step
        assert progress.epsilon_spent == on_disk.epsilon(plan.delta, plan.accountant)

    train(_job(), breast_cancer, plan, workdir=tmp_path, observers=[Recorder(check)])
    assert [charged for _, charged in seen] == [5] * 5 + [10] * 5 + [15] * 5


def test_a_crash_mid_chunk_stays_charged_and_the_resume_ends_early(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    uninterrupted = train(_job(), breast_cancer, plan, workdir=tmp_path / "clean")

    def crash(progress: Progress) -> None:
        if progress.step == 7:
            raise RuntimeError("node died")

    crashed = Recorder(crash)
    with pytest.raises(RuntimeError, match="node died"):
        train(_job(), breast_cancer, plan, workdir=tmp_path / "run", observers=[crashed])
    journal = PrivacyJournal(tmp_path / "run" / JOURNAL_NAME)
    assert journal.charged_steps == 10  # the second chunk was charged before its steps ran
    assert crashed.failures == [("RuntimeError", journal.epsilon(plan.delta), 10, 7)]
    checkpoint = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, job_hash=_fingerprint())
    assert checkpoint is not None
    assert checkpoint.step == 5

    resumed = Recorder()
    result = train(_job(), breast_cancer, plan, workdir=tmp_path / "run", observers=[resumed])
    assert resumed.started == [(5, 2)]
    assert result.resumed_from_step == 5
    assert result.attempts == 2
    assert result.charged_steps == plan.steps  # never beyond the plan
    assert result.steps_run == plan.steps - 5  # the crashed chunk's steps are lost, not re-granted
    assert result.epsilon >= compute_epsilon([plan.segment], delta=plan.delta)
    assert result.epsilon <= plan.target_epsilon
    assert result.epsilon == PrivacyJournal(tmp_path / "run" / JOURNAL_NAME).epsilon(plan.delta)
    steps = [(e["attempt"], e["startStep"], e["steps"]) for e in result.journal if e["partition"] == "train"]
    assert steps == [(1, 0, 5), (1, 5, 5), (2, 5, 5)]
    del uninterrupted


def test_a_torn_journal_tail_uses_up_the_plan_and_the_resume_runs_nothing(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    def crash(progress: Progress) -> None:
        if progress.step == 7:
            raise RuntimeError("power loss")

    with pytest.raises(RuntimeError):
        train(_job(), breast_cancer, plan, workdir=tmp_path, observers=[Recorder(crash)])
    with (tmp_path / JOURNAL_NAME).open("ab") as file:
        file.write(b'{"type":"intent","seq":3,"atte')  # the next append was torn by the power loss
    result = train(_job(), breast_cancer, plan, workdir=tmp_path)
    assert result.charged_steps == plan.steps  # the torn intent is charged with all that was left
    assert result.charged_releases == plan.releases  # in every partition
    assert result.epsilon == plan.planned_epsilon
    assert result.steps_run == 5  # the checkpoint's model; no budget was left to train further
    assert any("crashed attempts used up" in warning for warning in result.warnings)
    assert result.journal[-1]["repaired"] is True
    assert not PrivacyJournal(tmp_path / JOURNAL_NAME).torn  # repaired durably before anything else


def _fingerprint() -> str:
    from dptrain.checkpoint import job_fingerprint

    return job_fingerprint(_job())


def test_stop_request_finishes_the_step_checkpoints_and_resumes(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    stop = threading.Event()

    def request_stop(progress: Progress) -> None:
        if progress.step == 3:
            stop.set()

    recorder = Recorder(request_stop)
    with pytest.raises(TrainingInterrupted) as caught:
        train(_job(), breast_cancer, plan, workdir=tmp_path, observers=[recorder], stop_event=stop)
    assert caught.value.exit_code == 143
    assert caught.value.step == 3
    assert recorder.steps[-1].step == 3  # no step ran after the request
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME, job_hash=_fingerprint())
    assert checkpoint is not None
    assert checkpoint.step == 3
    assert PrivacyJournal(tmp_path / JOURNAL_NAME).charged_steps == 5

    result = train(_job(), breast_cancer, plan, workdir=tmp_path)
    assert result.resumed_from_step == 3
    assert result.steps_run == 3 + (plan.steps - 5)
    assert result.charged_steps == plan.steps
    assert result.epsilon == PrivacyJournal(tmp_path / JOURNAL_NAME).epsilon(plan.delta) <= plan.planned_epsilon


def test_a_finished_run_is_not_charged_again(tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan) -> None:
    first = train(_job(), breast_cancer, plan, workdir=tmp_path)
    second = train(_job(), breast_cancer, plan, workdir=tmp_path)
    assert second.journal == first.journal
    assert second.epsilon == first.epsilon
    assert second.steps_run == first.steps_run == plan.steps
    assert second.eval_metrics == first.eval_metrics


def test_another_jobs_directory_is_refused(tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan) -> None:
    train(_job(), breast_cancer, plan, workdir=tmp_path)
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="different job"):
        train(_job("another-job"), breast_cancer, plan, workdir=tmp_path)
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before


def test_a_checkpoint_without_its_journal_is_refused(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    train(_job(), breast_cancer, plan, workdir=tmp_path)
    (tmp_path / JOURNAL_NAME).unlink()
    with pytest.raises(JournalError, match="missing"):
        train(_job(), breast_cancer, plan, workdir=tmp_path)
    assert not (tmp_path / JOURNAL_NAME).exists()


def test_cnn_trains_with_the_conv_kernels(tmp_path: Path) -> None:
    job = _job(
        dataset="digits",
        model={"architecture": "cnn", "channels": [4]},
        training={"epochs": 0.3, "batchSize": 64, "learningRate": 0.5, "seed": 1},
    )
    data = load_data(job.spec.dataset)
    plan = make_plan(job, num_examples=data.num_examples)
    result = train(job, data, plan, workdir=tmp_path)
    assert result.clipping_mode == "bookkeeping"  # Conv2d has a book-keeping kernel
    assert result.steps_run == plan.steps
    assert result.eval_metric == "accuracy"
    assert "auc" not in result.eval_metrics


def _private(model_spec: dict[str, Any], *, mode: str, sigma: float, data: PreparedData) -> Any:
    job = _job(model=model_spec)
    torch.manual_seed(3)
    model, _ = build_model(job.spec.model, input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return make_private_training(
        model,
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=0.05,  # small: most examples are clipped
        expected_batch_size=64,
        physical_batch_size=64,
        noise_generator=None,
        clipping_mode=mode,
    )


@pytest.mark.parametrize("model_spec", [{"architecture": "logistic"}, {"architecture": "mlp", "hiddenSizes": [16, 8]}])
def test_every_clipping_mode_takes_the_same_step(breast_cancer: PreparedData, model_spec: dict[str, Any]) -> None:
    features, labels = breast_cancer.features[:40], breast_cancer.labels[:40]  # one fixed batch, no sampler
    parameters = {}
    for mode in ("bookkeeping", "ghost", "hooks"):
        private = _private(model_spec, mode=mode, sigma=0.0, data=breast_cancer)
        assert private.clipping_mode == mode
        private.step(features, labels)
        assert private.steps_taken == 1
        parameters[mode] = [p.detach().clone() for p in private.model.parameters()]
    for mode in ("ghost", "hooks"):
        for reference, other in zip(parameters["bookkeeping"], parameters[mode], strict=True):
            assert torch.allclose(reference, other, atol=1e-6, rtol=0), mode


def test_an_empty_poisson_batch_still_takes_a_noise_step(breast_cancer: PreparedData) -> None:
    for mode in ("bookkeeping", "ghost", "hooks"):
        private = _private({"architecture": "logistic"}, mode=mode, sigma=1.0, data=breast_cancer)
        before = [p.detach().clone() for p in private.model.parameters()]
        private.step(breast_cancer.features[:0], breast_cancer.labels[:0])
        assert private.steps_taken == 1, mode  # counted as a step
        after = list(private.model.parameters())
        assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True)), mode  # noise was added


def test_the_sampler_draws_poisson_batches_at_exactly_the_plan_rate() -> None:
    rate = 64 / 569
    sampler = PoissonSampler(569, sample_rate=rate, bits=GeneratorBits(torch.Generator().manual_seed(1)))
    assert sampler.sample_rate == rate
    batches = [sampler.next_batch() for _ in range(400)]
    sizes = [len(batch) for batch in batches]
    mean = sum(sizes) / len(sizes)
    assert len(set(sizes)) > 5  # Poisson: variable batch sizes
    assert abs(mean - 64) < 4 * math.sqrt(64 / len(sizes)) + 1
    assert all(len(set(batch.tolist())) == len(batch) for batch in batches)  # without replacement
    counts = torch.bincount(torch.cat(batches), minlength=569).float()
    assert abs(float(counts.mean()) / 400 - rate) < 0.01  # each record joins at rate q
    tiny = PoissonSampler(3, sample_rate=1e-6, bits=GeneratorBits(torch.Generator().manual_seed(2)))
    assert len(tiny.next_batch()) == 0  # an empty batch is a valid draw


def test_a_logical_batch_is_split_into_physical_micro_batches(breast_cancer: PreparedData) -> None:
    whole = _private({"architecture": "logistic"}, mode="bookkeeping", sigma=0.0, data=breast_cancer)
    split = _private({"architecture": "logistic"}, mode="bookkeeping", sigma=0.0, data=breast_cancer)
    split.physical_batch_size = 7
    features, labels = breast_cancer.features[:40], breast_cancer.labels[:40]
    for private in (whole, split):
        private.step(features, labels)
        assert private.steps_taken == 1  # one noisy step for the whole logical batch
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_a_retry_that_finds_no_journal_fails_closed(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    """The guarantee's hole 2: a retry whose volume came back empty must not start a fresh journal."""
    with pytest.raises(JournalLostError, match="this is a retry") as caught:
        train(_job(), breast_cancer, plan, workdir=tmp_path, expect_journal=True)
    assert caught.value.exit_code == 7
    assert not (tmp_path / JOURNAL_NAME).exists()  # nothing was charged afresh
    train(_job(), breast_cancer, plan, workdir=tmp_path / "first")  # a first attempt creates one
    assert train(_job(), breast_cancer, plan, workdir=tmp_path / "first", expect_journal=True).charged_steps


def test_a_dp_release_adds_gaussian_noise_of_the_planned_scale(breast_cancer: PreparedData) -> None:
    model, _ = build_model(_job().spec.model, input_shape=breast_cancer.input_shape, num_classes=2)
    holdout = TensorDataset(breast_cancer.features[:100], breast_cancer.labels[:100])
    cpu = torch.device("cpu")
    exact = holdout_sums(model, holdout, num_classes=2, device=cpu)
    assert exact[0] == 100  # the count, one row per record
    assert model.training  # evaluation restores training mode
    bits = GeneratorBits(torch.Generator().manual_seed(0))
    accuracies = [
        dp_release(model, holdout, num_classes=2, noise_multiplier=2.0, bits=bits, device=cpu)["accuracy"]
        for _ in range(300)
    ]
    exact_accuracy = float(exact[1] / exact[0])
    mean = sum(accuracies) / len(accuracies)
    spread = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
    # noise std 2 * sensitivity on both the correct count and the count: accuracy moves by about that / 100
    assert 0.02 < spread < 0.2
    assert abs(mean - exact_accuracy) < 0.05
    assert sensitivity(2) == 2.0
    assert release_schedule(steps=15, releases=4) == [4, 8, 12, 15]
    assert release_schedule(steps=15, releases=4, from_start=True) == [0, 5, 10, 15]
    assert release_schedule(steps=15, releases=1, from_start=True) == [15]  # the final model is always measured
    assert release_schedule(steps=15, releases=0) == []


def test_cpu_thread_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    available = len(os.sched_getaffinity(0))
    missing = tmp_path / "absent"
    quota = tmp_path / "cpu.max"

    def limit(env: dict[str, str], cpu_max: Path = missing) -> int:
        return cpu_thread_limit(env, cgroup_cpu_max=cpu_max, cgroup_v1_quota=missing, cgroup_v1_period=missing)

    assert limit({}) == available
    assert limit({"DPTRAIN_CPU_LIMIT": "500m"}) == 1
    assert limit({"DPTRAIN_CPU_LIMIT": "1.5"}) == 1
    assert limit({"DPTRAIN_CPU_LIMIT": "64"}) == available  # never more than the CPUs we may run on
    assert limit({"OMP_NUM_THREADS": "1"}) == 1
    assert limit({"DPTRAIN_CPU_LIMIT": "1", "OMP_NUM_THREADS": "8"}) == 1
    assert limit({"DPTRAIN_CPU_LIMIT": "bogus"}) == available
    quota.write_text("100000 100000\n")
    assert limit({}, quota) == 1
    assert limit({"DPTRAIN_CPU_LIMIT": "8"}, quota) == 1  # never more than the cgroup quota either
    quota.write_text("max 100000\n")
    assert limit({}, quota) == available


def test_sample_rate_of_the_journal_matches_the_loader(
    tmp_path: Path, breast_cancer: PreparedData, plan: TrainingPlan
) -> None:
    result = train(_job(), breast_cancer, plan, workdir=tmp_path)
    steps = {(e["noiseMultiplier"], e["sampleRate"]) for e in result.journal if e["partition"] == "train"}
    assert steps == {(2.0, 64 / plan.train_size)}
    assert MechanismSegment(2.0, plan.sample_rate, plan.steps) == plan.segment


def test_the_spec_can_force_a_clipping_mode(tmp_path: Path, breast_cancer: PreparedData) -> None:
    job = _job(training={"epochs": 0.3, "batchSize": 64, "learningRate": 0.5, "seed": 1, "clipping": "hooks"})
    plan = make_plan(job, num_examples=breast_cancer.num_examples)
    assert train(job, breast_cancer, plan, workdir=tmp_path).clipping_mode == "hooks"


def test_a_file_far_from_its_declared_size_fails_before_training(tmp_path: Path, breast_cancer: PreparedData) -> None:
    """An empty file (a wrong path, a truncated export) declared as 569 records: the DP count of the held-out records
    released before the first step says so (DeclaredSizeMismatch); nothing is trained, one release is charged."""
    from dptrain.errors import DeclaredSizeMismatchError

    plan = make_plan(_job())
    empty = PreparedData(
        name="empty",
        features=breast_cancer.features[:0],
        labels=breast_cancer.labels[:0],
        num_classes=2,
        input_shape=breast_cancer.input_shape,
        eval_metric="auc",
    )
    with pytest.raises(DeclaredSizeMismatchError, match="declared size implies about 113"):
        train(_job(), empty, plan, workdir=tmp_path / "empty")
    journal = PrivacyJournal(tmp_path / "empty" / JOURNAL_NAME)
    assert (journal.charged_steps, journal.charged_releases) == (0, 1)
    assert DeclaredSizeMismatchError.exit_code == 10
    # the declared data itself passes the check (and a 10x mismatch the other way fails it: never both)
    assert train(_job(), breast_cancer, plan, workdir=tmp_path / "full").charged_releases == plan.releases
