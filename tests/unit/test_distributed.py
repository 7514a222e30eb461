"""Distributed DP-SGD: shards, one noise draw per global step, ranks in step, the CLI's --nproc, resume after a kill.

The process groups are real (gloo, two forked processes, or ``dptrain run --nproc 2`` as a subprocess).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.checkpoint import CHECKPOINT_NAME, job_fingerprint, load_checkpoint
from dptrain.data import PreparedData, load_builtin, record_hashes, shard, shard_mask, split_holdout
from dptrain.distributed import Group, PeerFailedError, Topology, agree, check_same_plan, from_primary
from dptrain.dpsgd import make_private_training
from dptrain.engine import TrainingRun, train
from dptrain.errors import ConfigurationError, DataError, ModelError, PlanMismatchError, TrainingInterrupted
from dptrain.events import Progress, TrainingResult
from dptrain.journal import JOURNAL_NAME, PrivacyJournal
from dptrain.plan import TrainingPlan, make_plan
from dptrain.report import REPORT_NAME
from dptrain.runtime import fresh_generator
from dptrain_api import DPTrainingJob, ExitCode, dataset_identity, holdout_key
from dptrain_api.job import ModelSpec
from tests.support.distributed import free_port, spawn

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

KEY = b"dptrain-test-shard-key-0123456789"


@pytest.fixture(scope="module")
def breast_cancer() -> PreparedData:
    return load_builtin("breast-cancer")


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- shards ----------------------------------------------------------------------------------------------


def test_shards_partition_the_records_and_one_more_record_moves_no_other(breast_cancer: PreparedData) -> None:
    records = TensorDataset(breast_cancer.features, breast_cancer.labels)
    for shards in (2, 3):
        masks = [shard_mask(records, shards=shards, index=i, key=KEY) for i in range(shards)]
        assert torch.equal(torch.stack(masks).sum(dim=0), torch.ones(len(breast_cancer.labels), dtype=torch.long))
        sizes = [int(m.sum()) for m in masks]
        assert min(sizes) > 0.8 * len(breast_cancer.labels) / shards  # balanced (a hash, not the order)
    # Add a record: every other record keeps its shard (a shard never depends on the record count).
    extra = TensorDataset(
        torch.cat([breast_cancer.features, torch.full((1, 30), 0.5)]),
        torch.cat([breast_cancer.labels, torch.tensor([1])]),
    )
    before = shard_mask(records, shards=2, index=1, key=KEY)
    after = shard_mask(extra, shards=2, index=1, key=KEY)
    assert torch.equal(after[:-1], before)
    # Independent of the order too, and of the key of the holdout split.
    reversed_records = TensorDataset(breast_cancer.features.flip(0), breast_cancer.labels.flip(0))
    assert torch.equal(shard_mask(reversed_records, shards=2, index=1, key=KEY).flip(0), before)
    assert record_hashes(breast_cancer.features[:3], breast_cancer.labels[:3], key=KEY) != record_hashes(
        breast_cancer.features[:3], breast_cancer.labels[:3], key=KEY[::-1]
    )
    assert len(shard(records, shards=1, index=0, key=KEY)) == len(records)
    assert (
        len(shard(TensorDataset(torch.empty(0, 30), torch.empty(0, dtype=torch.long)), shards=2, index=0, key=KEY)) == 0
    )


def test_topology_from_the_pod_environment_and_nproc() -> None:
    env = {
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29500",
    }
    topology = Topology.from_env(env)
    assert (topology.world_size, topology.node_rank, topology.master_addr) == (6, 1, "job-node-0-0.job")
    assert Topology.from_env({}).world_size == 1
    local = Topology.from_env({}, nproc=2)
    assert (local.world_size, local.master_addr) == (2, "127.0.0.1")
    with pytest.raises(ConfigurationError, match="--nproc is for one machine"):
        Topology.from_env(env, nproc=2)
    with pytest.raises(ConfigurationError, match="PET_NODE_RANK"):
        Topology.from_env({**env, "PET_NODE_RANK": "3"})
    with pytest.raises(ConfigurationError, match="not an integer"):
        Topology.from_env({**env, "PET_NNODES": "two"})
    with pytest.raises(ConfigurationError, match="at least 1"):
        Topology.from_env({}, nproc=0)


# --- collectives: deciding and failing together ------------------------------------------------------------


def _failures(group: Group) -> list[tuple[str, int]]:
    caught: list[tuple[str, int]] = []

    def on_rank_0() -> int:
        raise DataError("the file is unreadable")

    def on_rank_1() -> int:
        if group.rank == 1:
            raise ModelError("unsupported layer")
        return 1

    def mismatch() -> None:
        check_same_plan(group, {"noiseMultiplier": 1.0 + group.rank, "steps": 10})

    for action in (lambda: from_primary(group, on_rank_0, what="opening"), lambda: agree(group, on_rank_1, what="x")):
        try:
            action()
        except (PeerFailedError, DataError, ModelError) as error:
            caught.append((type(error).__name__, int(error.exit_code)))
    try:
        mismatch()
    except PlanMismatchError as error:
        caught.append((str(error), int(error.exit_code)))
    return caught


def test_a_failure_on_one_rank_stops_every_rank_with_its_exit_code() -> None:
    rank_0, rank_1 = spawn(_failures)
    assert rank_0[:2] == [("DataError", 3), ("PeerFailedError", 4)]
    assert rank_1[:2] == [("PeerFailedError", 3), ("ModelError", 4)]
    for message, code in (rank_0[2], rank_1[2]):  # a different plan on rank 1: both refuse, exit 2
        assert code == ExitCode.INVALID_CONFIGURATION
        assert "rank 1 (noiseMultiplier: 1.0 vs 2.0)" in message


# --- the DP-SGD step ---------------------------------------------------------------------------------------

MODES = ("bookkeeping", "ghost", "hooks")


def _mlp() -> nn.Module:
    from dptrain.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelSpec(architecture="mlp", hidden_sizes=[8]), input_shape=(30,), num_classes=2)
    return model


def _step(mode: str, features: torch.Tensor, labels: torch.Tensor, *, distributed: bool) -> list[torch.Tensor]:
    """One noiseless step of the engine's PrivateTraining (micro-batches of 8) from the same initial weights."""
    model = _mlp()
    private = make_private_training(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=0.0,
        max_grad_norm=0.05,  # small: most examples are clipped
        expected_batch_size=40,
        physical_batch_size=8,
        noise_generator=None,
        clipping_mode=mode,
        distributed=distributed,
    )
    private.step(features, labels)
    return _params(model)


def test_without_noise_two_ranks_take_exactly_the_one_process_step(breast_cancer: PreparedData) -> None:
    features, labels = breast_cancer.features[:40], breast_cancer.labels[:40]

    def on_rank(group: Group) -> dict[str, list[torch.Tensor]]:
        mine = shard_mask(TensorDataset(features, labels), shards=2, index=group.rank, key=KEY)
        return {mode: _step(mode, features[mine], labels[mine], distributed=True) for mode in MODES}

    ranks = spawn(on_rank)
    for mode in MODES:
        one_process = _step(mode, features, labels, distributed=False)
        assert not all(torch.equal(a, b) for a, b in zip(one_process, _params(_mlp()), strict=True))  # it moved
        for rank in ranks:
            for got, want in zip(rank[mode], one_process, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_noise_enters_once_per_global_step_not_once_per_rank() -> None:
    sigma, clip, expected = 1.3, 0.5, 16.0

    def on_rank(group: Group) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(200, 100), nn.Tanh(), nn.Linear(100, 50))
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        private = make_private_training(
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=expected,
            physical_batch_size=16,
            noise_generator=fresh_generator(),  # fresh OS seeds, different on every rank
            secure_noise=False,
            clipping_mode="bookkeeping",
            distributed=True,
        )
        private.step(torch.empty(0, 200), torch.empty(0, dtype=torch.long))  # both local batches empty
        return before - torch.cat([p.detach().flatten() for p in model.parameters()])  # the update = the noise

    rank_0, rank_1 = spawn(on_rank)
    assert torch.equal(rank_0, rank_1)  # one draw, the same on every replica
    assert rank_0.numel() == 25_150
    # The sample std of 25 150 draws is within 0.5 % of the true one (one standard error): 5 % is ten of them,
    # while noise added on both ranks would be √2 = 41 % too large.
    ratio = float(rank_0.std()) / (sigma * clip / expected)
    assert abs(ratio - 1.0) < 0.05, ratio


# --- the engine ------------------------------------------------------------------------------------------


def _job(name: str = "dist-job", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"builtin": "breast-cancer"},
        "model": {"architecture": "logistic"},
        "privacy": {"targetEpsilon": 8.0, "delta": 1e-5, "noiseMultiplier": 2.0, "accountant": "rdp"},
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.5, "seed": 3, "evalReleases": 1},
        "checkpoint": {"everySteps": 5},
    }
    spec.update(overrides)
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob", "metadata": {"name": name}, "spec": spec}


def _engine_run(
    group: Group, job: DPTrainingJob, plan: TrainingPlan, data: PreparedData, workdir: Path
) -> dict[str, Any]:
    run = TrainingRun.open(job, data, plan, workdir=workdir, group=group)
    with run:
        if group.rank == 1:  # this rank's Poisson batches are all empty: it must still take every step
            run.sampler.next_batch = lambda: torch.empty(0, dtype=torch.long)  # type: ignore[method-assign]
        run.start()
        while not run.done:
            run.run_chunk()
        result = run.finish()
    return {
        "steps": run.private.steps_taken,
        "params": _params(run.private.model),
        "epsilon": result.epsilon,
        "charged": result.charged_steps,
        "shard": len(run.train_set),
    }


def test_an_empty_local_batch_keeps_the_ranks_in_step_and_only_rank_0_writes(
    tmp_path: Path, breast_cancer: PreparedData
) -> None:
    job = DPTrainingJob.model_validate(_job())
    plan = make_plan(job)
    workdirs = [tmp_path / "rank0", tmp_path / "rank1"]  # rank 1's is another pod's emptyDir
    rank_0, rank_1 = spawn(lambda group: _engine_run(group, job, plan, breast_cancer, workdirs[group.rank]))
    assert rank_0["steps"] == rank_1["steps"] == plan.steps
    for a, b in zip(rank_0["params"], rank_1["params"], strict=True):
        assert torch.equal(a, b)
    assert rank_0["epsilon"] == rank_1["epsilon"] == plan.planned_epsilon  # rank 1 reports rank 0's journal
    assert rank_0["charged"] == rank_1["charged"] == plan.steps
    training, _ = split_holdout(
        breast_cancer, fraction=plan.holdout_fraction, key=holdout_key(dataset_identity(job, None))
    )
    assert rank_0["shard"] + rank_1["shard"] == len(training)  # disjoint shards of the whole training partition
    assert not workdirs[1].exists()  # never touched
    journal = PrivacyJournal(workdirs[0] / JOURNAL_NAME)
    assert [(e["startStep"], e["steps"]) for e in journal.entries if e["partition"] == "train"] == [
        (0, 5),
        (5, 5),
        (10, 5),
    ]


class _StopAt:
    """An observer (on rank 0 only) that asks for a stop after ``step``, as a SIGTERM handler would."""

    def __init__(self, step: int, event: threading.Event) -> None:
        self.step, self.event = step, event

    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None:
        """Nothing to do."""

    def on_step(self, progress: Progress) -> None:
        if progress.step == self.step:
            self.event.set()

    def on_finish(self, result: TrainingResult) -> None:
        """Nothing to do."""


def _stopped_then_resumed(
    group: Group, job: DPTrainingJob, plan: TrainingPlan, data: PreparedData, workdir: Path
) -> dict[str, Any]:
    stop = threading.Event()  # only rank 0 is asked to stop: the ranks must agree on it
    observers = [_StopAt(7, stop)] if group.primary else []
    try:
        train(job, data, plan, workdir=workdir, observers=observers, stop_event=stop, group=group)
    except TrainingInterrupted as interrupted:
        stopped_at = interrupted.step
    run = TrainingRun.open(job, data, plan, workdir=workdir, group=group)  # the second attempt
    with run:
        resumed = _params(run.private.model)
        run.start()
        while not run.done:
            run.run_chunk()
        result = run.finish()
    return {
        "stopped": stopped_at,
        "resumed": resumed,
        "from": result.resumed_from_step,
        "final": _params(run.private.model),
    }


def test_a_stop_asked_of_rank_0_stops_every_rank_and_the_resume_starts_every_rank_from_its_checkpoint(
    tmp_path: Path, breast_cancer: PreparedData
) -> None:
    job = DPTrainingJob.model_validate(_job())
    plan = make_plan(job)
    workdirs = [tmp_path / "rank0", tmp_path / "rank1"]
    rank_0, rank_1 = spawn(lambda group: _stopped_then_resumed(group, job, plan, breast_cancer, workdirs[group.rank]))
    # The same step on both ranks: one after the request (the vote's all-reduce runs behind the next step).
    assert rank_0["stopped"] == rank_1["stopped"] == 8
    assert rank_0["from"] == rank_1["from"] == 8
    checkpoint = load_checkpoint(workdirs[0] / CHECKPOINT_NAME, job_hash=job_fingerprint(job))
    assert checkpoint is not None
    assert checkpoint.step == 8 + (plan.steps - 10)  # steps 9-10 were charged but never ran: lost
    for rank in (rank_0, rank_1):  # both started the second attempt from rank 0's checkpoint of step 8
        assert all(torch.equal(a, b) for a, b in zip(rank["resumed"], rank_0["resumed"], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(rank["final"], rank_0["final"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(rank_0["resumed"], _params(_logistic(breast_cancer)), strict=True))
    journal = PrivacyJournal(workdirs[0] / JOURNAL_NAME)
    steps = [(e["attempt"], e["startStep"], e["steps"]) for e in journal.entries if e["partition"] == "train"]
    assert steps == [(1, 0, 5), (1, 5, 5), (2, 8, 5)]  # each step charged once per attempt that ran it
    assert not workdirs[1].exists()


def _logistic(data: PreparedData) -> nn.Module:
    from dptrain.models import build_model

    torch.manual_seed(3)  # the job's seed
    model, _ = build_model(ModelSpec(architecture="logistic"), input_shape=data.input_shape, num_classes=2)
    return model


# --- the CLI: dptrain run --nproc 2, two pods, resume ----------------------------------------------------


def _write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def _command(manifest: Path, output: Path, termination: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dptrain.cli", "run", str(manifest), "--output", str(output), "--quiet",
            "--termination-message-path", str(termination), *extra]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "DPTRAIN_"))}
    return {**env, "DPTRAIN_CPU_LIMIT": "2", "PYTHONUNBUFFERED": "1", **extra}


def _run(command: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_nproc_2_reports_the_single_process_epsilon_and_charges_each_step_once(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "job.yaml", _job())
    plan = make_plan(DPTrainingJob.model_validate(_job()))
    output, termination = tmp_path / "out", tmp_path / "termination"
    done = _run(_command(manifest, output, termination, "--nproc", "2"), _env())
    assert done.returncode == 0, done.stderr
    report = json.loads((output / REPORT_NAME).read_text())
    assert report["guarantee"]["epsilon"] == plan.planned_epsilon  # exactly the one-process plan's ε
    assert report["mechanism"]["processes"] == report["runtime"]["processes"] == 2
    assert report["runtime"]["threads"] == 1  # the CPU limit (2) split between the two processes
    train = [e for e in PrivacyJournal(output / JOURNAL_NAME).entries if e["partition"] == "train"]
    assert [(e["attempt"], e["startStep"], e["steps"]) for e in train] == [(1, 0, 5), (1, 5, 5), (1, 10, 5)]
    message = json.loads(termination.read_text())
    assert (message["status"], message["chargedSteps"], message["stepsRun"]) == ("Succeeded", 15, 15)
    assert message["epsilon"] == plan.planned_epsilon


@pytest.mark.slow
def test_a_pod_with_another_plan_is_refused_before_anything_is_charged(tmp_path: Path) -> None:
    port = str(free_port())
    pods = []
    for node, sigma in ((0, 2.0), (1, 2.5)):  # pod 1 was handed another manifest
        job = _job(privacy={"targetEpsilon": 8.0, "delta": 1e-5, "noiseMultiplier": sigma, "accountant": "rdp"})
        manifest = _write(tmp_path / f"job-{node}.yaml", job)
        env = _env(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(node), PET_MASTER_ADDR="127.0.0.1",
                   PET_MASTER_PORT=port)  # fmt: skip
        output, termination = tmp_path / f"out-{node}", tmp_path / f"termination-{node}"
        command = _command(manifest, output, termination)
        pods.append((subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True), output, termination))
    for process, output, _ in pods:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == ExitCode.INVALID_CONFIGURATION, stderr
        assert "disagree on its plan" in stderr
        assert "noiseMultiplier: 2.0 vs 2.5" in stderr
        assert not (output / JOURNAL_NAME).exists()
    pod_0 = json.loads(pods[0][2].read_text())
    assert (pod_0["status"], pod_0["exitCode"], pod_0["chargedSteps"]) == ("Failed", 2, 0)
    pod_1 = json.loads(pods[1][2].read_text())  # another pod's message: its outcome, never a charge
    assert (pod_1["status"], pod_1["exitCode"]) == ("Failed", 2)
    assert "epsilon" not in pod_1
    assert "chargedSteps" not in pod_1


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended early with {process.returncode}: {process.communicate()}")
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def _charged(journal_path: Path) -> int:
    try:
        return PrivacyJournal(journal_path).charged_steps
    except Exception:
        return 0


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_and_every_step_of_both_attempts_stays_charged(tmp_path: Path) -> None:
    job = _job(
        "dist-resume",
        training={"epochs": 20, "batchSize": 16, "learningRate": 0.1, "seed": 3, "evalReleases": 1},
        checkpoint={"everySteps": 50},
    )
    manifest = _write(tmp_path / "job.yaml", job)
    plan = make_plan(DPTrainingJob.model_validate(job))
    output, termination = tmp_path / "out", tmp_path / "termination"
    command = _command(manifest, output, termination, "--nproc", "2")
    process = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _charged(output / JOURNAL_NAME) >= 150 and (output / CHECKPOINT_NAME).exists(), process)
    (rank_0,) = [pid for pid in _children(process.pid) if _rank_of(pid) == "0"]
    os.kill(rank_0, signal.SIGKILL)  # rank 0 dies without a word; rank 1 loses its peer and fails too
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGKILL, stderr
    journal = PrivacyJournal(output / JOURNAL_NAME)
    charged_at_kill = journal.charged_steps
    assert charged_at_kill < plan.steps
    # The launcher wrote pod 0's message in rank 0's place: what the journal charged.
    killed = json.loads(termination.read_text())
    assert (killed["status"], killed["exitCode"], killed["chargedSteps"]) == ("Failed", 137, charged_at_kill)
    assert killed["epsilon"] == journal.epsilon(plan.delta, plan.accountant)

    resumed = _run(command, _env())
    assert resumed.returncode == 0, resumed.stderr
    step = int(resumed.stderr.split("resumed from step ")[1].split()[0])
    assert 0 < step <= charged_at_kill
    journal = PrivacyJournal(output / JOURNAL_NAME)
    train = [e for e in journal.entries if e["partition"] == "train"]
    assert {e["attempt"] for e in train} == {1, 2}
    assert sum(e["steps"] for e in train if e["attempt"] == 1) == charged_at_kill  # the killed attempt's stay
    assert journal.charged_steps == plan.steps  # and the total never exceeds the plan
    final = json.loads(termination.read_text())
    assert (final["status"], final["attempts"], final["chargedSteps"]) == ("Succeeded", 2, plan.steps)
    assert final["epsilon"] == journal.epsilon(plan.delta, plan.accountant) <= plan.target_epsilon
    assert final["stepsRun"] == step + (plan.steps - charged_at_kill)


def _rank_of(pid: int) -> str | None:
    variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [v.split(b"=", 1)[1].decode() for v in variables if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_the_distributed_example_plans_as_its_one_process_twin() -> None:
    from dptrain_api import load_manifest_file

    examples = Path(__file__).resolve().parents[2] / "examples"
    (distributed,) = load_manifest_file(examples / "breast-cancer-distributed.yaml")
    (single,) = load_manifest_file(examples / "breast-cancer-logistic.yaml")
    assert isinstance(distributed, DPTrainingJob)
    assert isinstance(single, DPTrainingJob)
    assert distributed.spec.distributed.workers == 2
    assert distributed.spec.privacy == single.spec.privacy
    assert distributed.spec.training == single.spec.training  # same mechanism, so the same (ε, δ)
