"""Prometheus exporter for a training run (an observer of the engine), on its own registry.

Every series carries ``job`` and ``namespace`` labels. ε, δ, σ, q and the step counts are privacy
parameters (public); the held-out loss and eval metrics are the DP releases (the training loss is
never exported); throughput comes from the expected batch size and wall time (timing is not DP). The privacy
audit's ε̂ (spec.audit) is computed on stand-in data, never on the job's records.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from dptrain.events import Progress, TrainingResult
from dptrain_api import PodEnv, TrainerMetric

if TYPE_CHECKING:
    from dptrain.plan import TrainingPlan
    from dptrain_api.job import DPTrainingJob

__all__ = ["PrometheusExporter", "metric_labels"]

_LABELS: Final = ("job", "namespace")


def metric_labels(job: DPTrainingJob | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``job``/``namespace`` from DPTRAIN_JOB_NAME/DPTRAIN_JOB_NAMESPACE, else the manifest, else local/default."""
    env = os.environ if environ is None else environ
    name = env.get(PodEnv.JOB_NAME) or (job.metadata.name if job is not None else None) or "local"
    namespace = env.get(PodEnv.JOB_NAMESPACE) or (job.metadata.namespace if job is not None else None) or "default"
    return {"job": name, "namespace": namespace}


class PrometheusExporter:
    """Serves the run's gauges over HTTP (``start``) and updates them as the engine reports progress."""

    def __init__(self, *, labels: Mapping[str, str], port: int = 0, address: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {key: str(labels[key]) for key in _LABELS}
        self.port = port
        self.address = address
        self._server: Any = None
        self._thread: Any = None
        self._steps_seen = 0
        names = list(_LABELS)

        def gauge(name: TrainerMetric, documentation: str) -> Gauge:
            return Gauge(name, documentation, names, registry=self.registry)

        self.epsilon_spent = gauge(
            TrainerMetric.EPSILON_SPENT, "Privacy loss ε charged so far by the write-ahead journal (valid upper bound)"
        )
        self.epsilon_target = gauge(TrainerMetric.EPSILON_TARGET, "The job's ε budget")
        self.delta = gauge(TrainerMetric.DELTA, "δ of the (ε, δ) guarantee")
        self.noise_multiplier = gauge(
            TrainerMetric.NOISE_MULTIPLIER, "σ: Gaussian noise std relative to the clipping norm"
        )
        self.sample_rate = gauge(TrainerMetric.SAMPLE_RATE, "Poisson sampling rate q")
        self.holdout_loss = gauge(TrainerMetric.HOLDOUT_LOSS, "Latest held-out loss, released with DP")
        self.eval_accuracy = gauge(TrainerMetric.EVAL_ACCURACY, "Latest held-out accuracy, released with DP")
        self.eval_auc = gauge(TrainerMetric.EVAL_AUC, "Latest held-out ROC AUC (binary tasks), released with DP")
        self.progress_ratio = gauge(TrainerMetric.PROGRESS_RATIO, "Completed steps / planned steps")
        self.planned_steps = gauge(TrainerMetric.PLANNED_STEPS, "Steps in the privacy plan")
        self.charged_releases = gauge(
            TrainerMetric.CHARGED_RELEASES, "DP releases of held-out metrics charged by the privacy journal"
        )
        self.charged_steps = gauge(
            TrainerMetric.CHARGED_STEPS, "Steps charged by the privacy journal (crashed ones too)"
        )
        self.attempt = gauge(TrainerMetric.ATTEMPT, "Attempt number of this trainer process (1 + earlier attempts)")
        self.finished = gauge(TrainerMetric.TRAINING_FINISHED, "1 once training has finished successfully, else 0")
        self.steps = Counter(TrainerMetric.STEPS, "DP-SGD steps completed (global step)", names, registry=self.registry)
        self.audit_epsilon_lower_bound = gauge(
            TrainerMetric.AUDIT_EPSILON_LOWER_BOUND,
            "Empirical privacy audit: lower bound on ε at its confidence (above the claimed ε: not as private)",
        )
        self.audit_epsilon = gauge(TrainerMetric.AUDIT_EPSILON, "The claimed ε the privacy audit is compared with")

    # --- serving ------------------------------------------------------------------------------------------

    def start(self) -> int:
        """Start serving on ``address:port`` (no-op when port is 0); returns the bound port (0 when off)."""
        if self.port == 0 or self._server is not None:
            return self.bound_port
        self._server, self._thread = start_http_server(self.port, addr=self.address, registry=self.registry)
        return self.bound_port

    @property
    def bound_port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- observer ---------------------------------------------------------------------------------------

    def _set(self, gauge: Gauge, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            gauge.labels(**self.labels).set(value)

    def _set_eval(self, metrics: Mapping[str, float]) -> None:
        self._set(self.holdout_loss, metrics.get("loss"))
        self._set(self.eval_accuracy, metrics.get("accuracy"))
        if "auc" in metrics:
            self._set(self.eval_auc, metrics["auc"])

    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None:
        self._set(self.epsilon_target, plan.target_epsilon)
        self._set(self.delta, plan.delta)
        self._set(self.noise_multiplier, plan.noise_multiplier)
        self._set(self.sample_rate, plan.sample_rate)
        self._set(self.planned_steps, plan.steps)
        self._set(self.attempt, attempt)
        self._set(self.progress_ratio, resumed_from_step / plan.steps)
        self._set(self.finished, 0)
        if resumed_from_step > self._steps_seen:
            self.steps.labels(**self.labels).inc(resumed_from_step - self._steps_seen)
            self._steps_seen = resumed_from_step
        self.steps.labels(**self.labels)  # expose 0 before the first step

    def on_step(self, progress: Progress) -> None:
        self._set(self.epsilon_spent, progress.epsilon_spent)
        self._set(self.charged_steps, progress.charged_steps)
        self._set(self.holdout_loss, progress.loss)
        self._set(self.charged_releases, progress.charged_releases)
        self._set(self.progress_ratio, progress.step / progress.total_steps)
        self._set_eval(progress.eval_metrics)
        if progress.step > self._steps_seen:
            self.steps.labels(**self.labels).inc(progress.step - self._steps_seen)
            self._steps_seen = progress.step

    def on_finish(self, result: TrainingResult) -> None:
        self._set(self.epsilon_spent, result.epsilon)
        self._set(self.charged_steps, result.charged_steps)
        self._set(self.charged_releases, result.charged_releases)
        self._set(self.progress_ratio, result.steps_run / result.plan.steps)
        self._set_eval(result.eval_metrics)
        if result.steps_run > self._steps_seen:
            self.steps.labels(**self.labels).inc(result.steps_run - self._steps_seen)
            self._steps_seen = result.steps_run
        self._set(self.finished, 1)

    def on_audit(self, *, epsilon_lower_bound: float, epsilon: float) -> None:
        """The privacy audit's result (spec.audit): exported only once an audit ran."""
        self._set(self.audit_epsilon, epsilon)
        self._set(self.audit_epsilon_lower_bound, epsilon_lower_bound)

    def on_failure(self, error: BaseException, *, epsilon_spent: float, charged_steps: int, step: int) -> None:
        self._set(self.epsilon_spent, epsilon_spent)
        self._set(self.charged_steps, charged_steps)
