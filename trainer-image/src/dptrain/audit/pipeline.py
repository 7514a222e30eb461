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

from dptrain.audit.bound import GuessCount, best_lower_bound
from dptrain.audit.canaries import GradientProbe, guess_counts, input_canaries, input_scores
from dptrain.audit.standin import DataChoice, StandIn, stand_in_data
from dptrain.checkpoint import unwrap_model
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

Kind = Literal["gradient", "input", "both"]
KINDS: Final = ("gradient", "input", "both")
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

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise AuditError(f"an audit needs at least 2 canaries, got {self.canaries}")
        if self.kind not in KINDS:
            raise AuditError(f"canary kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 < self.confidence < 1.0:
            raise AuditError(f"confidence must be in (0, 1), got {self.confidence}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("gradient", "input") if self.kind == "both" else (self.kind,)


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
class _Canaries:
    """Both populations with their coin flips, and the augmented training set (stand-in + included input canaries)."""

    input_features: torch.Tensor
    input_labels: torch.Tensor
    input_in: npt.NDArray[np.bool_]
    gradient_in: npt.NDArray[np.bool_]
    features: torch.Tensor
    labels: torch.Tensor
    gradient_ids: torch.Tensor
    """Probe coordinate of each included gradient canary, in sampler order after the model's records."""


def _draw(settings: AuditSettings, stand_in: StandIn, rng: np.random.Generator) -> _Canaries:
    m_input = settings.canaries if "input" in settings.kinds else 0
    m_gradient = settings.canaries if "gradient" in settings.kinds else 0
    features, labels = input_canaries(
        m_input, input_shape=stand_in.input_shape, num_classes=stand_in.num_classes, rng=rng
    )
    input_in = rng.integers(0, 2, size=m_input).astype(bool)  # a fair coin per canary
    gradient_in = rng.integers(0, 2, size=m_gradient).astype(bool)
    return _Canaries(
        input_features=features,
        input_labels=labels,
        input_in=input_in,
        gradient_in=gradient_in,
        features=torch.cat([stand_in.features, features[torch.from_numpy(input_in)]]),
        labels=torch.cat([stand_in.labels, labels[torch.from_numpy(input_in)]]),
        gradient_ids=torch.from_numpy(np.flatnonzero(gradient_in)),
    )


def _train(
    private: PrivateTraining, canaries: _Canaries, plan: TrainingPlan, probe: GradientProbe | None, device: torch.device
) -> None:
    """plan.steps DP-SGD steps, every record (canaries too) Poisson-sampled at the plan's q, as the engine does."""
    records = len(canaries.labels)
    bits = fresh_bits(secure=private.optimizer.secure_noise)  # as the engine's sampler
    sampler = PoissonSampler(records + len(canaries.gradient_ids), sample_rate=plan.sample_rate, bits=bits)
    for _ in range(plan.steps):
        batch = sampler.next_batch()
        model_part = batch[batch < records]
        if probe is not None:
            probe.sample(canaries.gradient_ids[batch[batch >= records] - records])
        taken = private.steps_taken
        private.step(canaries.features[model_part].to(device), canaries.labels[model_part].to(device))
        if private.steps_taken != taken + 1:  # pragma: no cover - defensive, as in the engine
            raise RuntimeError("the optimizer did not take exactly one noisy step")


def _kind_results(
    canaries: _Canaries, private: PrivateTraining, probe: GradientProbe | None, plan: TrainingPlan, device: torch.device
) -> list[KindResult]:
    results = []
    if probe is not None:
        scores = probe.scores.numpy()
        # Two thresholds fixed by public numbers before any score is seen: half of where an included canary lands
        # on average without noise (sampled q·T times, C each), and half of one sampling (C/2: without noise, every
        # canary sampled at least once is above it, every excluded one, at 0, below).
        clip = probe.canary_norm
        thresholds = (plan.sample_rate * probe.noisy_steps * clip / 2.0, clip / 2.0)
        counts = guess_counts(scores, canaries.gradient_in, kind="gradient", thresholds=thresholds)
        results.append(KindResult("gradient", len(scores), int(canaries.gradient_in.sum()), counts, []))
    if len(canaries.input_in):
        model = unwrap_model(private.model)
        scores = input_scores(model, canaries.input_features, canaries.input_labels, device=device)
        counts = guess_counts(scores, canaries.input_in, kind="input")
        results.append(KindResult("input", len(scores), int(canaries.input_in.sum()), counts, []))
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

    ``base_dir`` resolves a relative ``model.pretrainedWeights`` path, as for training."""
    settings = settings or AuditSettings()
    started = time.monotonic()
    plan = plan or make_plan(job, dataset=dataset)
    configure_threads()
    device = select_device(device)
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little")
    rng = np.random.default_rng(seed)
    stand_in = stand_in_data(job, plan, dataset=dataset, choice=settings.data, rng=rng)
    canaries = _draw(settings, stand_in, rng)
    model, _ = build_job_model(
        job, input_shape=stand_in.input_shape, num_classes=stand_in.num_classes, base_dir=base_dir
    )
    private = make_job_private(
        job,
        plan,
        model,
        device=device,
        input_shape=stand_in.input_shape,
        noise_multiplier=None if settings.private else 0.0,
        max_grad_norm=None if settings.private else NON_PRIVATE_CLIP,
    )
    probe = (
        GradientProbe(private.optimizer, size=len(canaries.gradient_in), device=device)
        if len(canaries.gradient_in)
        else None
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        _train(private, canaries, plan, probe, device)
    kinds = _kind_results(canaries, private, probe, plan, device)
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
        clipping_mode=private.clipping_mode,
        noise_multiplier=float(private.optimizer.noise_multiplier),
        max_grad_norm=float(private.optimizer.max_grad_norm),
        noisy_steps=private.steps_taken,
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
