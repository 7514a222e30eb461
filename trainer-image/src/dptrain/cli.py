"""``dptrain``: train a DPTrainingJob locally or in a trainer pod, plan one, or compute ε / σ.

Exit codes: 0 success, 1 unexpected crash, 2 bad manifest or configuration, 3 bad data, 4 bad model,
5 unusable checkpoint/journal, 6 privacy budget refused, 7 journal lost, 8 (`dptrain audit`) the audit's lower bound
contradicts the claimed ε, 128+N stopped by signal N (143 = SIGTERM).

``dptrain run`` is distributed when the pod's ``PET_NNODES`` × ``PET_NPROC_PER_NODE`` or ``--nproc N`` exceeds 1:
it then launches this node's processes with torch.distributed.run's launcher (:mod:`dptrain.distributed`),
each of which runs ``dptrain run`` again as a worker of the process group.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from dptrain.console import ConsoleProgress, print_summary
from dptrain.errors import ConfigurationError, DptrainError, TrainingInterrupted
from dptrain.report import format_up
from dptrain_api import (
    DistributedEnv,
    DPTrainingJob,
    ExitCode,
    ManifestError,
    PodEnv,
    PrivateDataset,
    TerminationMessage,
    load_documents,
    load_manifest_file,
    parse_resource,
)

if TYPE_CHECKING:
    from dptrain.audit import AuditSettings
    from dptrain.distributed import Group, Topology
    from dptrain.metrics import PrometheusExporter
    from dptrain.plan import TrainingPlan
    from dptrain.report import ReportWriter, StatusReport

__all__ = ["LoadedManifest", "audit_settings", "build_parser", "load_job_manifest", "main"]

logger = logging.getLogger("dptrain")


# --- manifests -------------------------------------------------------------------------------------------


@dataclass
class LoadedManifest:
    job: DPTrainingJob
    dataset: PrivateDataset | None
    base_dir: Path
    source: str


def _select(resources: Sequence[DPTrainingJob | PrivateDataset], *, source: str, base_dir: Path) -> LoadedManifest:
    jobs = [r for r in resources if isinstance(r, DPTrainingJob)]
    if len(jobs) != 1:
        raise ManifestError(f"{source}: expected exactly one DPTrainingJob, found {len(jobs)}")
    job = jobs[0]
    dataset: PrivateDataset | None = None
    reference = job.spec.dataset.dataset_ref
    if reference is not None:
        matches = [r for r in resources if isinstance(r, PrivateDataset) and r.metadata.name == reference.name]
        if not matches:
            names = [r.metadata.name for r in resources if isinstance(r, PrivateDataset)]
            raise ConfigurationError(
                f"{source}: dataset.datasetRef names PrivateDataset {reference.name!r}, but the manifest holds "
                f"{'PrivateDatasets ' + repr(names) if names else 'no PrivateDataset'}; add it to the manifest"
            )
        dataset = matches[0]
    return LoadedManifest(job=job, dataset=dataset, base_dir=base_dir, source=source)


def _parse_text(text: str, *, source: str) -> list[DPTrainingJob | PrivateDataset]:
    return [parse_resource(doc, source=f"{source}[{i}]") for i, doc in enumerate(load_documents(text, source=source))]


def load_job_manifest(
    manifest: str | None, *, from_env: str | None = None, data_dir: Path | None = None
) -> LoadedManifest:
    """The DPTrainingJob (and the PrivateDataset it names) from a file, ``-`` (stdin) or an env var."""
    if from_env is not None:
        text = os.environ.get(from_env)
        if text is None or not text.strip():
            raise ConfigurationError(f"--from-env {from_env}: the environment variable is not set or empty")
        source = f"${from_env}"
        loaded = _select(_parse_text(text, source=source), source=source, base_dir=Path.cwd())
    elif manifest is None:
        raise ConfigurationError("give a MANIFEST file, - for stdin, or --from-env VAR")
    elif manifest == "-":
        loaded = _select(_parse_text(sys.stdin.read(), source="<stdin>"), source="<stdin>", base_dir=Path.cwd())
    else:
        path = Path(manifest)
        loaded = _select(load_manifest_file(path), source=str(path), base_dir=path.resolve().parent)
    if data_dir is not None:
        loaded.base_dir = Path(data_dir)
    return loaded


def _example_count_source(loaded: LoadedManifest) -> str:
    if loaded.dataset is not None and loaded.dataset.spec.num_examples is not None:
        return (
            f"PrivateDataset {loaded.dataset.metadata.name!r} spec.numExamples={loaded.dataset.spec.num_examples} "
            "(public metadata; the trainer refuses data of another size)"
        )
    builtin = loaded.job.spec.dataset.builtin or (loaded.dataset.spec.source.builtin if loaded.dataset else None)
    if builtin is not None:
        return f"size of the built-in dataset {builtin!s} (public)"
    return "number of records in the data file"


# --- commands ------------------------------------------------------------------------------------------------


@contextmanager
def _graceful_signals(stop: threading.Event, received: list[int]) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` (the engine finishes the step and checkpoints); a second SIGINT aborts."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _termination_path(args: argparse.Namespace) -> Path | None:
    from dptrain.report import default_termination_path

    return Path(args.termination_message_path) if args.termination_message_path else default_termination_path()


class _RunCommand:
    """`dptrain run`: load, plan, train, report; on any failure a termination message still says what was charged.

    In a distributed run, global rank 0 does all of that; another rank trains its shard and reports only its
    outcome (:class:`~dptrain.report.StatusReport`, written by the first process of its pod).
    """

    def __init__(self, args: argparse.Namespace, group: Group) -> None:
        self.args = args
        self.group = group
        self.termination = _termination_path(args)
        self.output_dir: Path | None = Path(args.output) if args.output else None
        self.loaded: LoadedManifest | None = None
        self.report: ReportWriter | StatusReport | None = None
        self.exporter: PrometheusExporter | None = None
        self.console: ConsoleProgress | None = None
        self.stop = threading.Event()
        self.received: list[int] = []

    def run(self) -> int:
        from dptrain.data import load_data
        from dptrain.engine import train
        from dptrain.metrics import PrometheusExporter, metric_labels
        from dptrain.plan import make_plan, reserved_from_env
        from dptrain.report import ReportWriter, StatusReport

        args = self.args
        self.loaded = loaded = load_job_manifest(
            args.manifest, from_env=args.from_env, data_dir=Path(args.data_dir) if args.data_dir else None
        )
        job = loaded.job
        output_dir = self.output_dir = self.output_dir or Path("runs") / (job.metadata.name or "job")
        primary = self.group.primary
        if primary:
            self.report = ReportWriter(
                output_dir=output_dir,
                termination_path=self.termination,
                job=job,
                example_count_source=_example_count_source(loaded),
            )
        else:  # the output folder is rank 0's: this rank never reads or writes it
            self.report = StatusReport(self.termination if self.group.reports_pod else None)
        _check_admitted_identity(loaded)
        # The plan uses public numbers only (the declared size); the data is read after the journal is open.
        plan = make_plan(job, dataset=loaded.dataset, reserved=reserved_from_env())
        observers: list[Any] = [self.report]
        if isinstance(self.report, ReportWriter):
            self.report.plan = plan
            self.exporter = PrometheusExporter(
                labels=metric_labels(job), port=args.metrics_port, address=args.metrics_address
            )
            if port := self.exporter.start():
                print(f"dptrain: metrics on http://{args.metrics_address}:{port}/metrics", file=sys.stderr)
            self.console = ConsoleProgress(stream=sys.stderr, rich_bar=sys.stderr.isatty(), quiet=args.quiet)
            observers = [self.console, self.exporter, self.report]
        with _graceful_signals(self.stop, self.received):
            result = train(
                job,
                lambda: load_data(job.spec.dataset, private_dataset=loaded.dataset, base_dir=loaded.base_dir),
                plan,
                workdir=output_dir,
                dataset=loaded.dataset,
                expect_journal=_attempt() > 1,
                observers=observers,
                stop_event=self.stop,
                stop_exit_code=ExitCode.TERMINATED,
                base_dir=loaded.base_dir,
                device=self.group.device if self.group.distributed else None,
                group=self.group,
            )
            audited = primary and job.spec.audit is not None and not self.stop.is_set() and self.audit(plan, output_dir)
            if audited and self.exporter is not None and self.exporter.bound_port:
                # The pod ends right after; keep answering scrapes long enough for Prometheus to see the audit.
                self.stop.wait(max(0.0, float(args.metrics_linger)))
        if primary:
            print_summary(result, output_dir=output_dir, files=_output_files(output_dir), console_file=sys.stdout)
        return 0

    def audit(self, plan: TrainingPlan, output_dir: Path) -> bool:
        """The privacy audit of spec.audit, after a successful training: report, metrics, termination message.

        It never fails the job (training succeeded and is charged): a failed audit is logged and reported as such.
        """
        from dptrain.audit import run_audit, verdict, write_audit_report
        from dptrain.report import ReportWriter

        assert self.loaded is not None
        assert isinstance(self.report, ReportWriter)  # rank 0 alone audits (one process, after training)
        assert self.exporter is not None
        job = self.loaded.job
        try:
            result = run_audit(
                job,
                dataset=self.loaded.dataset,
                settings=audit_settings(job),
                plan=plan,
                base_dir=self.loaded.base_dir,
            )
            write_audit_report(result, output_dir, namespace=job.metadata.namespace)
        except Exception as error:
            logger.warning("the privacy audit failed (training is unaffected): %s: %s", type(error).__name__, error)
            return False
        self.exporter.on_audit(epsilon_lower_bound=result.epsilon_lower_bound, epsilon=result.claimed_epsilon)
        self.report.add_audit(
            epsilon_lower_bound=result.epsilon_lower_bound,
            epsilon=result.claimed_epsilon,
            confidence=result.settings.confidence,
        )
        (logger.error if result.contradicted else logger.info)("privacy audit: %s", verdict(result))
        return True

    def fail(self, error: BaseException) -> int:
        """Write the failure termination message; the exit code of a requested stop, else re-raise."""
        from dptrain.report import ReportWriter, StatusReport

        if self.console is not None:
            self.console.close()
        report = self.report
        if report is None and self.group.primary:
            report = ReportWriter(
                output_dir=self.output_dir or Path(os.devnull),
                termination_path=self.termination,
                job=self.loaded.job if self.loaded else None,
            )
        elif report is None:
            report = StatusReport(self.termination if self.group.reports_pod else None)
        if not report.failure_written:
            try:
                report.write_failure(error)
            except Exception:  # pragma: no cover - never mask the original error
                logger.exception("cannot write the failure termination message")
        if isinstance(error, TrainingInterrupted):
            if self.received:
                error.exit_code = 128 + self.received[0]
            print(f"{_program()}: {error}", file=sys.stderr)
            return int(error.exit_code)
        raise error

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()


def _attempt() -> int:
    """The operator's attempt number (1 outside a pod): a retry must find the journal of the earlier attempts."""
    text = os.environ.get(PodEnv.ATTEMPT, "").strip()
    try:
        return int(text) if text else 1
    except ValueError:
        raise ConfigurationError(f"{PodEnv.ATTEMPT}={text!r} is not an attempt number") from None


def _check_admitted_identity(loaded: LoadedManifest) -> None:
    """In a pod: refuse to read any dataset but the one the operator admitted the job for."""
    from dptrain_api import dataset_identity

    admitted = os.environ.get(PodEnv.DATASET_IDENTITY, "").strip()
    actual = dataset_identity(loaded.job, loaded.dataset)
    if admitted and admitted != actual:
        raise ConfigurationError(
            f"this pod was admitted for dataset {admitted!r}, but its manifest names {actual!r}; refusing to read it"
        )


def _output_files(output_dir: Path) -> list[Path]:
    from dptrain.audit.report import AUDIT_REPORT_NAME
    from dptrain.checkpoint import CHECKPOINT_NAME, MODEL_NAME
    from dptrain.journal import JOURNAL_NAME
    from dptrain.report import CURVES_NAME, REPORT_NAME

    names = (MODEL_NAME, REPORT_NAME, CURVES_NAME, JOURNAL_NAME, CHECKPOINT_NAME, AUDIT_REPORT_NAME)
    return [output_dir / name for name in names]


def _cmd_run(args: argparse.Namespace) -> int:
    from dptrain.distributed import SINGLE_PROCESS, Topology, init_worker, is_worker

    if is_worker():  # one process of a distributed run, started by the launcher below (or by torchrun)
        group = init_worker()
        _quiet_followers(group)
        try:
            code = _run_command(args, group)
        finally:
            group.close()
        _leave_without_teardown(code)
    topology = Topology.from_env(nproc=args.nproc)
    if topology.world_size > 1:
        return _launch(args, topology)
    return _run_command(args, SINGLE_PROCESS)


def _leave_without_teardown(code: int) -> NoReturn:
    """Exit a distributed worker once its work is done, its files closed and its process group destroyed, without
    the interpreter's teardown: torch.distributed's C++ destructors there abort about one run in ten here
    ("terminate called without an active exception", SIGABRT), which would turn a finished rank into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_command(args: argparse.Namespace, group: Group) -> int:
    command = _RunCommand(args, group)
    try:
        return command.run()
    except BaseException as error:
        return command.fail(error)
    finally:
        command.close()


def _quiet_followers(group: Group) -> None:
    """Ranks other than 0 log errors only (rank 0 already says everything else), marked with their rank."""
    if group.primary:
        return
    root = logging.getLogger()
    root.setLevel(logging.ERROR)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"dptrain[rank {group.rank}]: %(levelname)s %(name)s: %(message)s"))


def _launch(args: argparse.Namespace, topology: Topology) -> int:
    """Start this node's worker processes (``dptrain run`` again, same arguments) and wait for them.

    If the pod's reporting process died before writing a termination message, write one here: on node 0 what
    the journal charged (ε unknown: the operator keeps what the journal's charges imply), elsewhere the outcome.
    """
    from dptrain.distributed import launch

    if args.manifest == "-":
        raise ConfigurationError(
            "several processes cannot share stdin: give the manifest as a file or with --from-env VAR"
        )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    termination = _termination_path(args)
    _clear(termination)
    command = [sys.executable, "-u", "-m", "dptrain.cli", *args.argv]
    code = launch(topology, command, run_id=os.environ.get(PodEnv.JOB_UID) or "dptrain")
    if code != 0 and termination is not None and not _has_message(termination):
        _write_fallback_message(args, topology, termination, code)
    return code


def _clear(path: Path | None) -> None:
    """Empty an earlier termination message, so that after the workers end an empty file means none wrote one."""
    if path is None or not path.exists():
        return
    with suppress(OSError):
        path.write_text("")


def _has_message(path: Path) -> bool:
    try:
        return TerminationMessage.parse(path.read_text()) is not None
    except OSError:
        return False


def _write_fallback_message(args: argparse.Namespace, topology: Topology, termination: Path, code: int) -> None:
    from dptrain.distributed import PeerFailedError
    from dptrain.report import ReportWriter, StatusReport

    error = PeerFailedError(
        f"a training process ended with exit status {code} before it wrote a termination message", exit_code=code
    )
    if topology.node_rank != 0:
        StatusReport(termination).write_failure(error)
        return
    try:
        job: DPTrainingJob | None = load_job_manifest(args.manifest, from_env=args.from_env).job
    except Exception:
        job = None
    name = job.metadata.name if job is not None else None
    output_dir = Path(args.output) if args.output else Path("runs") / (name or "job")
    ReportWriter(output_dir=output_dir, termination_path=termination, job=job).write_failure(
        error, epsilon_spent=_journal_epsilon(output_dir, job)
    )


def _journal_epsilon(output_dir: Path, job: DPTrainingJob | None) -> float | None:
    """ε of the journal in ``output_dir`` at the job's δ and accountant (no plan needed), None if unknown."""
    from dptrain.journal import JOURNAL_NAME, PrivacyJournal

    if job is None:
        return None
    try:
        journal = PrivacyJournal(output_dir / JOURNAL_NAME)
        return journal.epsilon(job.spec.privacy.delta, job.spec.privacy.accountant) if journal.exists else None
    except Exception:  # a damaged journal: say unknown, never guess
        return None


def _cmd_plan(args: argparse.Namespace) -> int:
    from dptrain.plan import make_plan, reserved_from_env
    from dptrain_api import declared_num_examples

    loaded = load_job_manifest(
        args.manifest, from_env=args.from_env, data_dir=Path(args.data_dir) if args.data_dir else None
    )
    num_examples = declared_num_examples(loaded.job, loaded.dataset)
    plan = make_plan(loaded.job, dataset=loaded.dataset, reserved=reserved_from_env())
    group = _group_privacy(plan, args.records_per_patient)
    if args.json:
        print(json.dumps({**plan.to_dict(), "epochs": plan.epochs, "examples": num_examples, "perPatient": group}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan for {loaded.job.metadata.name or 'job'}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("privacy unit", plan.unit)
    counted = "individuals" if plan.unit_records else "examples"
    table.add_row(f"{counted} (declared)", f"{num_examples} ({plan.train_size} train, {plan.eval_size} held out)")
    table.add_row("q (sample rate)", f"{plan.sample_rate:.6g} (batch {plan.batch_size})")
    table.add_row("steps", f"{plan.steps} ({plan.epochs:.3g} epochs)")
    source = "reserved" if plan.reserved else ("fixed" if loaded.job.spec.privacy.noise_multiplier else "calibrated")
    table.add_row("σ (noise multiplier)", f"{format_up(plan.noise_multiplier, 6)} ({source})")
    table.add_row(
        "planned ε", f"{format_up(plan.planned_epsilon, 5)} at δ={plan.delta:g} (target {plan.target_epsilon:g})"
    )
    if plan.releases:
        table.add_row(
            "held-out releases", f"{plan.releases}, σ={format_up(plan.holdout_noise_multiplier or 0, 6)} (calibrated)"
        )
    table.add_row("accountant", plan.accountant)
    table.add_row("clipping norm C", f"{plan.max_grad_norm:g}")
    if group is not None:
        table.add_row(
            f"per patient ({group['records']:.0f} records)",
            f"ε ≤ {format_up(group['epsilon'], 4)}, δ ≤ {group['delta']:.3g} (group privacy from the record-level "
            "guarantee; declare a privacyUnit to protect the patient at ε)",
        )
    Console().print(table)
    return 0


def _group_privacy(plan: Any, records: int | None) -> dict[str, float] | None:
    """What a record-level (ε, δ) means for an individual with ``records`` records, by group privacy:
    (kε, k·e^{(k-1)ε}·δ), a valid, usually loose bound. None for unit-level plans (their ε is already per
    individual) or without K."""
    if records is None or plan.unit_records:
        return None
    if records < 1:
        raise ConfigurationError("--records-per-patient must be at least 1")
    epsilon = plan.planned_epsilon
    return {
        "records": float(records),
        "epsilon": records * epsilon,
        "delta": min(1.0, records * math.exp((records - 1) * epsilon) * plan.delta),
    }


def _cmd_epsilon(args: argparse.Namespace) -> int:
    from dptrain_accounting import (
        AccountingError,
        MechanismSegment,
        calibrate_noise_multiplier,
        compute_epsilon,
        plan_steps,
    )

    if args.sample_rate is not None and args.steps is not None:
        sample_rate, steps = float(args.sample_rate), int(args.steps)
    elif None not in (args.dataset_size, args.batch_size, args.epochs):
        try:
            sample_rate, steps = plan_steps(
                dataset_size=args.dataset_size, batch_size=args.batch_size, epochs=args.epochs
            )
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
    else:
        raise ConfigurationError("give --sample-rate and --steps, or --dataset-size, --batch-size and --epochs")
    try:
        if args.target_epsilon is not None:
            sigma = calibrate_noise_multiplier(
                target_epsilon=args.target_epsilon,
                delta=args.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=args.accountant,
            )
            epsilon = compute_epsilon(
                [MechanismSegment(sigma, sample_rate, steps)], delta=args.delta, accountant=args.accountant
            )
            output: dict[str, Any] = {"noiseMultiplier": sigma, "epsilon": epsilon}
            text = format_up(sigma, 6)
        else:
            if args.noise_multiplier is None:
                raise ConfigurationError("give --noise-multiplier (to compute ε) or --target-epsilon (to calibrate σ)")
            sigma = float(args.noise_multiplier)
            epsilon = compute_epsilon(
                [MechanismSegment(sigma, sample_rate, steps)], delta=args.delta, accountant=args.accountant
            )
            output = {"epsilon": epsilon, "noiseMultiplier": sigma}
            text = format_up(epsilon, 6)
    except (AccountingError, ValueError) as error:
        raise ConfigurationError(str(error)) from None
    output.update({"sampleRate": sample_rate, "steps": steps, "delta": args.delta, "accountant": args.accountant})
    print(json.dumps(output) if args.json else text)
    return 0


def audit_settings(job: DPTrainingJob, args: argparse.Namespace | None = None) -> AuditSettings:
    """The job's ``spec.audit`` (defaults when unset), with any flag of ``dptrain audit`` given in ``args`` on top."""
    from dptrain.audit import AuditSettings

    spec = job.spec.audit
    values: dict[str, Any] = {}
    if spec is not None:
        values = {"canaries": spec.canaries, "kind": spec.kind, "confidence": spec.confidence}
    if args is not None:
        flags = {
            "canaries": args.canaries,
            "kind": args.kind,
            "confidence": args.confidence,
            "data": args.data,
            "seed": args.seed,
            "processes": args.processes,
        }
        values.update({key: value for key, value in flags.items() if value is not None})
        values["private"] = not args.non_private
    return AuditSettings(**values)


def _cmd_audit(args: argparse.Namespace) -> int:
    from dptrain.audit import audit_report, run_audit, verdict, write_audit_report
    from dptrain.plan import make_plan, reserved_from_env

    loaded = load_job_manifest(
        args.manifest, from_env=args.from_env, data_dir=Path(args.data_dir) if args.data_dir else None
    )
    job = loaded.job
    settings = audit_settings(job, args)
    output = Path(args.output) if args.output else Path("runs") / f"{job.metadata.name or 'job'}-audit"
    plan = make_plan(job, dataset=loaded.dataset, reserved=reserved_from_env())
    if not args.json:
        kinds = " and ".join(settings.kinds)
        print(
            f"dptrain: auditing {job.metadata.name or 'job'}: {settings.canaries} {kinds} canaries per kind, "
            f"{plan.steps} steps{'' if settings.private else ' with noise and clipping OFF'}",
            file=sys.stderr,
        )
    result = run_audit(job, dataset=loaded.dataset, settings=settings, plan=plan, base_dir=loaded.base_dir)
    path = write_audit_report(result, output, namespace=job.metadata.namespace)
    if args.json:
        print(json.dumps(audit_report(result, namespace=job.metadata.namespace), allow_nan=False, ensure_ascii=False))
    else:
        best = result.best
        guesses = f"{best.correct} of {best.guesses} guesses right ({best.rule})" if best else "no informative guesses"
        print(f"{verdict(result)}\n{guesses}; {result.wall_seconds:.1f} s; report: {path}")
    return int(ExitCode.AUDIT_CONTRADICTED) if result.contradicted else 0


# --- parser --------------------------------------------------------------------------------------------------


def _add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest",
        nargs="?",
        metavar="MANIFEST",
        help="YAML/JSON file with the DPTrainingJob (and the PrivateDataset it names); - reads stdin",
    )
    parser.add_argument("--from-env", metavar="VAR", help="read the manifest from environment variable VAR instead")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder that file dataset paths are relative to (default: the manifest's folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dptrain", description="Differentially private training (DP-SGD, Opacus).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a DPTrainingJob (resumes from --output's checkpoint)")
    _add_manifest_arguments(run)
    run.add_argument("--output", metavar="DIR", help="checkpoint and output folder (default: runs/<job name>)")
    run.add_argument("--metrics-port", type=int, default=0, metavar="N", help="serve Prometheus metrics (0: off)")
    run.add_argument(
        "--metrics-address",
        default=os.environ.get(PodEnv.METRICS_ADDRESS) or "0.0.0.0",
        metavar="ADDR",
        help="address to serve metrics on (default: $DPTRAIN_METRICS_ADDRESS, else 0.0.0.0)",
    )
    run.add_argument(
        "--termination-message-path",
        metavar="P",
        help="where to write the termination message "
        "(default: $DPTRAIN_TERMINATION_MESSAGE_PATH, or /dev/termination-log in a pod)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar: plain lines at checkpoints only")
    run.add_argument(
        "--metrics-linger",
        type=float,
        default=30.0,
        metavar="S",
        help="after a privacy audit (spec.audit), keep serving metrics this long so they are scraped (default 30)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N data-parallel processes on this machine (torch.distributed: gloo on CPU, one GPU each "
        "with CUDA); in a pod the operator's PET_* environment says how many",
    )
    run.set_defaults(func=_cmd_run)

    plan = commands.add_parser("plan", help="print the privacy plan (q, steps, σ, planned ε) without training")
    _add_manifest_arguments(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument(
        "--records-per-patient",
        type=int,
        metavar="K",
        help="for a record-level plan: what it means for a patient with K records (group privacy)",
    )
    plan.set_defaults(func=_cmd_plan)

    audit = commands.add_parser(
        "audit",
        help="measure a lower bound on ε with canaries (one run on stand-in data, nothing charged)",
        description="Train the job's DP-SGD pipeline once with canaries on public (built-in datasets) or synthetic "
        "(file datasets) stand-in data and write audit-report.json: a lower bound on ε next to the claimed ε. "
        "Exit code 8 when the bound contradicts the claim. Flags override the job's spec.audit.",
    )
    _add_manifest_arguments(audit)
    audit.add_argument("--output", metavar="DIR", help="folder for audit-report.json (default: runs/<job name>-audit)")
    audit.add_argument("--canaries", type=int, metavar="M", help="canaries of each kind (default 1000)")
    audit.add_argument(
        "--kind", choices=["gradient", "input", "poisoned", "both", "all"], help="canary kind (default both)"
    )
    audit.add_argument(
        "--processes", type=int, metavar="N", help="run the DP-SGD steps through the distributed path on N processes"
    )
    audit.add_argument("--confidence", type=float, metavar="C", help="confidence of the bound (default 0.95)")
    audit.add_argument(
        "--data",
        choices=["auto", "public", "synthetic"],
        help="stand-in data: the public built-in data, or synthetic records shaped like the dataset (auto: public for "
        "built-in datasets, synthetic for files; a PrivateDataset's file is never read)",
    )
    audit.add_argument(
        "--non-private", action="store_true", help="switch noise and clipping off: how much the audit can detect"
    )
    audit.add_argument("--seed", type=int, metavar="N", help="seed of the canaries (the DP noise is always fresh)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=_cmd_audit)

    epsilon = commands.add_parser("epsilon", help="ε of a DP-SGD run, or the σ that meets a target ε")
    epsilon.add_argument("--sample-rate", type=float, metavar="Q")
    epsilon.add_argument("--steps", type=int, metavar="T")
    epsilon.add_argument("--dataset-size", type=int, metavar="N", help="with --batch-size and --epochs, instead of Q/T")
    epsilon.add_argument("--batch-size", type=int, metavar="B")
    epsilon.add_argument("--epochs", type=float, metavar="E")
    epsilon.add_argument("--noise-multiplier", type=float, metavar="S")
    epsilon.add_argument("--target-epsilon", type=float, metavar="E", help="calibrate σ for this ε instead")
    epsilon.add_argument("--delta", type=float, required=True, metavar="D")
    epsilon.add_argument("--accountant", default="pld", choices=["pld", "prv", "rdp"])
    epsilon.add_argument("--json", action="store_true", help="machine-readable output")
    epsilon.set_defaults(func=_cmd_epsilon)

    from dptrain.federated.cli import add_commands  # federate / federation (Flower: the `federated` extra)

    add_commands(commands)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="dptrain: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("absl", "numexpr", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _program() -> str:
    """``dptrain``, or ``dptrain[rank N]`` in a worker of a distributed run other than rank 0."""
    rank = os.environ.get(DistributedEnv.RANK, "0") if os.environ.get("TORCHELASTIC_RUN_ID") else "0"
    return "dptrain" if rank == "0" else f"dptrain[rank {rank}]"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dptrain`` console script; returns the exit code."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    args.argv = arguments  # a distributed run's workers get the same command line
    _configure_logging(getattr(args, "quiet", False))
    func: Callable[[argparse.Namespace], int] = args.func
    started = time.monotonic()
    try:
        return func(args)
    except ManifestError as error:
        print(f"{_program()}: error: {error}", file=sys.stderr)
        return ExitCode.INVALID_CONFIGURATION
    except DptrainError as error:
        print(f"{_program()}: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print(f"dptrain: interrupted after {time.monotonic() - started:.0f} s", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.CRASHED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
