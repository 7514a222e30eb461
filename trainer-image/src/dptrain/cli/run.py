"""`dptrain run`: train a job locally, in a pod, or as one process of a distributed run."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from dptrain.cli.audit import audit_settings
from dptrain.cli.common import attempt_number, logger, program
from dptrain.cli.manifest import LoadedManifest, example_count_source, load_job_manifest
from dptrain.console import ConsoleProgress, print_summary
from dptrain.errors import ConfigurationError, TrainingInterrupted
from dptrain_api import (
    DPTrainingJob,
    ExitCode,
    PodEnv,
    TerminationMessage,
)

if TYPE_CHECKING:
    from dptrain.distributed import Group, Topology
    from dptrain.metrics import PrometheusExporter
    from dptrain.plan import TrainingPlan
    from dptrain.report import ReportWriter, StatusReport


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
                example_count_source=example_count_source(loaded),
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
                expect_journal=attempt_number() > 1,
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
            print(f"{program()}: {error}", file=sys.stderr)
            return int(error.exit_code)
        raise error

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()


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


def cmd_run(args: argparse.Namespace) -> int:
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
