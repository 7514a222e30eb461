"""One audit run: the job's own DP-SGD pipeline, trained once with canaries on stand-in data, then the bound.

Built through the engine's own functions (:func:`dptrain.engine.build_job_model`,
:func:`dptrain.engine.make_job_private`, :class:`dptrain.dpsgd.PoissonSampler`): the job's model and its
initialisation, optimizer, clipping mode, σ, C, noise construction and expected batch size, Poisson sampling
at the plan's q, and the plan's number of steps. Nothing is charged: no journal, no ledger, no checkpoint; the
audit trains on public or synthetic records only (:mod:`dptrain.audit.standin`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

from dptrain.audit.bound import GuessCount, best_lower_bound
from dptrain.audit.canaries import GradientProbe, guess_counts, input_canaries, input_scores, poisoned_canaries
from dptrain.audit.ranks import run_ranks
from dptrain.audit.standin import DataChoice, StandIn, stand_in_data
from dptrain.checkpoint import unwrap_model
from dptrain.data import shard_mask
from dptrain.distributed import SINGLE_PROCESS, Group
from dptrain.dpsgd import PoissonSampler, PrivateTraining
from dptrain.engine import build_job_model, make_job_private
from dptrain.errors import AuditError
from dptrain.plan import TrainingPlan, make_plan
from dptrain.randomness import fresh_bits
from dptrain.runtime import configure_threads, select_device
from dptrain_accounting import compute_epsilon
from dptrain_api import DPTrainingJob, PrivateDataset

__all__ = ["KINDS", "AuditResult", "AuditSettings", "KindResult", "run_audit"]

logger = logging.getLogger(__name__)

Kind = Literal["gradient", "input", "poisoned", "both", "all"]
KINDS: Final = ("gradient", "input", "poisoned", "both", "all")
NON_PRIVATE_CLIP: Final = 1e6
"""The clipping bound of the non-private baseline: far above any per-example gradient norm of these models."""


@dataclass(frozen=True)
class AuditSettings:
    """How to audit (the CLI flags and the DPTrainingJob's ``spec.audit``)."""

    canaries: int = 1000
    """m: canaries of each kind, each included with probability ½."""
    kind: Kind = "both"
    confidence: float = 0.95
    data: DataChoice = "auto"
    private: bool = True
    """False: the same pipeline with noise and clipping switched off (the baseline that shows the audit's power)."""
    seed: int | None = None
    """Seeds the canaries and their coin flips (tests); the DP noise and sampling always come fresh from the OS."""
    processes: int = 1
    """More than 1: the DP-SGD steps run through the distributed path (keyed shards, all-reduced clipped sums, noise
    added once by rank 0), in that many gloo processes on this machine."""

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise AuditError(f"an audit needs at least 2 canaries, got {self.canaries}")
        if self.kind not in KINDS:
            raise AuditError(f"canary kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 < self.confidence < 1.0:
            raise AuditError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 1 <= self.processes <= 8:
            raise AuditError(f"an audit runs on 1 to 8 processes, got {self.processes}")

    @property
    def kinds(self) -> tuple[str, ...]:
        if self.kind == "both":
            return ("gradient", "input")
        if self.kind == "all":
            return ("gradient", "input", "poisoned")
        return (self.kind,)


@dataclass(frozen=True)
class KindResult:
    """One population of canaries: how many, how many were in, and every guessing rule's outcome."""

    kind: str
    canaries: int
    included: int
    counts: list[GuessCount]
    bounds: list[float]
    """ε̂ of each rule (each at the Bonferroni-corrected confidence)."""


@dataclass(frozen=True)
class AuditResult:
    """An audit's outcome: ε̂ next to the ε the job claims, and how it was measured."""

    job_name: str
    settings: AuditSettings
    plan: TrainingPlan
    epsilon_lower_bound: float
    best: GuessCount | None
    """The guessing rule that gave ε̂ (None when ε̂ = 0)."""
    claimed_epsilon: float
    """ε the job claims for a training record: the plan's DP-SGD steps, at δ, by the plan's accountant."""
    kinds: list[KindResult]
    stand_in: str
    data_source: str
    records: int
    clipping_mode: str
    noise_multiplier: float
    max_grad_norm: float
    noisy_steps: int
    wall_seconds: float
    rules: int = field(default=0)
    """Guessing rules tried (the confidence is split among them)."""

    @property
    def contradicted(self) -> bool:
        """ε̂ above the claimed ε: at the stated confidence, the pipeline is NOT as private as claimed."""
        return self.settings.private and self.epsilon_lower_bound > self.claimed_epsilon


@dataclass
class _Population:
    """Record canaries of one kind: their features and labels, and which were included (a fair coin each)."""

    features: torch.Tensor
    labels: torch.Tensor
    included: npt.NDArray[np.bool_]


@dataclass
class _Canaries:
    """Every population with its coin flips, and the augmented training set (stand-in + included record canaries)."""

    records: dict[str, _Population]
    """Record canaries by kind (input, poisoned): trained through the job's clipping, scored by their loss."""
    gradient_in: npt.NDArray[np.bool_]
    features: torch.Tensor
    labels: torch.Tensor
    gradient_ids: torch.Tensor
    """Probe coordinate of each included gradient canary, in sampler order after the model's records."""


def _draw(settings: AuditSettings, stand_in: StandIn, model: torch.nn.Module, rng: np.random.Generator) -> _Canaries:
    shape, classes = stand_in.input_shape, stand_in.num_classes
    records: dict[str, _Population] = {}
    for kind in ("input", "poisoned"):
        if kind not in settings.kinds:
            continue
        if kind == "input":
            features, labels = input_canaries(settings.canaries, input_shape=shape, num_classes=classes, rng=rng)
        else:
            features, labels = poisoned_canaries(settings.canaries, model=model, input_shape=shape, rng=rng)
        records[kind] = _Population(features, labels, rng.integers(0, 2, size=settings.canaries).astype(bool))
    m_gradient = settings.canaries if "gradient" in settings.kinds else 0
    gradient_in = rng.integers(0, 2, size=m_gradient).astype(bool)  # a fair coin per canary
    chosen = [
        (p.features[torch.from_numpy(p.included)], p.labels[torch.from_numpy(p.included)]) for p in records.values()
    ]
    return _Canaries(
        records=records,
        gradient_in=gradient_in,
        features=torch.cat([stand_in.features, *(f for f, _ in chosen)]),
        labels=torch.cat([stand_in.labels, *(y for _, y in chosen)]),
        gradient_ids=torch.from_numpy(np.flatnonzero(gradient_in)),
    )


_SHARD_KEY: Final = b"dptrain/audit/shards/v1"
"""Keys the audit's shards (public: the audit trains on public or synthetic records, with public canaries)."""


@dataclass(frozen=True)
class _Setup:
    """One audit's fixed inputs: the job and plan, how to audit, where, and the canaries drawn."""

    job: DPTrainingJob
    plan: TrainingPlan
    settings: AuditSettings
    device: torch.device
    input_shape: tuple[int, ...]
    canaries: _Canaries


@dataclass(frozen=True)
class _Trained:
    """What the audit needs of a training run: the final weights, the probe's scores, the noisy steps."""

    model_state: dict[str, torch.Tensor]
    probe_scores: torch.Tensor | None
    noisy_steps: int
    clipping_mode: str
    noise_multiplier: float
    max_grad_norm: float


def _train(setup: _Setup, private: PrivateTraining, probe: GradientProbe | None, group: Group) -> None:
    """plan.steps DP-SGD steps, every record (canaries too) Poisson-sampled at the plan's q, as the engine does.

    Distributed (``group``), each rank samples its keyed shard of the records at the GLOBAL q and the clipped sums
    are all-reduced; rank 0 alone adds the noise, so it alone holds the probe and samples the gradient canaries."""
    canaries, plan = setup.canaries, setup.plan
    mine = shard_mask(
        TensorDataset(canaries.features, canaries.labels), shards=group.world_size, index=group.rank, key=_SHARD_KEY
    )
    features, labels = canaries.features[mine], canaries.labels[mine]
    records = len(labels)
    gradient_ids = canaries.gradient_ids if group.primary else canaries.gradient_ids[:0]
    bits = fresh_bits(secure=private.optimizer.secure_noise)  # as the engine's sampler
    sampler = PoissonSampler(records + len(gradient_ids), sample_rate=plan.sample_rate, bits=bits)
    for _ in range(plan.steps):
        batch = sampler.next_batch()
        model_part = batch[batch < records]
        if probe is not None:
            probe.sample(gradient_ids[batch[batch >= records] - records])
        taken = private.steps_taken
        private.step(features[model_part].to(setup.device), labels[model_part].to(setup.device))
        if private.steps_taken != taken + 1:  # pragma: no cover - defensive, as in the engine
            raise RuntimeError("the optimizer did not take exactly one noisy step")


def _run_training(setup: _Setup, model: torch.nn.Module, group: Group = SINGLE_PROCESS) -> _Trained:
    """The job's DP-SGD pipeline (its own make_job_private) over the canaries, on this rank of ``group``."""
    private = make_job_private(
        setup.job,
        setup.plan,
        model,
        device=setup.device,
        input_shape=setup.input_shape,
        noise_multiplier=None if setup.settings.private else 0.0,
        max_grad_norm=None if setup.settings.private else NON_PRIVATE_CLIP,
        distributed=group.distributed,
    )
    gradient_canaries = len(setup.canaries.gradient_in)
    probe = (
        GradientProbe(private.optimizer, size=gradient_canaries, device=setup.device)
        if gradient_canaries and group.primary
        else None
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        _train(setup, private, probe, group)
    return _Trained(
        model_state={k: v.detach().cpu().clone() for k, v in unwrap_model(private.model).state_dict().items()},
        probe_scores=probe.scores.clone() if probe is not None else None,
        noisy_steps=private.steps_taken,
        clipping_mode=private.clipping_mode,
        noise_multiplier=float(private.optimizer.noise_multiplier),
        max_grad_norm=float(private.optimizer.max_grad_norm),
    )


def _kind_results(setup: _Setup, model: torch.nn.Module, trained: _Trained) -> list[KindResult]:
    canaries, results = setup.canaries, []
    if trained.probe_scores is not None:
        scores = trained.probe_scores.numpy()
        # Two thresholds fixed by public numbers before any score is seen: half of where an included canary lands
        # on average without noise (sampled q·T times, C each), and half of one sampling (C/2: without noise, every
        # canary sampled at least once is above it, every excluded one, at 0, below).
        clip = trained.max_grad_norm
        thresholds = (setup.plan.sample_rate * trained.noisy_steps * clip / 2.0, clip / 2.0)
        counts = guess_counts(scores, canaries.gradient_in, kind="gradient", thresholds=thresholds)
        results.append(KindResult("gradient", len(scores), int(canaries.gradient_in.sum()), counts, []))
    for kind, population in canaries.records.items():
        scores = input_scores(unwrap_model(model), population.features, population.labels, device=setup.device)
        counts = guess_counts(scores, population.included, kind=kind)
        results.append(KindResult(kind, len(scores), int(population.included.sum()), counts, []))
    return results


def run_audit(
    job: DPTrainingJob,
    *,
    dataset: PrivateDataset | None = None,
    settings: AuditSettings | None = None,
    plan: TrainingPlan | None = None,
    device: torch.device | None = None,
    base_dir: Path | None = None,
) -> AuditResult:
    """Audit ``job``'s pipeline once (see the module docstring); nothing is charged and nothing is written.

    ``base_dir`` resolves a relative ``model.pretrainedWeights`` path, as for training. ``settings.processes`` > 1
    runs the DP-SGD steps through the distributed path (that many gloo ranks on this machine)."""
    settings = settings or AuditSettings()
    started = time.monotonic()
    plan = plan or make_plan(job, dataset=dataset)
    configure_threads(processes=settings.processes)
    device = select_device(device)
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little")
    rng = np.random.default_rng(seed)
    stand_in = stand_in_data(job, plan, dataset=dataset, choice=settings.data, rng=rng)
    model, _ = build_job_model(
        job, input_shape=stand_in.input_shape, num_classes=stand_in.num_classes, base_dir=base_dir
    )
    setup = _Setup(job, plan, settings, device, stand_in.input_shape, _draw(settings, stand_in, model, rng))
    if settings.processes > 1:
        trained = run_ranks(lambda group: _run_training(setup, model, group), world=settings.processes)
    else:
        trained = _run_training(setup, model)
    unwrap_model(model).load_state_dict(trained.model_state)
    kinds = _kind_results(setup, model, trained)
    counts = [count for kind in kinds for count in kind.counts]
    epsilon, best, bounds = best_lower_bound(counts, delta=plan.delta, confidence=settings.confidence)
    kinds = _with_bounds(kinds, bounds)
    claimed = (
        compute_epsilon([plan.segment], delta=plan.delta, accountant=plan.accountant) if settings.private else math.inf
    )
    return AuditResult(
        job_name=job.metadata.name or "job",
        settings=settings,
        plan=plan,
        epsilon_lower_bound=epsilon,
        best=best,
        claimed_epsilon=claimed,
        kinds=kinds,
        stand_in=stand_in.description,
        data_source=stand_in.source,
        records=len(stand_in.labels),
        clipping_mode=trained.clipping_mode,
        noise_multiplier=trained.noise_multiplier,
        max_grad_norm=trained.max_grad_norm,
        noisy_steps=trained.noisy_steps,
        wall_seconds=time.monotonic() - started,
        rules=len(counts),
    )


def _with_bounds(kinds: list[KindResult], bounds: list[float]) -> list[KindResult]:
    out, start = [], 0
    for kind in kinds:
        stop = start + len(kind.counts)
        out.append(KindResult(kind.kind, kind.canaries, kind.included, kind.counts, bounds[start:stop]))
        start = stop
    return out
