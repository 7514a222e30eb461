"""What a run leaves behind for the operator and for auditors.

* The Kubernetes termination message (JSON, at most 4096 bytes): final or charged-so-far ε and the
  mechanism, read by the operator into the job's status and the dataset ledger.
* ``privacy-report.json``: everything an auditor needs to check the guarantee.
* ``training-curves.png``: ε and loss over steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dptrain.errors import DptrainError, TrainingInterrupted
from dptrain.events import Progress, TrainingResult
from dptrain.journal import JOURNAL_NAME, PrivacyJournal, atomic_write, summarize
from dptrain_accounting import MechanismSegment, compact, compute_epsilon

if TYPE_CHECKING:
    from dptrain.plan import TrainingPlan
    from dptrain_api.job import DPTrainingJob

__all__ = [
    "CURVES_NAME",
    "DEFAULT_TERMINATION_LOG",
    "MAX_TERMINATION_MESSAGE",
    "REPORT_NAME",
    "TERMINATION_PATH_ENV",
    "ReportWriter",
    "default_termination_path",
    "fit_termination_message",
    "format_up",
    "plot_curves",
]

logger = logging.getLogger(__name__)

REPORT_NAME: Final = "privacy-report.json"
CURVES_NAME: Final = "training-curves.png"
TERMINATION_PATH_ENV: Final = "DPTRAIN_TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_LOG: Final = Path("/dev/termination-log")
MAX_TERMINATION_MESSAGE: Final = 4096
OTHER_DELTAS: Final = (1e-6, 1e-7)

_NOT_DP: Final = [
    "training loss (per step, in logs, metrics and training-curves.png)",
    "evaluation metrics (accuracy, AUC, loss) on the held-out split",
    "examples per second (computed from the expected batch size, so it does not depend on the data)",
]
_EVAL_NOTE: Final = (
    "Evaluation uses a held-out split that DP-SGD never trains on. The eval metrics are NOT covered by the "
    "(ε, δ) guarantee: they are exact statistics of the held-out records, so publishing them reveals a little "
    "about those records outside the privacy budget."
)
_RNG_NOTE: Final = (
    "Opacus secure_mode is unavailable (torchcsprng does not install with torch 2.x): the Gaussian noise and the "
    "Poisson sampling come from torch's pseudo-random generators (Mersenne Twister on CPU, Philox on CUDA), seeded "
    "from os.urandom on every attempt and never restored from a checkpoint. They are not cryptographically secure, "
    "and the floating-point mitigation of secure_mode is not applied."
)


def format_up(value: float, significant: int = 4) -> str:
    """``value`` with ``significant`` digits, rounded UP: a printed ε (or σ) is never below the true one."""
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    quantum = Decimal(1).scaleb(exponent - significant + 1)
    rounded = Decimal(repr(value)).quantize(quantum, rounding=ROUND_CEILING)
    return f"{rounded:f}" if exponent < 15 else f"{rounded:E}"


def default_termination_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """DPTRAIN_TERMINATION_MESSAGE_PATH, else /dev/termination-log inside a Kubernetes pod when writable."""
    env = os.environ if environ is None else environ
    configured = env.get(TERMINATION_PATH_ENV, "").strip()
    if configured:
        return Path(configured)
    target = DEFAULT_TERMINATION_LOG
    if target.exists():
        return target if os.access(target, os.W_OK) else None
    # Only create it inside a pod: on a workstation /dev is root-writable but not ours to litter.
    if env.get("KUBERNETES_SERVICE_HOST") and os.access(target.parent, os.W_OK):
        return target
    return None


def fit_termination_message(message: dict[str, Any], limit: int = MAX_TERMINATION_MESSAGE) -> str:
    """Compact JSON of ``message`` within ``limit`` bytes: drops detail (segments, long text) as needed."""
    message = dict(message)

    def encoded() -> str:
        return json.dumps(message, separators=(",", ":"), allow_nan=False, default=str)

    text = encoded()
    if len(text.encode()) <= limit:
        return text
    journal = message.get("journal")
    if isinstance(journal, dict) and "segments" in journal:
        journal = dict(journal)
        journal["segmentCount"] = len(journal.pop("segments"))
        message["journal"] = journal
        text = encoded()
    for key in ("error", "warnings"):
        if len(text.encode()) <= limit:
            break
        value = message.get(key)
        if isinstance(value, str) and value:
            overflow = len(text.encode()) - limit
            keep = max(0, len(value.encode()) - overflow - 16)
            message[key] = value.encode()[:keep].decode(errors="ignore") + "…"
        elif value is not None:
            message.pop(key)
        text = encoded()
    if len(text.encode()) > limit:  # last resort: the privacy numbers only
        essential = (
            "status",
            "epsilon",
            "delta",
            "noiseMultiplier",
            "sampleRate",
            "steps",
            "chargedSteps",
            "stepsRun",
            "plannedSteps",
            "exitCode",
        )
        message = {key: message[key] for key in essential if key in message}
        text = encoded()
    return text


def _first_attempt(environ: Mapping[str, str] | None = None) -> bool:
    """True unless the operator says this pod is a retry (DPTRAIN_ATTEMPT > 1)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("DPTRAIN_ATTEMPT", "1") or "1") <= 1
    except ValueError:
        return False


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "opacus", "dp-accounting", "numpy", "dptrain", "dptrain-api"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _accountant_details(accountant: str) -> dict[str, Any]:
    if accountant == "pld":
        from dptrain_accounting import PLD_DISCRETIZATION

        return {
            "name": "pld",
            "implementation": "Google dp_accounting PLDAccountant (privacy loss distributions)",
            "discretization": {"valueDiscretizationInterval": PLD_DISCRETIZATION, "pessimistic": True},
            "bound": "valid upper bound (pessimistic discretization rounds privacy loss up)",
            "neighbouringRelation": "add or remove one example",
        }
    if accountant == "prv":
        from dptrain.prv import PRV_EPS_ERROR

        return {
            "name": "prv",
            "implementation": "Opacus PRVAccountant (Gopi et al. 2021, FFT composition of privacy random variables)",
            "discretization": {"epsError": PRV_EPS_ERROR, "deltaError": "delta / 1000"},
            "bound": "upper end of the error bracket (eps_upper)",
            "neighbouringRelation": "add or remove one example",
        }
    if accountant == "rdp":
        from dptrain_accounting import RDP_ORDERS

        return {
            "name": "rdp",
            "implementation": "Google dp_accounting RdpAccountant (Rényi DP, converted to (ε, δ))",
            "orders": {"count": len(RDP_ORDERS), "min": min(RDP_ORDERS), "max": max(RDP_ORDERS)},
            "bound": "valid upper bound (looser than PLD)",
            "neighbouringRelation": "add or remove one example",
        }
    return {"name": accountant}


def plot_curves(history: Sequence[Mapping[str, float]], path: Path, *, plan: TrainingPlan | None = None) -> Path:
    """ε (charged) and training loss over steps, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    figure, (eps_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    eps_axis.step(steps, [entry["epsilon"] for entry in history], where="post", label="ε charged (journal)")
    if plan is not None:
        eps_axis.axhline(
            plan.target_epsilon, color="tab:red", linestyle="--", label=f"target ε = {plan.target_epsilon:g}"
        )
    eps_axis.set_ylim(bottom=0)
    eps_axis.set_xlabel("step")
    eps_axis.set_ylabel("ε")
    eps_axis.set_title(f"privacy spent (δ = {plan.delta:g})" if plan is not None else "privacy spent")
    eps_axis.legend(loc="lower right")
    loss_axis.plot(steps, [entry["loss"] for entry in history], linewidth=0.8, color="tab:orange")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss (not DP)")
    loss_axis.set_title("training loss")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return path


class ReportWriter:
    """Observer that writes the termination message, privacy-report.json and training-curves.png."""

    def __init__(
        self,
        *,
        output_dir: Path,
        termination_path: Path | None,
        job: DPTrainingJob | None = None,
        example_count_source: str = "",
        curves: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.termination_path = termination_path
        self.job = job
        self.example_count_source = example_count_source
        self.curves = curves
        self.plan: TrainingPlan | None = None
        self.attempt = 0
        self.last_progress: Progress | None = None
        self.failure_written = False
        self.report_path: Path | None = None
        self.curves_path: Path | None = None

    # --- termination message ------------------------------------------------------------------------

    def write_termination_message(self, message: dict[str, Any]) -> None:
        if self.termination_path is None:
            return
        text = fit_termination_message(message)
        try:
            self.termination_path.write_text(text)
        except OSError as error:
            logger.warning("cannot write the termination message to %s: %s", self.termination_path, error.strerror)

    def _mechanism(self, plan: TrainingPlan) -> dict[str, Any]:
        return {
            "delta": plan.delta,
            "targetEpsilon": plan.target_epsilon,
            "noiseMultiplier": plan.noise_multiplier,
            "sampleRate": plan.sample_rate,
            "plannedSteps": plan.steps,
            "plannedEpsilon": plan.planned_epsilon,
            "accountant": plan.accountant,
            "maxGradNorm": plan.max_grad_norm,
        }

    # --- observer -----------------------------------------------------------------------------------

    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None:
        self.plan = plan
        self.attempt = attempt

    def on_step(self, progress: Progress) -> None:
        self.last_progress = progress

    def on_finish(self, result: TrainingResult) -> None:
        self.plan = result.plan
        self.report_path = self.write_privacy_report(result)
        if self.curves and result.history:
            try:
                self.curves_path = plot_curves(result.history, self.output_dir / CURVES_NAME, plan=result.plan)
            except Exception as error:  # a plotting problem must not fail a finished run
                logger.warning("cannot draw %s: %s", CURVES_NAME, error)
        message = {
            "status": "Succeeded",
            "epsilon": result.epsilon,
            **self._mechanism(result.plan),
            "steps": result.charged_steps,
            "chargedSteps": result.charged_steps,
            "stepsRun": result.steps_run,
            "attempts": result.attempts,
            "evalMetric": result.eval_metric,
            "evalMetrics": {k: v for k, v in result.eval_metrics.items() if math.isfinite(v)},
            "clippingMode": result.clipping_mode,
            "journal": {
                "entries": len(result.journal),
                "chargedSteps": result.charged_steps,
                "segments": summarize(result.journal),
            },
        }
        if result.warnings:
            message["warnings"] = "; ".join(result.warnings)
        self.write_termination_message(message)

    def on_failure(self, error: BaseException, *, epsilon_spent: float, charged_steps: int, step: int) -> None:
        self.write_failure(error, epsilon_spent=epsilon_spent, charged_steps=charged_steps, step=step)

    # --- failures -------------------------------------------------------------------------------------

    def write_failure(
        self,
        error: BaseException,
        *,
        plan: TrainingPlan | None = None,
        epsilon_spent: float | None = None,
        charged_steps: int | None = None,
        step: int | None = None,
    ) -> None:
        """Termination message for a run that did not finish: the ε the journal charged so far."""
        plan = plan or self.plan
        journal_summary: dict[str, Any] | None = None
        journal_path = self.output_dir / JOURNAL_NAME
        if journal_path.exists():
            try:
                journal = PrivacyJournal(journal_path)
                if self.job is not None and journal.header is not None:
                    from dptrain.checkpoint import job_fingerprint

                    if journal.header.job_hash != job_fingerprint(self.job):
                        raise ValueError("the output directory's privacy journal belongs to another job")
                if charged_steps is None:
                    charged_steps = journal.charged_steps
                journal_summary = {
                    "entries": len(journal.entries),
                    "chargedSteps": charged_steps,
                    "segments": summarize(journal.entries),
                }
                if epsilon_spent is None and plan is not None:
                    epsilon_spent = journal.epsilon(plan.delta, plan.accountant)
            except Exception as journal_error:
                # Unknown charges: say so (the operator then keeps the whole reservation charged).
                journal_summary = {"error": str(journal_error)}
                charged_steps = None
        elif (self.output_dir.is_dir() or not self.output_dir.exists()) and _first_attempt():
            # No journal in the output directory of a first attempt: this job has charged nothing.
            # (On a retry a missing journal proves nothing -- the volume may have been replaced --
            # so the charge is left unknown and the operator keeps the whole reservation.)
            if charged_steps is None:
                charged_steps = 0
                epsilon_spent = 0.0 if epsilon_spent is None else epsilon_spent
            journal_summary = {"entries": 0, "chargedSteps": charged_steps, "segments": []}
        interrupted = isinstance(error, TrainingInterrupted)
        message: dict[str, Any] = {
            "status": "Interrupted" if interrupted else "Failed",
            "reason": type(error).__name__,
            "exitCode": error.exit_code if isinstance(error, DptrainError) else 1,
            "error": str(error),
        }
        if epsilon_spent is not None:
            message["epsilon"] = epsilon_spent
        if plan is not None:
            message.update(self._mechanism(plan))
        if charged_steps is not None:
            message["steps"] = charged_steps
            message["chargedSteps"] = charged_steps
        if step is not None:
            message["stepsRun"] = step
        if journal_summary is not None:
            message["journal"] = journal_summary
        self.write_termination_message(message)
        self.failure_written = True

    # --- the auditor's report -------------------------------------------------------------------------

    def write_privacy_report(self, result: TrainingResult) -> Path:
        plan = result.plan
        segments = compact(
            [
                MechanismSegment(entry["noiseMultiplier"], entry["sampleRate"], entry["steps"])
                for entry in result.journal
            ]
        )
        other: dict[str, float | None] = {}
        for delta in OTHER_DELTAS:
            if delta == plan.delta:
                continue
            try:
                other[f"{delta:g}"] = compute_epsilon(segments, delta=delta, accountant=plan.accountant)
            except Exception as error:
                logger.warning("cannot compute ε at δ=%g: %s", delta, error)
                other[f"{delta:g}"] = None
        job = self.job
        report: dict[str, Any] = {
            "schemaVersion": 1,
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "job": {
                "name": job.metadata.name if job else None,
                "namespace": job.metadata.namespace if job else None,
                "uid": job.metadata.uid if job else None,
            },
            "status": "Succeeded",
            "guarantee": {
                "epsilon": result.epsilon,
                "delta": plan.delta,
                "targetEpsilon": plan.target_epsilon,
                "withinTarget": result.epsilon <= plan.target_epsilon,
                "epsilonAtOtherDeltas": other,
                "statement": (
                    f"The released model is ({format_up(result.epsilon)}, {plan.delta:g})-differentially private with "
                    "respect to adding or removing one training record; ε composes every step the privacy journal "
                    "charged, including steps of attempts that crashed and were rolled back."
                ),
            },
            "mechanism": {
                "algorithm": "DP-SGD with per-example gradient clipping (flat L2) and Gaussian noise",
                "sampling": "Poisson subsampling: each training example joins each batch independently with "
                "probability sampleRate (empty batches still take a noise-only step)",
                "noise": "N(0, (noiseMultiplier * maxGradNorm)^2) added to the sum of clipped per-example gradients",
                "noiseMultiplier": plan.noise_multiplier,
                "sampleRate": plan.sample_rate,
                "expectedBatchSize": plan.batch_size,
                "physicalBatchSize": plan.physical_batch_size,
                "maxGradNorm": plan.max_grad_norm,
                "clippingMode": result.clipping_mode,
                "plannedSteps": plan.steps,
                "chargedSteps": result.charged_steps,
                "stepsRun": result.steps_run,
                "plannedEpsilon": plan.planned_epsilon,
                "reservedByOperator": plan.reserved,
            },
            "accountant": _accountant_details(plan.accountant),
            "journal": {
                "file": JOURNAL_NAME,
                "design": "write-ahead: each chunk of steps is fsynced to the journal before it runs; a torn "
                "append is charged with every step the plan still allowed",
                "attempts": result.attempts,
                "entries": result.journal,
                "segments": [segment.to_dict() for segment in segments],
            },
            "dataset": {
                "name": result.dataset,
                "trainingExamples": plan.train_size,
                "evalExamples": plan.eval_size,
                "exampleCountSource": self.example_count_source
                or "the number of records of the dataset (public metadata)",
            },
            "evaluation": {
                "metric": result.eval_metric,
                "metrics": {k: _finite(v) for k, v in result.eval_metrics.items()},
                "note": _EVAL_NOTE,
            },
            "notDifferentiallyPrivate": _NOT_DP,
            "randomness": _RNG_NOTE,
            "software": _versions(),
            "runtime": {
                "device": result.device,
                "threads": result.threads,
                "elapsedSecondsThisAttempt": result.elapsed_seconds,
                "platform": sys.platform,
            },
            "warnings": result.warnings,
        }
        path = self.output_dir / REPORT_NAME
        atomic_write(path, (json.dumps(report, indent=2, allow_nan=False, default=str) + "\n").encode())
        return path
