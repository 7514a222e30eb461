"""The DP-SGD engine: Opacus with Poisson sampling, driven by step count, charged through the journal.

Privacy invariants (each is tested):

* Poisson sampling only: every logical batch includes each training example independently with
  probability exactly ``plan.sample_rate`` (Opacus' UniformWithReplacementSampler, fed the plan's q,
  not Opacus' 1/len(loader) approximation). Empty batches still take a (noise-only) step.
* Write-ahead charging: steps run in chunks of ``checkpoint.everySteps``; each chunk is appended to
  the privacy journal and fsynced BEFORE its first step runs, then checkpointed after its last.
  A crash mid-chunk leaves the chunk charged; the resumed run continues from the checkpoint and
  charges its steps again, so it ends up to one chunk early per crash.
* The journal never charges more than ``plan.steps`` in total, so the final ε is at most ε(plan).
* The reported ε is the journal's composition (the plan's accountant, never Opacus' GDP), i.e.
  a valid upper bound for everything that ran, crashed attempts included.
* Noise and sampling come from generators seeded freshly from the OS on every attempt (never from
  the job's seed, never restored from a checkpoint). Opacus' secure_mode (torchcsprng) is not
  available with torch 2.x, so this is torch's PRNG, not a CSPRNG (the privacy report says so).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import prv
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
from dptrain.data import PreparedData, train_eval_split
from dptrain.errors import ConfigurationError, DataError, JournalError, ModelError, TrainingInterrupted
from dptrain.events import FailureObserver, Progress, TrainingObserver, TrainingResult
from dptrain.journal import JOURNAL_NAME, PrivacyJournal, workdir_lock
from dptrain.models import build_model, supports_ghost_clipping
from dptrain.plan import TrainingPlan
from dptrain_accounting import MechanismSegment
from dptrain_api.job import DPTrainingJob, TrainingSpec

__all__ = [
    "CPU_LIMIT_ENV",
    "PrivateTraining",
    "configure_threads",
    "cpu_thread_limit",
    "evaluate",
    "make_optimizer",
    "make_private_training",
    "resolve_seed",
    "select_device",
    "train",
]

logger = logging.getLogger(__name__)
prv.register()

CPU_LIMIT_ENV: Final = "DPTRAIN_CPU_LIMIT"
_CGROUP_V2_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA: Final = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD: Final = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
_EVAL_BATCH: Final = 4096


# --- threads and device ----------------------------------------------------------------------------


def _parse_cpus(text: str) -> float | None:
    """A Kubernetes CPU quantity ("2", "500m", "1.5") or a thread count, in CPUs; None if unparsable."""
    text = text.strip()
    try:
        value = float(text[:-1]) / 1000.0 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _cgroup_cpus(cpu_max: Path, v1_quota: Path, v1_period: Path) -> float | None:
    try:
        quota_text, period_text = cpu_max.read_text().split()[:2]
        if quota_text == "max":
            return None
        return int(quota_text) / int(period_text)
    except (OSError, ValueError):
        pass
    try:
        quota = int(v1_quota.read_text())
        period = int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_thread_limit(
    environ: Mapping[str, str] | None = None,
    *,
    cgroup_cpu_max: Path = _CGROUP_V2_CPU_MAX,
    cgroup_v1_quota: Path = _CGROUP_V1_QUOTA,
    cgroup_v1_period: Path = _CGROUP_V1_PERIOD,
) -> int:
    """Threads to use: DPTRAIN_CPU_LIMIT, else OMP_NUM_THREADS, else the cgroup CPU quota, else the CPU affinity.

    Never more than any of the cgroup quota and the CPUs this process may run on either, and a
    fractional limit rounds down (1.5 CPUs get 1 thread): oversubscribed OpenMP threads are very slow.
    """
    env = os.environ if environ is None else environ
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    limit: float | None = None
    for name in (CPU_LIMIT_ENV, "OMP_NUM_THREADS"):
        text = env.get(name, "")
        if text.strip():
            limit = _parse_cpus(text)
            if limit is None:
                logger.warning("ignoring %s=%r: not a CPU count", name, text)
            else:
                break
    quota = _cgroup_cpus(cgroup_cpu_max, cgroup_v1_quota, cgroup_v1_period)
    threads = available
    for bound in (limit, quota):
        if bound is not None:
            threads = min(threads, math.floor(bound))
    return max(1, threads)


def configure_threads(environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op threads to :func:`cpu_thread_limit`; returns the count."""
    threads = cpu_thread_limit(environ)
    torch.set_num_threads(threads)
    return threads


def select_device(device: torch.device | str | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_seed(job: DPTrainingJob) -> int:
    """The job's seed, else one derived from the job's fingerprint (stable across attempts of one job).

    It drives the train/eval split and the initial weights only, never the DP noise or sampling.
    """
    seed = job.spec.training.seed
    if seed is not None:
        return int(seed)
    return int(hashlib.sha256(job_fingerprint(job).encode()).hexdigest()[:15], 16)


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


# --- data, optimizer, Opacus --------------------------------------------------------------------------


class _BatchTensorDataset(TensorDataset):
    """A TensorDataset that fetches a whole batch with one index operation (DataLoader's __getitems__)."""

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.tensors[0].device)
        return tuple(tensor[index] for tensor in self.tensors)


def _keep_batch(batch: Any) -> Any:
    return batch


def make_optimizer(parameters: Any, training: TrainingSpec) -> torch.optim.Optimizer:
    """The optimizer of ``training.optimizer`` (it only ever sees clipped, noised gradients)."""
    if training.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=training.learning_rate, momentum=training.momentum, weight_decay=training.weight_decay
        )
    if training.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    raise ConfigurationError(f"unknown optimizer {training.optimizer!r}; use sgd, adam or adamw")


@dataclass
class PrivateTraining:
    """Opacus-wrapped model, optimizer and criterion, and a Poisson loader split into physical batches."""

    model: nn.Module
    optimizer: Any  # opacus DPOptimizer (or its fast-gradient-clipping or book-keeping subclass)
    criterion: Any  # nn.CrossEntropyLoss (hooks, bookkeeping) or Opacus' DPLossFastGradientClipping (ghost)
    loader: DataLoader[Any]
    """Poisson batches with rate exactly plan.sample_rate, split into physical micro-batches."""
    clipping_mode: str
    steps_taken: list[int]
    """steps_taken[0] counts optimizer steps that added noise (one per logical batch)."""


def _auto_clipping_mode(model: nn.Module) -> str:
    from dptrain.bookkeeping import supports_bookkeeping

    if supports_bookkeeping(model):
        return "bookkeeping"
    return "ghost" if supports_ghost_clipping(model) else "hooks"


def _opacus_wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: TensorDataset,
    *,
    plan: TrainingPlan,
    mode: str,
    noise_generator: torch.Generator | None,
) -> tuple[nn.Module, Any, Any]:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and accountant chatter: the report states the caveats
        engine = PrivacyEngine(secure_mode=False)
        # Opacus derives q = 1/len(loader) from this loader; we discard the loader it builds and
        # sample with exactly plan.sample_rate below. poisson_sampling=True also forbids gradient
        # accumulation across logical batches.
        template = DataLoader(dataset, batch_size=plan.batch_size)
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=template,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            noise_generator=noise_generator,
        )
    if mode == "ghost":
        private_model, private_optimizer, criterion, _ = wrapped
    else:
        private_model, private_optimizer, _ = wrapped
        criterion = nn.CrossEntropyLoss()
    return private_model, private_optimizer, criterion


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: TensorDataset,
    *,
    plan: TrainingPlan,
    noise_generator: torch.Generator | None,
    sampling_generator: torch.Generator | None,
    clipping_mode: str | None = None,
) -> PrivateTraining:
    """Wrap with Opacus (Poisson sampling, per-example clipping at plan.max_grad_norm, noise plan σ).

    ``clipping_mode``: "bookkeeping" (Linear-only models, dptrain.bookkeeping), or Opacus' "ghost" /
    "hooks"; automatic by default (the fastest that is exact for the model, benchmarks/step_time.py).
    """
    from opacus.data_loader import DPDataLoader
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("the model has no trainable parameters")
    mode = clipping_mode or _auto_clipping_mode(model)
    dataset = _BatchTensorDataset(*train_set.tensors)
    if mode == "bookkeeping":
        from dptrain.bookkeeping import BookkeepingOptimizer

        # Linear-only models: one backward pass, norms from activations × output gradients (bookkeeping.py).
        private_model: nn.Module = model
        private_optimizer: Any = BookkeepingOptimizer(
            optimizer,
            model=model,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.batch_size,
            generator=noise_generator,
        )
        criterion: Any = nn.CrossEntropyLoss()
    else:
        private_model, private_optimizer, criterion = _opacus_wrap(
            model, optimizer, dataset, plan=plan, mode=mode, noise_generator=noise_generator
        )
    # Mean reduction divides the noised sum by the EXPECTED batch size q·n (data-independent).
    private_optimizer.expected_batch_size = plan.batch_size
    steps_taken = [0]

    def _count_step(_optimizer: Any) -> None:  # replaces Opacus' own accountant hook: we account via the journal
        steps_taken[0] += 1

    private_optimizer.attach_step_hook(_count_step)
    poisson = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=sampling_generator, collate_fn=_keep_batch)
    if poisson.sample_rate != plan.sample_rate:  # pragma: no cover - defensive
        raise RuntimeError("Poisson loader sample rate differs from the plan")
    with BatchMemoryManager(
        data_loader=poisson, max_physical_batch_size=plan.physical_batch_size, optimizer=private_optimizer
    ) as physical:
        loader = physical
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        criterion=criterion,
        loader=loader,
        clipping_mode=mode,
        steps_taken=steps_taken,
    )


# --- evaluation ---------------------------------------------------------------------------------------


def evaluate(model: nn.Module, eval_set: TensorDataset, *, num_classes: int, device: torch.device) -> dict[str, float]:
    """accuracy, loss, and auc (binary tasks with both classes present) on the held-out split. NOT DP."""
    features, labels = eval_set.tensors
    if len(labels) == 0:
        return {}
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    logits = []
    try:
        with torch.no_grad():
            for start in range(0, len(labels), _EVAL_BATCH):
                batch = features[start : start + _EVAL_BATCH].to(device)
                logits.append(module(batch).float().cpu())
    finally:
        module.train(was_training)
    scores = torch.cat(logits)
    targets = labels.cpu()
    metrics = {
        "accuracy": float((scores.argmax(dim=1) == targets).float().mean()),
        "loss": float(nn.functional.cross_entropy(scores, targets)),
    }
    if num_classes == 2 and len(torch.unique(targets)) == 2:
        from sklearn.metrics import roc_auc_score

        probabilities = torch.softmax(scores, dim=1)[:, 1].numpy()
        metrics["auc"] = float(roc_auc_score(targets.numpy(), probabilities))
    return metrics


# --- training -------------------------------------------------------------------------------------------


def _notify_failure(
    observers: Sequence[TrainingObserver],
    error: BaseException,
    *,
    journal: PrivacyJournal,
    plan: TrainingPlan,
    step: int,
) -> None:
    try:
        spent = journal.epsilon(plan.delta, plan.accountant) if journal.exists else 0.0
    except Exception:  # pragma: no cover - accounting must not mask the original error
        spent = plan.planned_epsilon  # the most the journal can ever hold
    for observer in observers:
        if isinstance(observer, FailureObserver):
            try:
                observer.on_failure(error, epsilon_spent=spent, charged_steps=journal.charged_steps, step=step)
            except Exception:  # pragma: no cover
                logger.exception("observer %r failed in on_failure", observer)


def train(
    job: DPTrainingJob,
    data: PreparedData,
    plan: TrainingPlan,
    *,
    workdir: Path,
    observers: Sequence[TrainingObserver] = (),
    device: torch.device | None = None,
    stop_event: threading.Event | None = None,
    stop_exit_code: int = 143,
    clipping_mode: str | None = None,
    base_dir: Path | None = None,
) -> TrainingResult:
    """Train ``job`` on ``data`` under ``plan``, resuming from ``workdir``'s checkpoint when there is one.

    ``stop_event`` (set by a SIGTERM handler) ends training after the current step: the model is
    checkpointed and :class:`TrainingInterrupted` raised (exit code ``stop_exit_code``).
    ``clipping_mode`` forces "bookkeeping" or Opacus' grad_sample_mode ("ghost"/"hooks"); auto by default.
    ``base_dir`` resolves a relative ``model.pretrainedWeights`` path (the manifest's folder).
    """
    started = time.monotonic()
    workdir = Path(workdir)
    threads = configure_threads()
    device = select_device(device)
    job_hash = job_fingerprint(job)

    with workdir_lock(workdir):
        journal = PrivacyJournal(workdir / JOURNAL_NAME)
        checkpoint_path = workdir / CHECKPOINT_NAME
        checkpoint = load_checkpoint(checkpoint_path, job_hash=job_hash, plan=plan.mechanism_key())
        if checkpoint is not None and not journal.exists:
            raise JournalError(
                f"{checkpoint_path} is at step {checkpoint.step} but the privacy journal {journal.path} is missing: "
                "the privacy spent by the steps that ran is unknown; refusing to train"
            )
        journal.initialise(
            job_hash=job_hash,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            max_steps=plan.steps,
        )
        if checkpoint is not None and (
            checkpoint.step > journal.charged_steps or checkpoint.charged_steps > journal.charged_steps
        ):
            raise JournalError(
                f"{checkpoint_path} is at step {checkpoint.step} (with {checkpoint.charged_steps} steps charged) but "
                f"the privacy journal charges only {journal.charged_steps}: journal entries were lost; "
                "refusing to train"
            )
        attempt = journal.attempts + 1
        current_step = [checkpoint.step if checkpoint is not None else 0]
        try:
            with warnings.catch_warnings():
                # Opacus' ghost clipping triggers torch's "full backward hook ... no inputs require gradients"
                # warning on every backward pass of a first layer: harmless, and it drowns the progress output.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                return _train_locked(
                    job,
                    data,
                    plan,
                    workdir=workdir,
                    journal=journal,
                    checkpoint=checkpoint,
                    attempt=attempt,
                    observers=observers,
                    device=device,
                    threads=threads,
                    stop_event=stop_event,
                    stop_exit_code=stop_exit_code,
                    clipping_mode=clipping_mode,
                    base_dir=base_dir,
                    started=started,
                    job_hash=job_hash,
                    current_step=current_step,
                )
        except BaseException as error:
            _notify_failure(observers, error, journal=journal, plan=plan, step=current_step[0])
            raise


def _train_locked(
    job: DPTrainingJob,
    data: PreparedData,
    plan: TrainingPlan,
    *,
    workdir: Path,
    journal: PrivacyJournal,
    checkpoint: Checkpoint | None,
    attempt: int,
    observers: Sequence[TrainingObserver],
    device: torch.device,
    threads: int,
    stop_event: threading.Event | None,
    stop_exit_code: int,
    clipping_mode: str | None,
    base_dir: Path | None,
    started: float,
    job_hash: str,
    current_step: list[int],
) -> TrainingResult:
    spec = job.spec
    seed = resolve_seed(job)
    train_set, eval_set = train_eval_split(data, eval_fraction=spec.training.eval_fraction, seed=seed)
    if len(train_set) != plan.train_size:
        raise DataError(
            f"the data has {len(train_set)} training examples but the plan was made for {plan.train_size}; "
            "the sample rate would differ from the one charged"
        )

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    model, model_warnings = build_model(
        spec.model, input_shape=data.input_shape, num_classes=data.num_classes, base_dir=base_dir
    )
    for message in model_warnings:
        logger.warning("%s", message)
    if checkpoint is not None:
        unwrap_model(model).load_state_dict(checkpoint.model_state)
        restore_rng_state(checkpoint.rng)
    model = model.to(device)
    optimizer = make_optimizer(model.parameters(), spec.training)

    noise_generator = torch.Generator(device=device)
    noise_generator.manual_seed(_fresh_seed())
    sampling_generator = torch.Generator()
    sampling_generator.manual_seed(_fresh_seed())
    if device.type != "cpu":
        train_set = TensorDataset(*(t.to(device) for t in train_set.tensors))
    private = make_private_training(
        model,
        optimizer,
        train_set,
        plan=plan,
        noise_generator=noise_generator,
        sampling_generator=sampling_generator,
        clipping_mode=clipping_mode,
    )
    if checkpoint is not None:
        private.optimizer.load_state_dict(checkpoint.optimizer_state)

    step = checkpoint.step if checkpoint is not None else 0
    resumed_from_step = step
    history: list[dict[str, float]] = list(checkpoint.history) if checkpoint is not None else []
    eval_metrics: dict[str, float] = dict(checkpoint.eval_metrics) if checkpoint is not None else {}
    every = spec.checkpoint.every_steps
    if resumed_from_step or journal.charged_steps:
        logger.debug(
            "resumed from step %d (attempt %d; %d of %d steps already charged)",
            resumed_from_step,
            attempt,
            journal.charged_steps,
            plan.steps,
        )

    for observer in observers:
        observer.on_start(plan, resumed_from_step=resumed_from_step, attempt=attempt)

    batches: Iterator[Any] = iter(private.loader)

    def run_step() -> float:
        nonlocal batches
        target = private.steps_taken[0] + 1
        loss_sum, count = 0.0, 0
        while private.steps_taken[0] < target:
            try:
                features, labels = next(batches)
            except StopIteration:  # the Poisson sampler yields int(1/q) batches per pass; start another
                batches = iter(private.loader)
                continue
            features = features.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss = private.criterion(private.model(features), labels)
            loss.backward()
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
            if len(labels):
                loss_sum += float(loss.item()) * len(labels)
                count += len(labels)
        return loss_sum / count if count else math.nan

    def stop_requested() -> bool:
        return stop_event is not None and stop_event.is_set()

    def save(charged_epsilon: float) -> None:
        save_checkpoint(
            workdir / CHECKPOINT_NAME,
            Checkpoint(
                step=step,
                model_state={k: v.detach().cpu() for k, v in unwrap_model(private.model).state_dict().items()},
                optimizer_state=private.optimizer.state_dict(),
                job_hash=job_hash,
                plan=plan.to_dict(),
                journal_entries=len(journal.entries),
                charged_steps=journal.charged_steps,
                attempt=attempt,
                rng=capture_rng_state(),
                eval_metrics=eval_metrics,
                history=history,
            ),
        )
        logger.debug("checkpoint at step %d (ε charged %.4f)", step, charged_epsilon)

    checkpointed_step = step
    completed_chunk = True
    while journal.charged_steps < plan.steps and not stop_requested():
        chunk = min(every, plan.steps - journal.charged_steps)
        # Write-ahead: the chunk is durably charged before any of its steps runs.
        journal.append_intent(
            MechanismSegment(plan.noise_multiplier, plan.sample_rate, chunk), attempt=attempt, start_step=step
        )
        spent = journal.epsilon(plan.delta, plan.accountant)
        chunk_started = time.monotonic()
        completed_chunk = False
        for index in range(chunk):
            if stop_requested():  # a signal arrived between steps: run no further step
                break
            loss = run_step()
            step += 1
            current_step[0] = step
            history.append({"step": float(step), "epsilon": spent, "loss": loss})
            last = index == chunk - 1 or stop_requested()
            if last:
                eval_metrics = evaluate(private.model, eval_set, num_classes=data.num_classes, device=device)
                save(spent)
                checkpointed_step = step
            elapsed = max(time.monotonic() - chunk_started, 1e-9)
            progress = Progress(
                step=step,
                total_steps=plan.steps,
                epoch=step * plan.sample_rate,
                loss=loss,
                epsilon_spent=spent,
                eval_metric=data.eval_metric,
                eval_value=eval_metrics.get(data.eval_metric),
                examples_per_second=plan.batch_size * (index + 1) / elapsed,
                charged_steps=journal.charged_steps,
                attempt=attempt,
                checkpointed=last,
                eval_metrics=dict(eval_metrics),
            )
            for observer in observers:
                observer.on_step(progress)
        else:
            completed_chunk = True
    if stop_requested() and not (completed_chunk and journal.charged_steps >= plan.steps):
        if checkpointed_step != step:
            eval_metrics = evaluate(private.model, eval_set, num_classes=data.num_classes, device=device)
            save(journal.epsilon(plan.delta, plan.accountant))
        raise TrainingInterrupted(
            f"stopped by a signal after step {step} of {plan.steps}; checkpointed, and the journal already charged "
            f"{journal.charged_steps} steps. Run again to resume.",
            exit_code=stop_exit_code,
            step=step,
        )

    if checkpoint is not None and step == resumed_from_step and not eval_metrics:
        eval_metrics = evaluate(private.model, eval_set, num_classes=data.num_classes, device=device)
    if step < plan.steps:
        message = (
            f"the model ran {step} of the plan's {plan.steps} steps: crashed attempts used up the rest of the "
            "privacy budget (their steps stay charged)"
        )
        logger.warning("%s", message)
        model_warnings = [*model_warnings, message]
    model_path = export_model(workdir / MODEL_NAME, private.model)
    result = TrainingResult(
        plan=plan,
        steps_run=step,
        epsilon=journal.epsilon(plan.delta, plan.accountant),
        journal=journal.entries,
        eval_metrics=eval_metrics,
        history=history,
        clipping_mode=private.clipping_mode,
        elapsed_seconds=time.monotonic() - started,
        attempts=max(journal.attempts, 1),
        model_path=model_path,
        charged_steps=journal.charged_steps,
        resumed_from_step=resumed_from_step,
        eval_metric=data.eval_metric,
        dataset=data.name,
        device=str(device),
        threads=threads,
        warnings=list(model_warnings),
        workdir=workdir,
    )
    for observer in observers:
        observer.on_finish(result)
    return result
