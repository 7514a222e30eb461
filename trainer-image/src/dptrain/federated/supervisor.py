"""The two long-running processes of a federation, each the main process of its pod (or, with ``dptrain federate``,
a local process):

* :func:`run_server` — the coordinator: Flower's SuperLink (state in a database on the coordinator's volume), the
  sites' SuperNode keys registered, the run submitted with ``flwr run`` and followed with ``flwr ls`` until it
  finishes. A coordinator restarted after a crash (or a ServerApp that died) resumes from the last round's global
  checkpoint: runs left over are stopped, a new run continues after the last checkpointed round.
* :func:`run_site` — a site: its journal opened (a restart must find it: fail closed), its data checked, then Flower's
  SuperNode dialling out to the SuperLink, with the site's config file as node config. It ends when the coordinator
  says the federation finished (or aborted) or when it is told to stop, and reports what its journal charged.

Both write a termination message (the operator reads it), serve Prometheus metrics and stop their Flower processes on
SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Final

from dptrain.errors import DptrainError, JournalLostError
from dptrain.federated.config import NODE_CONFIG_KEY, RUN_CONFIG_KEY, ServerConfig, SiteConfig
from dptrain.federated.flower import (
    FlowerCli,
    FlowerProcess,
    TlsClient,
    TlsServer,
    flower_env,
    flower_executable,
    wait_until_serving,
)
from dptrain.federated.metrics import FederationExporter
from dptrain.federated.report import FEDERATION_REPORT_NAME, write_federation_report, write_site_report
from dptrain.federated.server_app import LATEST_NAME, STATUS_NAME, FederationStatus
from dptrain.federated.site import ABORTED_MARKER, FINISHED_MARKER, SiteState, initialise_journal, site_plan
from dptrain.journal import JOURNAL_NAME, PrivacyJournal
from dptrain.journal import summarize as summarize_segments
from dptrain.report import public_error
from dptrain_api import (
    SUPERNODE_RUNTIME_PORT,
    CoordinatorReport,
    ExitCode,
    GlobalMetricStatus,
    Mechanism,
    RunOutcome,
    SiteReport,
    TerminationMessage,
)

__all__ = ["ServerOptions", "SiteOptions", "run_server", "run_site"]

logger = logging.getLogger(__name__)

POLL_SECONDS: Final = 1.0
REPLY_GRACE_SECONDS: Final = 5.0
"""After the close (or abort) marker: time for the SuperNode to send the ClientApp's reply before it is stopped."""
CLOSE_WAIT_SECONDS: Final = 120.0
"""A site that received the final model but no close (the coordinator died in between) stops after this long."""
FLOWER_DIR: Final = "flower"
JOIN_RETRY_SECONDS: Final = 120.0
"""A SuperNode that cannot join in this long after the site started (the SuperLink not serving yet, or the site's key
not registered there yet) is started again instead of failing the site; later exits fail it (its pod restarts)."""
_JOIN_FAILURES: Final = ("Failed to activate SuperNode", "could not establish a connection to the SuperLink")


def _write_text(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        logger.warning("cannot write the termination message to %s: %s", path, error)


def _app_dir(destination: Path) -> Path:
    """The Flower App (configuration only: its components are this package's modules), copied where flwr can build
    its FAB from it."""
    source = resources.files("dptrain.federated").joinpath("app", "pyproject.toml")
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "pyproject.toml").write_text(source.read_text())
    return destination


# --- the coordinator ---------------------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    config: ServerConfig
    """The federation, its output folder and the sites expected to join (initialRound/resumeFrom are decided here)."""
    port: int
    host: str = "0.0.0.0"
    tls: TlsServer | None = None
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"
    termination_path: Path | None = None
    max_resubmissions: int = 3
    """Runs submitted again (resuming) after the ServerApp died without a verdict."""
    poll_seconds: float = 2.0


def _resume_point(out_dir: Path) -> tuple[int, Path | None, FederationStatus | None]:
    """(rounds already aggregated, the checkpoint to resume from, the status so far) from the output folder."""
    status = FederationStatus.read(out_dir)
    latest = out_dir / LATEST_NAME
    if status is None or status.completed_round <= 0 or not latest.exists():
        return 0, None, status
    frozen = out_dir / f"resume-from-{status.completed_round:04d}.pt"
    if not frozen.exists():
        shutil.copyfile(latest, frozen)  # latest.pt is overwritten by the next round; the resumed run reads this
    return status.completed_round, frozen, status


def _coordinator_report(
    options: ServerOptions, status: FederationStatus | None, *, exit_code: int, error: str | None = None
) -> CoordinatorReport:
    spec = options.config.federation.spec
    outcome = "Succeeded" if exit_code == 0 else ("Interrupted" if exit_code == ExitCode.TERMINATED else "Failed")
    sites = []
    metric = None
    if status is not None:
        for name, progress in sorted(status.sites.items()):
            sites.append(
                SiteReport(
                    name=name,
                    epsilon=progress.epsilon,
                    steps=progress.charged_steps,
                    planned_steps=progress.planned_steps,
                    target_epsilon=progress.target_epsilon,
                    rounds=len(progress.rounds),
                    error=(progress.last_error or None) and str(progress.last_error)[:300],
                )
            )
        if status.global_metric:
            name = spec.data.metric
            entry = status.global_metric
            metric = GlobalMetricStatus(
                metric=name,
                value=entry.get(name, entry.get("accuracy")),
                loss=entry.get("loss"),
                round=entry.get("round"),
                sites=entry.get("sites"),
            )
    return CoordinatorReport(
        status=outcome,
        exit_code=exit_code,
        reason=None if exit_code == 0 else (status.error.split(":", 1)[0] if status and status.error else None),
        error=error or (status.error if status is not None and exit_code != 0 else None),
        completed_rounds=status.completed_round if status is not None else 0,
        total_rounds=spec.training.rounds,
        sites=sites,
        global_metric=metric,
    )


def _export_server(exporter: FederationExporter, options: ServerOptions, status: FederationStatus | None) -> None:
    spec = options.config.federation.spec
    if status is None:
        exporter.federation(
            completed=0, total=spec.training.rounds, min_sites=spec.min_sites, round_seconds=None, finished=False
        )
        return
    exporter.federation(
        completed=status.completed_round,
        total=spec.training.rounds,
        min_sites=spec.min_sites,
        round_seconds=status.round_seconds[-1] if status.round_seconds else None,
        finished=status.state == "succeeded",
    )
    for name, progress in status.sites.items():
        exporter.site(
            name,
            epsilon=progress.epsilon,
            target=progress.target_epsilon,
            steps=progress.charged_steps,
            planned=progress.planned_steps,
            rounds=len(progress.rounds),
        )
    if status.global_metric:
        exporter.global_metric(status.global_metric)


def run_server(options: ServerOptions, stop: threading.Event) -> int:  # noqa: C901, PLR0912, PLR0915 - to split with the federated/ regroup by role (issue 24)
    """The coordinator's main loop; returns its exit code (0: the federation finished, every round aggregated)."""
    config = options.config
    federation = config.federation
    out_dir = config.out_dir
    flower = out_dir / FLOWER_DIR
    exporter = FederationExporter(
        federation=federation.metadata.name or "federation",
        namespace=federation.metadata.namespace or "default",
        port=options.metrics_port,
        address=options.metrics_address,
    )
    exporter.start()
    superlink: FlowerProcess | None = None
    status: FederationStatus | None = None
    try:
        initial, resume_from, status = _resume_point(out_dir)
        if initial > 0:
            logger.warning(
                "an earlier coordinator aggregated %d round(s): resuming after round %d from %s",
                initial,
                initial,
                resume_from,
            )
        _export_server(exporter, options, status)
        if status is not None and status.state == "succeeded":  # a restart after the end: nothing left to run
            return _finish_server(options, status, exit_code=0)
        tls_client = TlsClient(ca_certificate=options.tls.ca_certificate) if options.tls is not None else None
        command = [flower_executable("flower-superlink")]
        if options.tls is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(options.tls.ca_certificate),
                "--ssl-certfile",
                str(options.tls.certificate),
                "--ssl-keyfile",
                str(options.tls.key),
            ]
        if federation.spec.superlink.node_authentication:
            command.append("--enable-supernode-auth")
        command += [
            "--host",
            options.host,
            "--port",
            str(options.port),
            "--isolation",
            "subprocess",
            "--database",
            str(flower / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        superlink = FlowerProcess(
            "superlink", command, env=flower_env(flower / "home-superlink"), log_path=flower / "superlink.log"
        )
        local = f"127.0.0.1:{options.port}"
        wait_until_serving(local, tls=tls_client, process=superlink)
        cli = FlowerCli(flower / "home-cli", address=local, tls=tls_client)
        if federation.spec.superlink.node_authentication:
            for site in federation.spec.sites:
                if config.expected_sites and site.name not in config.expected_sites:
                    continue  # refused (consent, budget): its key is never needed, and may be a placeholder
                assert site.public_key is not None  # the schema requires it with node authentication
                cli.register(site.name, site.public_key)
        stale = cli.stop_unfinished()
        if stale:
            logger.info("stopped runs left by an earlier coordinator: %s", ", ".join(stale))
        app = _app_dir(flower / "app")
        resubmissions = 0
        while True:
            run_config = ServerConfig(
                federation=federation,
                out_dir=out_dir,
                initial_round=initial,
                resume_from=resume_from,
                expected_sites=config.expected_sites,
                join_timeout_seconds=config.join_timeout_seconds,
            ).write(flower / "server-config.json")
            run_id = cli.run(app, {RUN_CONFIG_KEY: str(run_config)})
            logger.info("submitted run %s (rounds %d..%d)", run_id, initial + 1, federation.spec.training.rounds)
            verdict = _follow(cli, run_id, superlink=superlink, exporter=exporter, options=options, stop=stop)
            status = FederationStatus.read(out_dir)
            if verdict == "finished:completed" and status is not None and status.state == "succeeded":
                return _finish_server(options, status, exit_code=0)
            if verdict == "stopped":
                return _finish_server(options, status, exit_code=ExitCode.TERMINATED)
            if verdict == "superlink-died":
                error = f"the SuperLink exited ({superlink.returncode}); the coordinator restarts and resumes"
                return _finish_server(options, status, exit_code=ExitCode.CRASHED, error=error)
            if status is not None and status.state == "failed":  # the ServerApp gave up (and told the sites)
                return _finish_server(options, status, exit_code=ExitCode.CRASHED)
            resubmissions += 1
            if resubmissions > options.max_resubmissions:
                error = f"the ServerApp ended without a verdict {resubmissions} times ({verdict})"
                return _finish_server(options, status, exit_code=ExitCode.CRASHED, error=error)
            initial, resume_from, status = _resume_point(out_dir)
            logger.warning("the ServerApp ended without a verdict (%s); resuming after round %d", verdict, initial)
    except DptrainError as error:
        return _finish_server(options, status, exit_code=int(error.exit_code), error=str(error))
    except Exception as error:
        logger.exception("the coordinator failed")
        return _finish_server(options, status, exit_code=ExitCode.CRASHED, error=f"{type(error).__name__}: {error}")
    finally:
        if superlink is not None:
            superlink.stop()
        exporter.close()


def _follow(
    cli: FlowerCli,
    run_id: str,
    *,
    superlink: FlowerProcess,
    exporter: FederationExporter,
    options: ServerOptions,
    stop: threading.Event,
) -> str:
    """Poll the run until it finishes; its final status, "stopped" (SIGTERM) or "superlink-died"."""
    while True:
        if stop.wait(options.poll_seconds):
            try:
                cli.stop(run_id)
            except Exception as error:
                logger.warning("cannot stop run %s: %s", run_id, error)
            return "stopped"
        if not superlink.running:
            return "superlink-died"
        _export_server(exporter, options, FederationStatus.read(options.config.out_dir))
        try:
            state, details = cli.run_status(run_id)
        except Exception as error:  # the CLI timed out or the SuperLink is busy: ask again
            logger.warning("flwr ls failed: %s", error)
            continue
        if state.startswith("finished:"):
            if state != "finished:completed":
                logger.warning("run %s %s: %s", run_id, state, details)
            return state


def _finish_server(
    options: ServerOptions, status: FederationStatus | None, *, exit_code: int, error: str | None = None
) -> int:
    out_dir = options.config.out_dir
    raw = {}
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads((out_dir / STATUS_NAME).read_text())
    if raw:
        write_federation_report(options.config, raw, path=out_dir / FEDERATION_REPORT_NAME)
    report = _coordinator_report(options, status, exit_code=exit_code, error=error)
    _write_text(options.termination_path, report.to_text())
    if exit_code != 0:
        logger.error("the coordinator ends with exit code %d: %s", exit_code, report.error)
    return exit_code


# --- a site ------------------------------------------------------------------------------------------------------


@dataclass
class SiteOptions:
    config: SiteConfig
    superlink: str
    """host:port of the coordinator's SuperLink."""
    tls: TlsClient | None = None
    runtime_host: str = "127.0.0.1"
    """Where the SuperNode's local Runtime API listens (only its own SuperExec/ClientApps use it)."""
    runtime_port: int = SUPERNODE_RUNTIME_PORT
    attempt: int = 1
    """1 for the site's first SuperNode, n for its n-th: every later one must find the site's journal."""
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"
    termination_path: Path | None = None
    extra_node_config: dict[str, str] = field(default_factory=dict)


def _site_message(options: SiteOptions, *, exit_code: int, error: BaseException | str | None = None) -> str:
    """The site's termination message, in the trainer pods' contract: what its journal charged."""
    config = options.config
    plan = None
    with contextlib.suppress(DptrainError):
        plan = site_plan(config)
    journal_path = config.workdir / JOURNAL_NAME
    charged_steps: int | None = None
    charged_releases: int | None = None
    epsilon: float | None = None
    entries = 0
    segments = []
    if journal_path.exists():
        try:
            journal = PrivacyJournal(journal_path)
            charged_steps, charged_releases = journal.charged_steps, journal.charged_releases
            entries = len(journal.entries)
            segments = [Mechanism.model_validate(segment) for segment in summarize_segments(journal.entries)]
            if plan is not None:
                epsilon = journal.epsilon(plan.delta, plan.accountant)
        except Exception as journal_error:  # unknown: the operator keeps the whole reservation charged
            logger.warning("cannot read the site's privacy journal: %s", journal_error)
    elif options.attempt <= 1:  # a first attempt without a journal charged nothing
        charged_steps, charged_releases, epsilon = 0, 0, 0.0
    state = SiteState.read(config.workdir)
    if exit_code == 0:
        outcome = RunOutcome.SUCCEEDED
    elif exit_code == ExitCode.TERMINATED:
        outcome = RunOutcome.INTERRUPTED
    else:
        outcome = RunOutcome.FAILED
    message = TerminationMessage(
        status=outcome,
        exit_code=exit_code,
        reason=type(error).__name__ if isinstance(error, BaseException) else (None if exit_code == 0 else "Federation"),
        error=(public_error(error) if isinstance(error, BaseException) else str(error))[:2000] if error else None,
        epsilon=epsilon,
        delta=plan.delta if plan else None,
        target_epsilon=plan.target_epsilon if plan else None,
        noise_multiplier=plan.noise_multiplier if plan else None,
        sample_rate=plan.sample_rate if plan else None,
        planned_steps=plan.steps if plan else None,
        planned_epsilon=plan.planned_epsilon if plan else None,
        accountant=plan.accountant if plan else None,
        max_grad_norm=plan.max_grad_norm if plan else None,
        charged_steps=charged_steps,
        charged_releases=charged_releases,
        holdout_noise_multiplier=plan.holdout_noise_multiplier if plan else None,
        planned_releases=plan.releases if plan else None,
        steps_run=len(state.rounds),
        attempts=options.attempt,
        clipping_mode=state.clipping_mode or None,
        journal_entries=entries,
        segments=segments,
    )
    return message.to_text()


def _export_site(exporter: FederationExporter, options: SiteOptions) -> None:
    config = options.config
    try:
        plan = site_plan(config)
        journal = PrivacyJournal(config.workdir / JOURNAL_NAME)
        state = SiteState.read(config.workdir)
        exporter.site(
            config.name,
            epsilon=journal.epsilon(plan.delta, plan.accountant),
            target=plan.target_epsilon,
            steps=journal.charged_steps,
            planned=plan.steps,
            rounds=len(state.rounds),
        )
        exporter.federation(
            completed=max(state.rounds, default=0),
            total=config.site.spec.training.rounds,
            min_sites=0,
            round_seconds=None,
            finished=state.state == "finished",
        )
    except Exception as error:  # metrics are best effort
        logger.debug("cannot export the site's metrics: %s", error)


def run_site(options: SiteOptions, stop: threading.Event) -> int:  # noqa: C901, PLR0912, PLR0915 - to split with the federated/ regroup by role (issue 24)
    """A site's main loop; returns its exit code (0: the coordinator finished the federation)."""
    config = options.config
    workdir = config.workdir
    flower = workdir / FLOWER_DIR
    spec = config.site.spec
    exporter = FederationExporter(
        federation=spec.federation.name,
        namespace=config.site.metadata.namespace or "default",
        port=options.metrics_port,
        address=options.metrics_address,
    )
    exporter.start()
    supernode: FlowerProcess | None = None
    exit_code = int(ExitCode.CRASHED)
    error: BaseException | str | None = None
    try:
        plan = site_plan(config)  # a plan other than the reserved one stops here, before anything is charged
        if stop.is_set():  # told to stop while starting: nothing ran
            exit_code, error = int(ExitCode.TERMINATED), "stopped before the SuperNode started"
            return exit_code
        initialise_journal(config, expect_journal=options.attempt > 1)
        if (workdir / FINISHED_MARKER).exists():  # restarted after the federation finished: only report
            exit_code = 0
            return exit_code
        from dptrain.federated.site import SiteRuntime

        SiteRuntime(config)._load_data()  # a bad file or shape fails the site now, not in every round
        site_config = config.write(flower / "site-config.json")
        node_config = {NODE_CONFIG_KEY: str(site_config), "site-id": config.name, **options.extra_node_config}
        command = [flower_executable("flower-supernode")]
        if options.tls is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(options.tls.ca_certificate)]
            if options.tls.auth_key is not None:
                command += ["--auth-supernode-private-key", str(options.tls.auth_key)]
        command += [
            "--superlink",
            options.superlink,
            "--host",
            options.runtime_host,
            "--port",
            str(options.runtime_port),
            "--isolation",
            "subprocess",
            "--node-config",
            " ".join(f"{key}={_toml(value)}" for key, value in node_config.items()),
        ]

        def start_supernode() -> FlowerProcess:
            return FlowerProcess(
                "supernode", command, env=flower_env(flower / "home"), log_path=flower / "supernode.log"
            )

        supernode = start_supernode()
        started = time.monotonic()
        finished_since: float | None = None
        while True:
            _export_site(exporter, options)
            if (workdir / FINISHED_MARKER).exists():
                stop.wait(REPLY_GRACE_SECONDS)
                exit_code = 0
                break
            if (workdir / ABORTED_MARKER).exists():
                stop.wait(REPLY_GRACE_SECONDS)
                exit_code, error = int(ExitCode.FEDERATION_ABORTED), SiteState.read(workdir).message
                break
            if SiteState.read(workdir).state == "finished":
                finished_since = finished_since or time.monotonic()
                if time.monotonic() - finished_since > CLOSE_WAIT_SECONDS:
                    exit_code = 0
                    break
            if not supernode.running and time.monotonic() - started < JOIN_RETRY_SECONDS:
                # The whole log of this start: its SuperExec child goes on logging after the join failure.
                log = supernode.log_of_this_start()
                if any(failure in log for failure in _JOIN_FAILURES):
                    logger.warning("the SuperNode could not join the SuperLink yet; starting it again")
                    supernode.stop()
                    if stop.wait(2.0):
                        exit_code, error = int(ExitCode.TERMINATED), "stopped by a signal"
                        break
                    supernode = start_supernode()
                    continue
            if not supernode.running:
                exit_code = int(ExitCode.CRASHED)
                error = f"the SuperNode exited with {supernode.returncode}: {supernode.log_tail(600)}"
                break
            if stop.wait(POLL_SECONDS):
                exit_code, error = int(ExitCode.TERMINATED), "stopped by a signal"
                break
        del plan
        return exit_code
    except JournalLostError as lost:
        exit_code, error = int(lost.exit_code), lost
        return exit_code
    except DptrainError as failure:
        exit_code, error = int(failure.exit_code), failure
        return exit_code
    except Exception as failure:
        logger.exception("the site failed")
        exit_code, error = int(ExitCode.CRASHED), failure
        return exit_code
    finally:
        if supernode is not None:
            supernode.stop()
        _export_site(exporter, options)
        if exit_code == 0:
            try:
                write_site_report(config, site_plan(config))
            except Exception as report_error:  # the report must not turn a finished site into a failed one
                logger.warning("cannot write the site's privacy report: %s", report_error)
        _write_text(options.termination_path, _site_message(options, exit_code=exit_code, error=error))
        exporter.close()


def _toml(value: str) -> str:
    """A TOML basic string (Flower parses --node-config values as TOML)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
