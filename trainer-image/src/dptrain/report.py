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
from dptrain.journal import HOLDOUT, JOURNAL_NAME, TRAIN, PrivacyJournal, atomic_write
from dptrain_accounting import MechanismSegment, compact, compute_epsilon, partitioned_epsilon
from dptrain_api import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    ExitCode,
    Mechanism,
    PodEnv,
    RunOutcome,
    TerminationMessage,
)

if TYPE_CHECKING:
    from dptrain.plan import TrainingPlan
    from dptrain_api.job import DPTrainingJob

__all__ = [
    "CURVES_NAME",
    "REPORT_NAME",
    "ReportWriter",
    "StatusReport",
    "default_termination_path",
    "format_up",
    "plot_curves",
]

logger = logging.getLogger(__name__)

REPORT_NAME: Final = "privacy-report.json"
CURVES_NAME: Final = "training-curves.png"
OTHER_DELTAS: Final = (1e-6, 1e-7)

RELATION: Final = (
    "add or remove one record: D and D' differ by one record, anywhere in the dataset (training partition or "
    "holdout alike). Nothing the job does depends on the exact number of records: the sample rate comes from the "
    "declared (public) size, a record is held out by a keyed hash of its own content, records with unusable values "
    "are skipped one by one, and no exact count is reported."
)
UNIT_RELATION: Final = (
    "add or remove one individual: D and D' differ by ALL the records of one {column} value (at most {k} of them are "
    "used, chosen by a keyed hash of each record), anywhere in the dataset. Individuals, not records, are "
    "Poisson-sampled at q from the declared (public) number of individuals; each sampled individual's summed "
    "gradient is clipped once to C; an individual is held out (or sharded) by a keyed hash of its identifier, with "
    "all of its records; held-out releases count each individual once (the mean of its records' rows); records "
    "with unusable values are skipped one by one; no exact count is reported. A patient at two hospitals (two "
    "datasets, two federation sites) is two individuals: each dataset's guarantee covers its own records of them."
)


def relation(plan: TrainingPlan) -> str:
    """The neighbouring relation the job's ε is for (record or individual)."""
    return UNIT_RELATION.format(column=plan.unit_column, k=plan.unit_records) if plan.unit_records else RELATION


COMPOSITION: Final = (
    "Each record is in exactly one partition: training (DP-SGD steps) or holdout (releases of held-out metrics). "
    "Mechanisms on one partition compose sequentially (by the accountant); the two partitions compose in parallel, "
    "so the job's ε is the larger of the two."
)
_RNG_NOTE: Final = (
    "Every record joins a Poisson batch with probability floor(q·2^53)/2^53 <= q (53-bit integer draws; the "
    "accountant's q is a valid bound). The Gaussian noise is drawn in float64 (Box-Muller with a radius uniform "
    "down to 2^-127: draws reach ±13.2σC, so the probability that a neighbouring output falls beyond the sampler's "
    "reach is below 1e-22 per step for σ >= 0.3; the planner refuses plans where it is not negligible next to δ), "
    "added to the clipped sum in float64 and rounded once. With privacy.secureNoise (the default, required for "
    "PrivateDatasets) the bits come from ChaCha20 keyed by os.urandom on every attempt, a CSPRNG; without it from "
    "torch's generator seeded by os.urandom (public data only). Noise is still a floating-point approximation of the "
    "Gaussian, not an exact discrete Gaussian: the known attacks on a single low-precision draw do not apply to this "
    "construction, but that is an argument, not a proof."
)
_NOT_COVERED: Final = [
    "timing: how long steps take depends on the sizes of the Poisson batches. No throughput is exported and journal "
    "entries are timed to the minute, but the progress counters (dptrain_steps_total, status.progress), the "
    "attempt's wall time and a federation's round wall time are observable and not DP",
    "the pod log: it may name columns with unusable values and how many records were skipped (steward only)",
    "anything computed from the data outside dptrain (a custom model factory, a custom image)",
]


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
    configured = env.get(PodEnv.TERMINATION_MESSAGE_PATH, "").strip()
    if configured:
        return Path(configured)
    target = Path(DEFAULT_TERMINATION_MESSAGE_PATH)
    if target.exists():
        return target if os.access(target, os.W_OK) else None
    # Only create it inside a pod: on a workstation /dev is root-writable but not ours to litter.
    if env.get("KUBERNETES_SERVICE_HOST") and os.access(target.parent, os.W_OK):
        return target
    return None


def _first_attempt(environ: Mapping[str, str] | None = None) -> bool:
    """True unless the operator says this pod is a retry (DPTRAIN_ATTEMPT > 1)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get(PodEnv.ATTEMPT, "1") or "1") <= 1
    except ValueError:
        return False


def _exit_code(error: BaseException) -> int:
    """The exit code `dptrain run` ends with for ``error`` (what the operator reads)."""
    from dptrain_api import ManifestError

    if isinstance(error, DptrainError):
        return int(error.exit_code)
    return ExitCode.INVALID_CONFIGURATION if isinstance(error, ManifestError) else ExitCode.CRASHED


def public_error(error: BaseException) -> str:
    """What may leave the pod about ``error`` (the termination message, hence the job's status): dptrain's own
    errors and manifest errors are written to name files, fields and columns, never a record's value; any other
    exception (a crash inside torch, a library's message) may quote data, so only its type leaves."""
    from dptrain_api import ManifestError

    if isinstance(error, DptrainError | ManifestError):
        return str(error)
    return f"the trainer crashed ({type(error).__name__}); the pod log has the details"


def _segments(entries: Sequence[Mapping[str, Any]]) -> list[Mechanism]:
    """The DP-SGD steps of journal entries (training partition), compacted (consecutive equal steps merged)."""
    segments = compact(
        MechanismSegment(e["noiseMultiplier"], e["sampleRate"], e["steps"])
        for e in entries
        if e.get("partition", TRAIN) == TRAIN
    )
    return [Mechanism(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate, steps=s.steps) for s in segments]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "opacus", "dp-accounting", "prv-accountant", "numpy", "dptrain", "dptrain-api"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _accountant_details(accountant: str) -> dict[str, Any]:
    if accountant == "pld":
        from dptrain_accounting import PLD_DISCRETIZATION, PLD_SAFETY_MARGIN

        return {
            "name": "pld",
            "implementation": "Google dp_accounting PLDAccountant (privacy loss distributions)",
            "discretization": {"valueDiscretizationInterval": PLD_DISCRETIZATION, "pessimistic": True},
            "safetyMargin": {"absolute": PLD_SAFETY_MARGIN[0], "relative": PLD_SAFETY_MARGIN[1]},
            "bound": "valid upper bound (pessimistic discretization rounds privacy loss up; a small margin covers "
            "the discretization's non-monotonicity)",
        }
    if accountant == "prv":
        from dptrain_accounting import PRV_EPS_ERROR

        return {
            "name": "prv",
            "implementation": "prv_accountant (Gopi, Lee & Wutschitz 2021: FFT composition of privacy random "
            "variables)",
            "discretization": {"epsError": PRV_EPS_ERROR, "deltaError": "delta / 1000"},
            "bound": "upper end of the error bracket (eps_upper)",
        }
    if accountant == "rdp":
        from dptrain_accounting import RDP_ORDERS

        return {
            "name": "rdp",
            "implementation": "Google dp_accounting RdpAccountant (Rényi DP, converted to (ε, δ))",
            "orders": {"count": len(RDP_ORDERS), "min": min(RDP_ORDERS), "max": max(RDP_ORDERS)},
            "bound": "valid upper bound (looser than PLD)",
        }
    return {"name": accountant}


def plot_curves(history: Sequence[Mapping[str, float]], path: Path, *, plan: TrainingPlan | None = None) -> Path:
    """ε (charged) over steps, and the DP-released held-out metric and loss at each release, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    releases = [entry for entry in history if entry.get("released")]
    figure, (eps_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
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
    for key, color in (("accuracy", "tab:green"), ("auc", "tab:purple"), ("loss", "tab:orange")):
        points = [(entry["step"], entry[key]) for entry in releases if key in entry]
        if points:
            metric_axis.plot(*zip(*points, strict=True), marker="o", color=color, label=f"held-out {key}")
    metric_axis.set_xlabel("step")
    metric_axis.set_title("held-out metrics, released with DP")
    if releases:
        metric_axis.legend(loc="best")
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
        self.success_message: TerminationMessage | None = None

    # --- termination message ------------------------------------------------------------------------

    def write_termination_message(self, message: TerminationMessage) -> None:
        if self.termination_path is None:
            return
        text = message.to_text()
        try:
            self.termination_path.write_text(text)
        except OSError as error:
            logger.warning("cannot write the termination message to %s: %s", self.termination_path, error.strerror)

    @staticmethod
    def _mechanism(plan: TrainingPlan | None) -> dict[str, Any]:
        if plan is None:
            return {}
        return {
            "delta": plan.delta,
            "target_epsilon": plan.target_epsilon,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "planned_steps": plan.steps,
            "planned_epsilon": plan.planned_epsilon,
            "accountant": plan.accountant,
            "max_grad_norm": plan.max_grad_norm,
            "holdout_noise_multiplier": plan.holdout_noise_multiplier,
            "planned_releases": plan.releases,
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
        message = TerminationMessage(
            status=RunOutcome.SUCCEEDED,
            exit_code=ExitCode.SUCCEEDED,
            epsilon=result.epsilon,
            **self._mechanism(result.plan),
            charged_steps=result.charged_steps,
            charged_releases=result.charged_releases,
            steps_run=result.steps_run,
            attempts=result.attempts,
            eval_metric=result.eval_metric,
            eval_metrics={k: v for k, v in result.eval_metrics.items() if math.isfinite(v)},
            clipping_mode=result.clipping_mode,
            journal_entries=len(result.journal),
            segments=_segments(result.journal),
            warnings="; ".join(result.warnings) or None,
        )
        self.success_message = message
        self.write_termination_message(message)

    def add_audit(self, *, epsilon_lower_bound: float, epsilon: float, confidence: float) -> None:
        """Rewrite the success termination message with the privacy audit's result (run after training)."""
        if self.success_message is None:
            return
        self.success_message = self.success_message.model_copy(
            update={
                "audit_epsilon_lower_bound": epsilon_lower_bound,
                "audit_epsilon": _finite(epsilon),
                "audit_confidence": confidence,
            }
        )
        self.write_termination_message(self.success_message)

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
        journal_entries: int | None = None
        charged_releases: int | None = None
        segments: list[Mechanism] = []
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
                journal_entries, segments = len(journal.entries), _segments(journal.entries)
                charged_releases = journal.charged_releases
                if epsilon_spent is None and plan is not None:
                    epsilon_spent = journal.epsilon(plan.delta, plan.accountant)
            except Exception as journal_error:
                # Unknown charges: say so (the operator then keeps the whole reservation charged).
                logger.warning("cannot read the privacy journal: %s", journal_error)
                charged_steps = epsilon_spent = charged_releases = None
        elif (self.output_dir.is_dir() or not self.output_dir.exists()) and _first_attempt():
            # No journal in the output directory of a first attempt: this job has charged nothing.
            # (On a retry a missing journal proves nothing -- the volume may have been replaced --
            # so the charge is left unknown and the operator keeps the whole reservation.)
            if charged_steps is None:
                charged_steps = 0
                epsilon_spent = 0.0 if epsilon_spent is None else epsilon_spent
            journal_entries = charged_releases = 0
        interrupted = isinstance(error, TrainingInterrupted)
        message = TerminationMessage(
            status=RunOutcome.INTERRUPTED if interrupted else RunOutcome.FAILED,
            reason=type(error).__name__,
            exit_code=_exit_code(error),
            error=public_error(error),
            epsilon=epsilon_spent,
            **self._mechanism(plan),
            charged_steps=charged_steps,
            charged_releases=charged_releases,
            steps_run=step,
            journal_entries=journal_entries,
            segments=segments,
        )
        self.write_termination_message(message)
        self.failure_written = True

    # --- the auditor's report -------------------------------------------------------------------------

    def write_privacy_report(self, result: TrainingResult) -> Path:
        """privacy-report.json: the guarantee, how it was computed, and every number the job released."""
        job = self.job
        report: dict[str, Any] = {
            "schemaVersion": 2,
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "job": {
                "name": job.metadata.name if job else None,
                "namespace": job.metadata.namespace if job else None,
                "uid": job.metadata.uid if job else None,
            },
            "status": "Succeeded",
            "guarantee": _guarantee(result),
            "mechanism": _mechanism_section(result),
            "accountant": _accountant_details(result.plan.accountant),
            "journal": _journal_section(result),
            "dataset": {
                "name": result.dataset,
                "privacyUnit": result.plan.unit,
                "declaredTrainingExamples": result.plan.train_size,
                "declaredHoldoutExamples": result.plan.eval_size,
                "countSource": self.example_count_source or "the declared number of records (public metadata)",
                "note": "declared (public) sizes; the true number of records is private and never reported",
            },
            "released": _released(result),
            "evaluation": {
                "metric": result.eval_metric,
                "metrics": {k: _finite(v) for k, v in result.eval_metrics.items()},
                "protection": "the last DP release of held-out metrics (see released)",
            },
            "notCovered": _NOT_COVERED,
            "randomness": _RNG_NOTE,
            "software": _versions(),
            "runtime": {
                "device": result.device,
                "threads": result.threads,
                "processes": result.world_size,
                "elapsedSecondsThisAttempt": result.elapsed_seconds,
                "platform": sys.platform,
            },
            "warnings": result.warnings,
        }
        path = self.output_dir / REPORT_NAME
        atomic_write(path, (json.dumps(report, indent=2, allow_nan=False, default=str) + "\n").encode())
        return path


def _partition_segments(entries: Sequence[Mapping[str, Any]], partition: str) -> list[MechanismSegment]:
    return compact(
        MechanismSegment(e["noiseMultiplier"], e["sampleRate"], e["steps"])
        for e in entries
        if e.get("partition", TRAIN) == partition
    )


def _guarantee(result: TrainingResult) -> dict[str, Any]:
    plan = result.plan
    train = _partition_segments(result.journal, TRAIN)
    holdout = _partition_segments(result.journal, HOLDOUT)
    other: dict[str, float | None] = {}
    for delta in OTHER_DELTAS:
        if delta == plan.delta:
            continue
        try:
            other[f"{delta:g}"] = partitioned_epsilon(train, holdout, delta=delta, accountant=plan.accountant)
        except Exception as error:
            logger.warning("cannot compute ε at δ=%g: %s", delta, error)
            other[f"{delta:g}"] = None
    return {
        "epsilon": result.epsilon,
        "delta": plan.delta,
        "targetEpsilon": plan.target_epsilon,
        "withinTarget": result.epsilon <= plan.target_epsilon,
        "epsilonTrainingPartition": compute_epsilon(train, delta=plan.delta, accountant=plan.accountant),
        "epsilonHoldoutPartition": compute_epsilon(holdout, delta=plan.delta, accountant=plan.accountant),
        "epsilonAtOtherDeltas": other,
        "neighbouringRelation": relation(plan),
        "privacyUnit": plan.unit,
        "composition": COMPOSITION,
        "statement": (
            f"Everything this job released (the model, the held-out metrics, and the numbers listed under "
            f"'released') is ({format_up(result.epsilon)}, {plan.delta:g})-differentially private with respect to "
            "adding or removing one record; ε composes everything the privacy journal charged, including steps of "
            "attempts that crashed and were rolled back."
        ),
    }


def _mechanism_section(result: TrainingResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "algorithm": "DP-SGD with per-example gradient clipping (flat L2) and Gaussian noise",
        "sampling": "Poisson subsampling: each training record joins each batch independently with probability "
        "sampleRate (empty batches still take a noise-only step)",
        "noise": "N(0, (noiseMultiplier * maxGradNorm)^2) added to the sum of clipped per-example gradients, "
        "divided by the expected batch size",
        "noiseMultiplier": plan.noise_multiplier,
        "sampleRate": plan.sample_rate,
        "expectedBatchSize": plan.batch_size,
        "physicalBatchSize": plan.physical_batch_size,
        "maxGradNorm": plan.max_grad_norm,
        "clippingMode": result.clipping_mode,
        "plannedSteps": plan.steps,
        "chargedSteps": result.charged_steps,
        "stepsRun": result.steps_run,
        "holdoutFraction": plan.holdout_fraction,
        "holdoutNoiseMultiplier": plan.holdout_noise_multiplier,
        "plannedReleases": plan.releases,
        "chargedReleases": result.charged_releases,
        "plannedEpsilon": plan.planned_epsilon,
        "reservedByOperator": plan.reserved,
        "processes": result.world_size,
        **({"dataParallel": _DATA_PARALLEL} if result.world_size > 1 else {}),
    }


_DATA_PARALLEL: Final = (
    "the training partition is split into disjoint shards by a keyed hash of each record; each process "
    "Poisson-samples its shard at sampleRate, so the union of their batches is a Poisson sample of the whole "
    "partition at sampleRate; the clipped sums are all-reduced and the noise is added once per step (by rank 0), "
    "divided by the global expected batch size: the same mechanism, and the same (ε, δ), as one process"
)


def _journal_section(result: TrainingResult) -> dict[str, Any]:
    return {
        "file": JOURNAL_NAME,
        "design": "write-ahead: each chunk of steps (and each release) is fsynced to the journal before it runs; "
        "a torn append is charged with everything the plan still allowed",
        "attempts": result.attempts,
        "entries": result.journal,
        "segments": {
            partition: [segment.to_dict() for segment in _partition_segments(result.journal, partition)]
            for partition in (TRAIN, HOLDOUT)
        },
    }


def _released(result: TrainingResult) -> list[dict[str, str]]:
    """Every number or artefact the job lets out of its pod, and how it is protected."""
    plan = result.plan
    released = [
        {"what": "model weights (model.pt, checkpoint.pt)", "protection": "DP-SGD on the training partition"},
        {
            "what": "held-out accuracy, loss (cross-entropy clipped at 2 ln(classes)) and AUC (binary tasks), in "
            "status, metrics, the termination message, this report and training-curves.png",
            "protection": f"Gaussian mechanism on the holdout partition, σ={plan.holdout_noise_multiplier} times "
            f"the sums' L2 sensitivity, {result.charged_releases} release(s) charged",
        },
        {
            "what": "ε, δ, σ, q, planned and charged steps and releases, attempts",
            "protection": "public: functions of the public plan and of how many steps ran (never of the data)",
        },
        {
            "what": "declared dataset sizes, feature bounds, model architecture, clipping mode",
            "protection": "public: from the manifests",
        },
        {
            "what": "errors and exit codes",
            "protection": "public: about the manifest, the model, the file's schema or the journal, never about a "
            "record (records with unusable values are skipped, not reported)",
        },
    ]
    if plan.releases == 0:
        released.pop(1)
    return released


class StatusReport:
    """The termination message of a process that is not global rank 0 of a distributed run: its outcome only.

    The journal, and so every charge, is rank 0's; this pod's message carries no ε and no charges (the operator
    charges the ledger from pod 0's message alone). ``termination_path`` None: say nothing (a second process of
    a pod whose first process reports).
    """

    def __init__(self, termination_path: Path | None) -> None:
        self.termination_path = termination_path
        self.failure_written = False

    def _write(self, message: TerminationMessage) -> None:
        if self.termination_path is None:
            return
        try:
            self.termination_path.write_text(message.to_text())
        except OSError as error:
            logger.warning("cannot write the termination message to %s: %s", self.termination_path, error.strerror)

    def on_start(self, plan: TrainingPlan, *, resumed_from_step: int, attempt: int) -> None:
        """Nothing to say before the end."""

    def on_step(self, progress: Progress) -> None:
        """Nothing to say before the end."""

    def on_finish(self, result: TrainingResult) -> None:
        self._write(TerminationMessage(status=RunOutcome.SUCCEEDED, exit_code=ExitCode.SUCCEEDED))

    def on_failure(self, error: BaseException, *, epsilon_spent: float, charged_steps: int, step: int) -> None:
        self.write_failure(error)

    def write_failure(self, error: BaseException) -> None:
        interrupted = isinstance(error, TrainingInterrupted)
        self._write(
            TerminationMessage(
                status=RunOutcome.INTERRUPTED if interrupted else RunOutcome.FAILED,
                reason=type(error).__name__,
                exit_code=_exit_code(error),
                error=public_error(error),
            )
        )
        self.failure_written = True
