"""What the engine tells observers (progress bar, Prometheus exporter, reports) while it trains."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from dptrain.plan import TrainingPlan

__all__ = ["FailureObserver", "Progress", "TrainingObserver", "TrainingResult"]


@dataclass(frozen=True)
class Progress:
    """One completed DP-SGD step."""

    step: int
    """Steps completed (global, across attempts)."""
    total_steps: int
    """Steps in the plan."""
    epoch: float
    """Expected epochs completed: step × sample rate."""
    loss: float | None
    """Latest DP-released held-out loss (None before the first release). The training loss is never read."""
    epsilon_spent: float
    """ε charged by the journal so far, including the whole current chunk (a valid upper bound)."""
    eval_metric: str
    """Name of the headline eval metric (accuracy or auc)."""
    eval_value: float | None
    """Latest DP-released value of the held-out eval metric; None before the first release."""
    """Expected examples (batchSize per step) per second over the current chunk; data-independent."""
    charged_steps: int = 0
    """Steps the journal has charged (at least ``step``)."""
    charged_releases: int = 0
    """DP releases of held-out metrics the journal has charged."""
    attempt: int = 1
    """This attempt's number (1 + earlier attempts that charged steps)."""
    checkpointed: bool = False
    """True when this step ended a chunk and a checkpoint was saved."""
    eval_metrics: Mapping[str, float] = field(default_factory=dict)
    """The latest DP release of held-out metrics (accuracy, loss, auc for binary tasks)."""


@dataclass
class TrainingResult:
    """A finished training run."""

    plan: TrainingPlan
    steps_run: int
    """Steps behind the final model (fewer than the plan's when crashed chunks were charged but rolled back)."""
    epsilon: float
    """ε of everything the journal charged, composed by the plan's accountant at the plan's δ."""
    journal: list[dict[str, Any]]
    """The journal's entries (one per charged chunk, across attempts)."""
    eval_metrics: dict[str, float]
    """The last DP release of held-out metrics (accuracy; auc for binary tasks; clipped loss)."""
    history: list[dict[str, float]]
    """Per step: step and ε charged; per release also ``released`` = 1 and the released metrics."""
    clipping_mode: str
    """"bookkeeping" (dptrain.clipping kernels), or Opacus grad_sample_mode "ghost" or "hooks"."""
    elapsed_seconds: float
    """Wall time of this attempt."""
    attempts: int
    """Attempts that charged steps (this one included)."""
    model_path: Path
    charged_steps: int = 0
    charged_releases: int = 0
    resumed_from_step: int = 0
    eval_metric: str = "accuracy"
    dataset: str = ""
    device: str = "cpu"
    threads: int = 1
    warnings: list[str] = field(default_factory=list)
    workdir: Path | None = None
    world_size: int = 1
    """Training processes (data-parallel ranks) of this attempt."""

    @property
    def eval_value(self) -> float | None:
        return self.eval_metrics.get(self.eval_metric)


@runtime_checkable
class TrainingObserver(Protocol):
    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None: ...

    def on_step(self, progress: Progress) -> None: ...

    def on_finish(self, result: TrainingResult) -> None: ...


@runtime_checkable
class FailureObserver(Protocol):
    """Optional: observers with ``on_failure`` hear about an exception that ends training."""

    def on_failure(self, error: BaseException, *, epsilon_spent: float, charged_steps: int, step: int) -> None: ...
