"""The DP-SGD engine: a training run that is charged through the journal, chunk by chunk.

:class:`TrainingRun` is one attempt of a job's training, driven as prepare → start → run chunks →
finish; the local CLI drives it through :func:`train`. Privacy invariants (each is tested):

* Poisson sampling only: every logical batch includes each training example independently with
  probability exactly ``plan.sample_rate``. Empty batches still take a (noise-only) step.
* Write-ahead charging: steps run in chunks of ``checkpoint.everySteps``; each chunk is appended to
  the privacy journal and fsynced BEFORE its first step runs, then checkpointed after its last.
  A crash mid-chunk leaves the chunk charged; the resumed run continues from the checkpoint and
  charges its steps again, so it ends up to one chunk early per crash.
* The journal never charges more than ``plan.steps`` in total, so the final ε is at most ε(plan).
* Held-out metrics leave the run only as DP releases (:mod:`dptrain.evaluation`), each charged to the
  holdout partition before it is computed; the training loss is never read.
* A retry (attempt > 1) that finds no journal fails (:class:`JournalLostError`) instead of starting a
  fresh one: what the earlier attempts spent would be lost.
* The reported ε is the journal's composition (the plan's accountant, never Opacus' GDP), i.e.
  a valid upper bound for everything that ran, crashed attempts included.
* Noise and sampling come from random sources seeded freshly from the OS on every attempt (never from
  the job's seed, never restored from a checkpoint): ChaCha20 (a CSPRNG) with ``privacy.secureNoise``, else
  torch's generators; inclusion at ⌊q·2⁵³⌋/2⁵³ ≤ q and float64 Gaussian noise (:mod:`dptrain.randomness`).

Distributed (a :class:`~dptrain.distributed.Group` of several processes), the same invariants hold for the
global run:

* Every rank first checks that all run the same plan (:func:`plan_fingerprint`); global rank 0 alone then
  owns the journal, the checkpoint, the held-out releases and the observers (report, metrics, console).
  The other ranks never touch the output folder: they follow rank 0's decisions (:class:`JournalMirror`).
* Each rank Poisson-samples its own disjoint keyed shard of the training partition at the GLOBAL q, so
  the union of the ranks' batches is a Poisson sample of the whole partition at q; the clipped sums are
  all-reduced and rank 0 alone adds the noise, divided by the GLOBAL expected batch (``make_private(...,
  distributed=True)``): noise enters once per global step. A rank with an empty local batch still joins
  the step's all-reduce, so every rank takes every step.
* Rank 0 appends a chunk's intent to the journal BEFORE the broadcast that tells every rank the chunk's
  size: no rank runs a step that is not charged. A resumed run's checkpoint is read by rank 0 and
  broadcast; every rank agrees on a stop request before each step, so all stop after the same step.
* Held-out releases are computed by rank 0 alone, on the whole holdout (every rank loads all the data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    Checkpoint,
    capture_rng_state,
    export_model,
    job_fingerprint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from dptrain.data import PreparedData, cap_units, shard, shard_key, split_holdout
from dptrain.distributed import SINGLE_PROCESS, Group, StopVote, agree, check_same_plan, from_primary
from dptrain.dpsgd import PoissonSampler, PrivateTraining, UnitSampler, make_optimizer, make_private_training
from dptrain.errors import DeclaredSizeMismatchError, JournalError, JournalLostError, TrainingInterrupted
from dptrain.evaluation import (
    declared_size_mismatch,
    dp_release_sums,
    metrics_from_sums,
    release_schedule,
    sensitivity,
)
from dptrain.events import FailureObserver, Progress, TrainingObserver, TrainingResult
from dptrain.journal import (
    HOLDOUT,
    JOURNAL_NAME,
    TRAIN,
    JournalMirror,
    JournalView,
    PrivacyJournal,
    workdir_lock,
)
from dptrain.models import build_model
from dptrain.plan import TrainingPlan
from dptrain.randomness import fresh_bits
from dptrain.runtime import configure_threads, fresh_generator, select_device
from dptrain_api import DPTrainingJob, ExitCode, PrivateDataset, dataset_identity, holdout_key

__all__ = [
    "DataSource",
    "TrainingRun",
    "build_job_model",
    "make_job_private",
    "plan_fingerprint",
    "resolve_seed",
    "train",
]

logger = logging.getLogger(__name__)

DataSource = PreparedData | Callable[[], PreparedData]
"""The data, or how to load it (after the journal is opened, so a retry fails closed before reading any data)."""


def resolve_seed(job: DPTrainingJob) -> int:
    """The job's seed, else one derived from the job's fingerprint (stable across attempts of one job).

    It drives the initial weights only, never the split, the DP noise or the sampling.
    """
    seed = job.spec.training.seed
    if seed is not None:
        return int(seed)
    return int(hashlib.sha256(job_fingerprint(job).encode()).hexdigest()[:15], 16)


def build_job_model(
    job: DPTrainingJob, *, input_shape: tuple[int, ...], num_classes: int, base_dir: Path | None = None
) -> tuple[nn.Module, list[str]]:
    """The job's model as training starts it: every RNG seeded from the job (initial weights only), then built."""
    seed = resolve_seed(job)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    model, model_warnings = build_model(
        job.spec.model, input_shape=input_shape, num_classes=num_classes, base_dir=base_dir
    )
    for message in model_warnings:
        logger.warning("%s", message)
    return model, model_warnings


def make_job_private(
    job: DPTrainingJob,
    plan: TrainingPlan,
    model: nn.Module,
    *,
    device: torch.device,
    input_shape: tuple[int, ...],
    clipping_mode: str | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    distributed: bool = False,
) -> PrivateTraining:
    """``model`` on ``device`` with the job's optimizer, wrapped for DP-SGD under ``plan`` (σ, C, batch sizes,
    clipping mode, noise construction) with a fresh noise generator. ``noise_multiplier`` / ``max_grad_norm``
    override the plan's (the privacy audit's non-private baseline only; training never passes them).
    ``distributed``: one rank of a data-parallel run (clipped sums all-reduced, noise added once, by rank 0)."""
    model = model.to(device)
    if clipping_mode is None and job.spec.training.clipping != "auto":
        clipping_mode = job.spec.training.clipping
    return make_private_training(
        model,
        make_optimizer(model.parameters(), job.spec.training),
        noise_multiplier=plan.noise_multiplier if noise_multiplier is None else noise_multiplier,
        max_grad_norm=plan.max_grad_norm if max_grad_norm is None else max_grad_norm,
        expected_batch_size=plan.batch_size,
        physical_batch_size=plan.physical_batch_size,
        noise_generator=None if job.spec.privacy.secure_noise else fresh_generator(device),
        clipping_mode=clipping_mode,
        input_shape=input_shape,
        secure_noise=job.spec.privacy.secure_noise,
        distributed=distributed,
        units=plan.unit_records > 0,
    )


def plan_fingerprint(
    job: DPTrainingJob, plan: TrainingPlan, *, identity: str, clipping_mode: str | None, world_size: int
) -> dict[str, Any]:
    """What every process of a distributed run must share before anything is charged: the mechanism (σ, q, steps,
    the holdout's σ and releases...), the job, the dataset's identity (it keys the holdout and the shards), the
    clipping mode asked for and the number of processes."""
    return {
        **plan.mechanism_key(),
        "reserved": plan.reserved,
        "jobHash": job_fingerprint(job),
        "dataset": identity,
        "clippingMode": clipping_mode or job.spec.training.clipping,
        "worldSize": world_size,
    }


@dataclasses.dataclass(frozen=True)
class _Opened:
    """What rank 0 found in the output folder, as handed to every rank."""

    checkpoint: Checkpoint | None
    journal: JournalMirror | None


class TrainingRun:
    """One attempt of a job's training, resumable from ``workdir``'s checkpoint and charged through its journal.

    Use as a context manager (it holds the output folder's lock): :meth:`open`, then :meth:`start`,
    :meth:`run_chunk` until :attr:`done`, then :meth:`finish`. Every chunk is charged in the journal
    before it runs and checkpointed after; held-out metrics are released (and charged) at the scheduled steps.
    """

    def __init__(
        self,
        *,
        job: DPTrainingJob,
        data: PreparedData,
        plan: TrainingPlan,
        workdir: Path,
        journal: JournalView,
        checkpoint: Checkpoint | None,
        observers: Sequence[TrainingObserver],
        device: torch.device,
        threads: int,
        holdout_key: bytes,
        clipping_mode: str | None = None,
        base_dir: Path | None = None,
        group: Group = SINGLE_PROCESS,
    ) -> None:
        self.job, self.data, self.plan, self.workdir = job, data, plan, workdir
        self.journal: JournalView = journal
        self.group = group
        self.observers = list(observers)
        self.device, self.threads = device, threads
        self.started = time.monotonic()
        self.job_hash = job_fingerprint(job)
        self.attempt = journal.attempts + 1
        self.step = self.resumed_from_step = checkpoint.step if checkpoint is not None else 0
        self.checkpointed_step = self.step
        self.history: list[dict[str, float]] = list(checkpoint.history) if checkpoint is not None else []
        self.eval_metrics: dict[str, float] = dict(checkpoint.eval_metrics) if checkpoint is not None else {}
        if plan.unit_records:  # at most k records per unit, chosen by each record's keyed hash
            data = cap_units(data, max_records=plan.unit_records, key=holdout_key)
        self.train_set, self.holdout_set = split_holdout(data, fraction=plan.holdout_fraction, key=holdout_key)
        # This rank's disjoint keyed shard of the training partition (all of it in one process), by unit if any.
        self.train_set = shard(
            self.train_set,
            shards=group.world_size,
            index=group.rank,
            key=shard_key(holdout_key),
            unit_ids=data.unit_ids,
        )
        if not group.primary:  # rank 0 alone releases held-out metrics
            self.holdout_set = TensorDataset(*(tensor[:0] for tensor in self.holdout_set.tensors))
        if device.type != "cpu":
            self.train_set = TensorDataset(*(t.to(device) for t in self.train_set.tensors))
        self.private, self.model_warnings = self._build(checkpoint, clipping_mode, base_dir)
        secure = job.spec.privacy.secure_noise
        self.sampler: PoissonSampler | UnitSampler = (
            UnitSampler(self.train_set.tensors[2], sample_rate=plan.sample_rate, bits=fresh_bits(secure=secure))
            if data.units is not None
            else PoissonSampler(len(self.train_set), sample_rate=plan.sample_rate, bits=fresh_bits(secure=secure))
        )
        self.release_noise = fresh_bits(secure=secure)
        self.schedule = release_schedule(steps=plan.steps, releases=plan.releases, from_start=True)
        self._lock: contextlib.ExitStack | None = None
        self._stop_vote = StopVote(group)

    # --- preparing -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        job: DPTrainingJob,
        data: DataSource,
        plan: TrainingPlan,
        *,
        workdir: Path,
        dataset: PrivateDataset | None = None,
        expect_journal: bool = False,
        observers: Sequence[TrainingObserver] = (),
        device: torch.device | None = None,
        clipping_mode: str | None = None,
        base_dir: Path | None = None,
        group: Group = SINGLE_PROCESS,
    ) -> TrainingRun:
        """Lock ``workdir``, open (or create) its journal, load its checkpoint, then the data, and build the model.

        ``expect_journal`` (a retry): a missing journal is :class:`JournalLostError`, never a fresh start.
        With a distributed ``group`` every rank first checks that all run the same plan; rank 0 alone locks
        ``workdir`` and opens its journal and checkpoint, and hands the checkpoint to the others.
        """
        workdir = Path(workdir)
        threads = configure_threads(processes=group.local_world_size)
        identity = dataset_identity(job, dataset)
        fingerprint = plan_fingerprint(
            job, plan, identity=identity, clipping_mode=clipping_mode, world_size=group.world_size
        )
        check_same_plan(group, fingerprint)
        lock = contextlib.ExitStack()
        try:
            journal, checkpoint = _open_shared(
                job, plan, workdir, expect_journal=expect_journal, lock=lock, group=group
            )
            run = cls(
                job=job,
                data=agree(group, lambda: data() if callable(data) else data, what="loading the data"),
                plan=plan,
                workdir=workdir,
                journal=journal,
                checkpoint=checkpoint,
                observers=observers,
                device=select_device(device),
                threads=threads,
                holdout_key=holdout_key(identity),
                clipping_mode=clipping_mode,
                base_dir=base_dir,
                group=group,
            )
        except BaseException:
            lock.close()
            raise
        run._lock = lock
        return run

    def _build(
        self, checkpoint: Checkpoint | None, clipping_mode: str | None, base_dir: Path | None
    ) -> tuple[PrivateTraining, list[str]]:
        model, model_warnings = agree(self.group, lambda: self._model(checkpoint, base_dir), what="building the model")
        private = make_job_private(
            self.job,
            self.plan,
            model,
            device=self.device,
            input_shape=self.data.input_shape,
            clipping_mode=clipping_mode,
            distributed=self.group.distributed,
        )
        if checkpoint is not None:
            private.optimizer.load_state_dict(checkpoint.optimizer_state)
        return private, model_warnings

    def _model(self, checkpoint: Checkpoint | None, base_dir: Path | None) -> tuple[nn.Module, list[str]]:
        """The job's model from its seed, or the checkpoint's (every rank builds the same replica)."""
        model, model_warnings = build_job_model(
            self.job, input_shape=self.data.input_shape, num_classes=self.data.num_classes, base_dir=base_dir
        )
        if checkpoint is not None:
            unwrap_model(model).load_state_dict(checkpoint.model_state)
            restore_rng_state(checkpoint.rng)
        return model, model_warnings

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is not None:
            self.notify_failure(error)
        self.close()

    def close(self) -> None:
        """Release the output folder's lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- training ------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the journal has charged every planned step (nothing more may run)."""
        return self.journal.charged_steps >= self.plan.steps

    def epsilon(self) -> float:
        """ε of everything the journal charged (both partitions), by the plan's accountant."""
        return self.journal.epsilon(self.plan.delta, self.plan.accountant)

    def stopping(self, stop: Callable[[], bool]) -> bool:
        """Whether to stop before the next step, agreed by every rank (so all stop after the same step; one step
        after the request when distributed, see :class:`~dptrain.distributed.StopVote`). Once yes, always yes."""
        return self._stop_vote.poll(stop())

    def stop_requested(self, stop: Callable[[], bool]) -> bool:
        """The final agreed answer once training has left its loop (no vote is left running after it)."""
        return self._stop_vote.settle(stop())

    @property
    def _writer(self) -> PrivacyJournal:
        """The journal file, which only global rank 0 opens."""
        if not isinstance(self.journal, PrivacyJournal):
            raise RuntimeError("only global rank 0 writes the privacy journal")
        return self.journal

    def _mirror(self) -> JournalMirror | None:
        """The journal's state for the other ranks (None in a single process: nobody to tell)."""
        if not self.group.distributed:
            return None
        return JournalMirror.of(self.journal, delta=self.plan.delta, accountant=self.plan.accountant)

    def _follow(self, mirror: JournalMirror | None) -> None:
        if mirror is not None and not self.group.primary:
            self.journal = mirror

    def start(self) -> None:
        """Tell the observers where this attempt starts."""
        if self.resumed_from_step or self.journal.charged_steps:
            logger.debug(
                "resumed from step %d (attempt %d; %d of %d steps already charged)",
                self.resumed_from_step,
                self.attempt,
                self.journal.charged_steps,
                self.plan.steps,
            )
        for observer in self.observers:
            observer.on_start(self.plan, resumed_from_step=self.resumed_from_step, attempt=self.attempt)

    def run_step(self) -> None:
        """One DP-SGD step on a fresh Poisson batch (of records, or of privacy units with all their records)."""
        groups: torch.Tensor | None = None
        if isinstance(self.sampler, UnitSampler):
            index, groups = self.sampler.next_batch()
            groups = groups.to(self.device)
        else:
            index = self.sampler.next_batch()
        index = index.to(self.train_set.tensors[0].device)
        features, labels = (tensor[index].to(self.device, non_blocking=True) for tensor in self.train_set.tensors[:2])
        taken = self.private.steps_taken
        self.private.step(features, labels, groups)
        if self.private.steps_taken != taken + 1:  # pragma: no cover - defensive: one noise draw per step
            raise RuntimeError("the optimizer did not take exactly one noisy step")
        self.step += 1

    def run_chunk(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Charge the next chunk in the journal, then run it; True if it ran to its end (else ``stop`` fired)."""
        chunk = self._charge_chunk()
        if chunk <= 0:
            return True
        spent = self.epsilon()
        for index in range(chunk):
            if self.stopping(stop):  # a signal arrived between steps: run no further step (interrupt checkpoints)
                return False
            self.run_step()
            self.history.append({"step": float(self.step), "epsilon": spent})
            last = index == chunk - 1
            if last:
                if self._release_due():
                    self.release()
                    spent = self.epsilon()
                self.save_checkpoint()
            self._notify_step(spent, last=last)
        return True

    def _charge_chunk(self) -> int:
        """Charge the next chunk in rank 0's journal; every rank learns its size only once the intent is on disk.

        Write-ahead: the chunk is durably charged before any of its steps runs. Distributed, the broadcast that
        hands the size (and the journal's new state) to the other ranks is the barrier behind that fsync.
        """

        def charge() -> tuple[int, JournalMirror | None]:
            chunk = min(self.job.spec.checkpoint.every_steps, self.journal.remaining(TRAIN))
            if chunk > 0:
                self._writer.append_intent(chunk, attempt=self.attempt, start_step=self.step)
            return chunk, self._mirror()

        chunk, mirror = from_primary(self.group, charge, what="charging the next chunk")
        self._follow(mirror)
        return chunk

    def _release_due(self) -> bool:
        if not self.group.primary:
            return False
        released = self.journal.charged_releases
        return (
            self.journal.remaining(HOLDOUT) > 0
            and released < len(self.schedule)
            and (self.step >= self.schedule[released] or self.done)
        )

    def release(self) -> None:
        """Release the held-out metrics with DP: charge one release to the holdout partition, then compute it.

        Rank 0 only: it holds the whole holdout, so the release is one Gaussian mechanism as in a single process.
        """
        self._writer.append_intent(1, attempt=self.attempt, start_step=self.step, partition=HOLDOUT)
        assert self.plan.holdout_noise_multiplier is not None  # a holdout partition exists in the journal
        noisy = dp_release_sums(
            self.private.model,
            self.holdout_set,
            num_classes=self.data.num_classes,
            noise_multiplier=self.plan.holdout_noise_multiplier,
            bits=self.release_noise,
            device=self.device,
        )
        self.eval_metrics = metrics_from_sums(noisy, num_classes=self.data.num_classes)
        self.history.append({"step": float(self.step), "epsilon": self.epsilon(), "released": 1.0, **self.eval_metrics})
        if self.step == 0:
            self._check_declared_size(float(noisy[0]))

    def release_at_start(self) -> None:
        """The release scheduled before the first DP-SGD step (a fresh run with at least two releases): the initial
        model's held-out metrics, and the declared-size check. Every rank stops if rank 0's check fails."""
        from_primary(self.group, lambda: self.release() if self._release_due() else None, what="checking the size")

    def _check_declared_size(self, noisy_count: float) -> None:
        """Fail (DeclaredSizeMismatch) when the DP count of held-out records is far from the declared size's share:
        a wrong path, an empty or truncated file would otherwise train a useless model without a word."""
        assert self.plan.holdout_noise_multiplier is not None
        noise_std = self.plan.holdout_noise_multiplier * sensitivity(self.data.num_classes)
        expected = float(self.plan.eval_size)
        if declared_size_mismatch(noisy_count, expected=expected, noise_std=noise_std):
            raise DeclaredSizeMismatchError(
                f"the held-out records number about {max(noisy_count, 0.0):.0f} (a DP release, noise std "
                f"{noise_std:.3g}) where the declared size implies about {expected:.0f}: the data does not hold the "
                "records declared (a wrong path? an empty or truncated file? numExamples?). Nothing was trained; "
                "one held-out release is charged"
            )

    def save_checkpoint(self) -> None:
        """Write the checkpoint (atomically): model, optimizer, step, RNG states and where the journal stood.

        Rank 0 only: every rank holds the same model and optimizer state (each applies the same all-reduced step).
        """
        if not self.group.primary:
            self.checkpointed_step = self.step
            return
        save_checkpoint(
            self.workdir / CHECKPOINT_NAME,
            Checkpoint(
                step=self.step,
                model_state={k: v.detach().cpu() for k, v in unwrap_model(self.private.model).state_dict().items()},
                optimizer_state=self.private.optimizer.state_dict(),
                job_hash=self.job_hash,
                plan=self.plan.to_dict(),
                journal_entries=len(self.journal.entries),
                charged_steps=self.journal.charged_steps,
                attempt=self.attempt,
                rng=capture_rng_state(),
                eval_metrics=self.eval_metrics,
                history=self.history,
            ),
        )
        self.checkpointed_step = self.step
        logger.debug("checkpoint at step %d (%d steps charged)", self.step, self.journal.charged_steps)

    def _notify_step(self, spent: float, *, last: bool) -> None:
        progress = Progress(
            step=self.step,
            total_steps=self.plan.steps,
            epoch=self.step * self.plan.sample_rate,
            loss=self.eval_metrics.get("loss"),
            epsilon_spent=spent,
            eval_metric=self.data.eval_metric,
            eval_value=self.eval_metrics.get(self.data.eval_metric),
            charged_steps=self.journal.charged_steps,
            charged_releases=self.journal.charged_releases,
            attempt=self.attempt,
            checkpointed=last,
            eval_metrics=dict(self.eval_metrics),
        )
        for observer in self.observers:
            observer.on_step(progress)

    # --- ending --------------------------------------------------------------------------------------

    def interrupt(self, exit_code: int) -> TrainingInterrupted:
        """Checkpoint what ran since the last checkpoint; the error to raise for a requested stop."""
        if self.checkpointed_step != self.step:
            self.save_checkpoint()
        return TrainingInterrupted(
            f"stopped by a signal after step {self.step} of {self.plan.steps}; checkpointed, and the journal already "
            f"charged {self.journal.charged_steps} steps. Run again to resume.",
            exit_code=exit_code,
            step=self.step,
        )

    def finish(self) -> TrainingResult:
        """Release held-out metrics if none was, export the model and report the result.

        Distributed, rank 0 does the release and the export, and hands the final journal state and release to the
        other ranks, whose results then tell the same numbers (``model_path`` is rank 0's file).
        """
        if self.group.primary and self.journal.remaining(HOLDOUT) > 0 and not self.eval_metrics:
            self.release()  # at least one release of a final model
            self.save_checkpoint()
        self._share_final()
        run_warnings = list(self.model_warnings)
        if self.step < self.plan.steps:
            message = (
                f"the model ran {self.step} of the plan's {self.plan.steps} steps: crashed attempts used up the rest "
                "of the privacy budget (their steps stay charged)"
            )
            logger.warning("%s", message)
            run_warnings.append(message)
        result = TrainingResult(
            plan=self.plan,
            steps_run=self.step,
            epsilon=self.epsilon(),
            journal=self.journal.entries,
            eval_metrics=self.eval_metrics,
            history=self.history,
            clipping_mode=self.private.clipping_mode,
            elapsed_seconds=time.monotonic() - self.started,
            attempts=max(self.journal.attempts, 1),
            model_path=(
                export_model(self.workdir / MODEL_NAME, self.private.model)
                if self.group.primary
                else self.workdir / MODEL_NAME
            ),
            charged_steps=self.journal.charged_steps,
            charged_releases=self.journal.charged_releases,
            resumed_from_step=self.resumed_from_step,
            eval_metric=self.data.eval_metric,
            dataset=self.data.name,
            device=str(self.device),
            threads=self.threads,
            warnings=run_warnings,
            workdir=self.workdir,
            world_size=self.group.world_size,
        )
        for observer in self.observers:
            observer.on_finish(result)
        return result

    def _share_final(self) -> None:
        if not self.group.distributed:
            return
        mirror, metrics = from_primary(
            self.group, lambda: (self._mirror(), dict(self.eval_metrics)), what="finishing the run"
        )
        self._follow(mirror)
        if not self.group.primary:
            self.eval_metrics = metrics

    def notify_failure(self, error: BaseException) -> None:
        """Tell observers that can hear it (``on_failure``) what the journal charged before ``error``."""
        try:
            spent = self.epsilon() if self.journal.exists else 0.0
        except Exception:  # pragma: no cover - accounting must not mask the original error
            spent = self.plan.planned_epsilon  # the most the journal can ever hold
        for observer in self.observers:
            if isinstance(observer, FailureObserver):
                try:
                    observer.on_failure(
                        error, epsilon_spent=spent, charged_steps=self.journal.charged_steps, step=self.step
                    )
                except Exception:  # pragma: no cover
                    logger.exception("observer %r failed in on_failure", observer)


def _open_shared(
    job: DPTrainingJob,
    plan: TrainingPlan,
    workdir: Path,
    *,
    expect_journal: bool,
    lock: contextlib.ExitStack,
    group: Group,
) -> tuple[JournalView, Checkpoint | None]:
    """Rank 0 locks ``workdir`` and opens its journal and checkpoint; the other ranks get the checkpoint and the
    journal's state from it (or fail with rank 0's error)."""
    opened_here: list[tuple[PrivacyJournal, Checkpoint | None]] = []

    def open_on_rank_0() -> _Opened:
        lock.enter_context(workdir_lock(workdir))
        journal, checkpoint = _open_journal(job, plan, workdir, expect_journal=expect_journal)
        opened_here.append((journal, checkpoint))
        if not group.distributed:
            return _Opened(checkpoint=None, journal=None)
        # The others need the weights, the optimizer state and the step; the history and releases stay here.
        shared = dataclasses.replace(checkpoint, history=[], eval_metrics={}) if checkpoint is not None else None
        return _Opened(
            checkpoint=shared, journal=JournalMirror.of(journal, delta=plan.delta, accountant=plan.accountant)
        )

    opened = from_primary(group, open_on_rank_0, what="opening the privacy journal")
    if opened_here:
        return opened_here[0]
    assert opened.journal is not None  # rank 0 sends its journal's state whenever there are other ranks
    return opened.journal, opened.checkpoint


def _open_journal(
    job: DPTrainingJob, plan: TrainingPlan, workdir: Path, *, expect_journal: bool
) -> tuple[PrivacyJournal, Checkpoint | None]:
    """The journal (created, or checked to belong to this job and plan) and the checkpoint it covers."""
    journal = PrivacyJournal(workdir / JOURNAL_NAME)
    if expect_journal and not journal.exists:
        raise JournalLostError(
            f"this is a retry, but the privacy journal {journal.path} is missing: what the earlier attempts spent "
            "is unknown, so nothing more may run (their reservation stays charged in full); create a new job"
        )
    checkpoint_path = workdir / CHECKPOINT_NAME
    checkpoint = load_checkpoint(checkpoint_path, job_hash=job_fingerprint(job), plan=plan.mechanism_key())
    if checkpoint is not None and not journal.exists:
        raise JournalError(
            f"{checkpoint_path} is at step {checkpoint.step} but the privacy journal {journal.path} is missing: "
            "the privacy spent by the steps that ran is unknown; refusing to train"
        )
    journal.initialise(job_hash=job_fingerprint(job), mechanisms=plan.mechanisms())
    if checkpoint is not None and max(checkpoint.step, checkpoint.charged_steps) > journal.charged_steps:
        raise JournalError(
            f"{checkpoint_path} is at step {checkpoint.step} (with {checkpoint.charged_steps} steps charged) but "
            f"the privacy journal charges only {journal.charged_steps}: journal entries were lost; refusing to train"
        )
    return journal, checkpoint


def train(
    job: DPTrainingJob,
    data: DataSource,
    plan: TrainingPlan,
    *,
    workdir: Path,
    dataset: PrivateDataset | None = None,
    expect_journal: bool = False,
    observers: Sequence[TrainingObserver] = (),
    device: torch.device | None = None,
    stop_event: threading.Event | None = None,
    stop_exit_code: int = ExitCode.TERMINATED,
    clipping_mode: str | None = None,
    base_dir: Path | None = None,
    group: Group = SINGLE_PROCESS,
) -> TrainingResult:
    """Train ``job`` on ``data`` under ``plan``, resuming from ``workdir``'s checkpoint when there is one.

    ``dataset`` is the job's PrivateDataset (its identity fixes the holdout). ``expect_journal`` (a retry):
    a missing journal fails instead of starting afresh. ``stop_event`` (set by a SIGTERM handler) ends
    training after the current step: the model is checkpointed and :class:`TrainingInterrupted` raised
    (exit code ``stop_exit_code``). ``clipping_mode`` forces "bookkeeping" or Opacus' grad_sample_mode
    ("ghost"/"hooks"); auto by default. ``base_dir`` resolves a relative ``model.pretrainedWeights`` path.
    ``group``: this process's place in a distributed run (see the module docstring); one process by default.
    """

    def stop() -> bool:
        return stop_event is not None and stop_event.is_set()

    run = TrainingRun.open(
        job,
        data,
        plan,
        workdir=workdir,
        dataset=dataset,
        expect_journal=expect_journal,
        observers=observers,
        device=device,
        clipping_mode=clipping_mode,
        base_dir=base_dir,
        group=group,
    )
    with run, warnings.catch_warnings():
        # Opacus' ghost clipping triggers torch's "full backward hook ... no inputs require gradients"
        # warning on every backward pass of a first layer: harmless, and it drowns the progress output.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        run.start()
        run.release_at_start()
        completed = True
        while not run.done and not run.stopping(stop):
            completed = run.run_chunk(stop)
        if run.stop_requested(stop) and not (completed and run.done):
            raise run.interrupt(stop_exit_code)
        return run.finish()
