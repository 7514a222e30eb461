"""The federated commands of ``dptrain`` (they need the ``federated`` extra, i.e. Flower):

* ``dptrain federate JOB.yaml --output DIR`` — a whole federation on this machine (:mod:`dptrain.federated.local`);
* ``dptrain federation server`` — the coordinator pod's main process (SuperLink, the run, its checkpoints);
* ``dptrain federation site`` — a site's SuperNode pod's main process;
* ``dptrain federation pki`` — test key material: a CA, the SuperLink's certificate, one SuperNode key per site.

Nothing here imports Flower at import time, so ``dptrain run`` works without the extra.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from dptrain.cli.common import attempt_number
from dptrain.errors import ConfigurationError
from dptrain_api import (
    SUPERNODE_RUNTIME_PORT,
    DPFederatedJob,
    DPFederatedSite,
    ExitCode,
    PodEnv,
    PrivateDataset,
    load_documents,
    parse_federation_resource,
)

__all__ = ["EXPECTED_SITES_ENV", "add_commands"]

EXPECTED_SITES_ENV = PodEnv.FEDERATION_EXPECTED_SITES.value
"""Comma-separated sites the coordinator's round 1 waits for (the operator sets it on the coordinator pod)."""


@contextmanager
def _signals(stop: threading.Event) -> Iterator[list[int]]:
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    from dptrain import _entry

    if _entry.EARLY_SIGNALS:  # stopped while the command was still importing
        received.extend(_entry.EARLY_SIGNALS)
        stop.set()
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _text(args: argparse.Namespace) -> tuple[str, str]:
    if args.from_env:
        text = os.environ.get(args.from_env)
        if not text or not text.strip():
            raise ConfigurationError(f"--from-env {args.from_env}: the environment variable is not set or empty")
        return text, f"${args.from_env}"
    if not args.manifest:
        raise ConfigurationError("give a MANIFEST file or --from-env VAR")
    path = Path(args.manifest)
    try:
        return path.read_text(), str(path)
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror}") from None


def _resources(args: argparse.Namespace) -> list[Any]:
    text, source = _text(args)
    return [
        parse_federation_resource(document, source=f"{source}[{index}]")
        for index, document in enumerate(load_documents(text, source=source))
    ]


def _termination_path(args: argparse.Namespace) -> Path | None:
    from dptrain.report import default_termination_path

    return Path(args.termination_message_path) if args.termination_message_path else default_termination_path()


# --- commands -------------------------------------------------------------------------------------------------------


def _cmd_federate(args: argparse.Namespace) -> int:
    from dptrain.federated.local import load_federation, print_result, run_local

    path = Path(args.manifest)
    output = Path(args.output) if args.output else Path("runs") / f"{load_federation(path).job.metadata.name}"
    result = run_local(path, output, secure=args.secure, join_timeout=args.join_timeout)
    print_result(result, output, load_federation(path).job)
    return result.exit_code


def _cmd_server(args: argparse.Namespace) -> int:
    stop = threading.Event()
    with _signals(stop) as received:  # before the heavy imports: a SIGTERM at start-up still gets a clean report
        code = _server(args, stop)
    return 128 + received[0] if received and code == ExitCode.TERMINATED else code


def _server(args: argparse.Namespace, stop: threading.Event) -> int:
    from dptrain.federated.config import ServerConfig
    from dptrain.federated.flower import TlsServer
    from dptrain.federated.supervisor import ServerOptions, run_server

    jobs = [resource for resource in _resources(args) if isinstance(resource, DPFederatedJob)]
    if len(jobs) != 1:
        raise ConfigurationError(f"expected exactly one DPFederatedJob, found {len(jobs)}")
    job = jobs[0]
    expected = [name for name in (args.expected_sites or os.environ.get(EXPECTED_SITES_ENV, "")).split(",") if name]
    tls = None
    if args.tls_dir:
        directory = Path(args.tls_dir)
        tls = TlsServer(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    elif not job.spec.superlink.insecure:
        raise ConfigurationError("the federation is not insecure: give --tls-dir with ca.crt, tls.crt and tls.key")
    options = ServerOptions(
        config=ServerConfig(
            federation=job,
            out_dir=Path(args.output),
            expected_sites=expected,
            join_timeout_seconds=args.join_timeout,
        ),
        port=args.port or job.spec.superlink.port,
        host=args.host,
        tls=tls,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        termination_path=_termination_path(args),
    )
    return run_server(options, stop)


def _cmd_site(args: argparse.Namespace) -> int:
    stop = threading.Event()
    with _signals(stop) as received:  # before the heavy imports: a SIGTERM at start-up still gets a clean report
        code = _site(args, stop)
    return 128 + received[0] if received and code == ExitCode.TERMINATED else code


def _site(args: argparse.Namespace, stop: threading.Event) -> int:
    from dptrain.federated.config import SiteConfig
    from dptrain.federated.flower import TlsClient
    from dptrain.federated.supervisor import SiteOptions, run_site
    from dptrain.plan import reserved_from_env

    resources = _resources(args)
    sites = [resource for resource in resources if isinstance(resource, DPFederatedSite)]
    if len(sites) != 1:
        raise ConfigurationError(f"expected exactly one DPFederatedSite, found {len(sites)}")
    site = sites[0]
    wanted = site.spec.dataset_ref.name
    datasets = [r for r in resources if isinstance(r, PrivateDataset) and r.metadata.name == wanted]
    if len(datasets) != 1:
        raise ConfigurationError(f"the manifest must hold the PrivateDataset {wanted!r} the site names")
    dataset = datasets[0]
    if dataset.metadata.namespace is None:
        dataset.metadata.namespace = site.metadata.namespace
    identity = os.environ.get(PodEnv.DATASET_IDENTITY, "").strip() or None
    if identity is not None:
        from dptrain_api import source_identity

        actual = source_identity(dataset.metadata.namespace or "default", dataset.spec.source)
        if actual != identity:
            raise ConfigurationError(f"this pod was admitted for dataset {identity!r}, not {actual!r}; refusing")
    connection = site.spec.superlink
    tls = None
    if not connection.insecure:
        if not args.ca:
            raise ConfigurationError("the site's SuperLink connection is TLS: give --ca (the SuperLink's CA)")
        tls = TlsClient(ca_certificate=Path(args.ca), auth_key=Path(args.auth_key) if args.auth_key else None)
    config = SiteConfig(
        site=site,
        dataset=dataset,
        workdir=Path(args.output),
        data_dir=Path(args.data_dir) if args.data_dir else Path.cwd(),
        reserved=reserved_from_env(),
        identity=identity,
    )
    options = SiteOptions(
        config=config,
        superlink=args.superlink or connection.address,
        tls=tls,
        runtime_host=args.runtime_host,
        runtime_port=args.runtime_port,
        attempt=attempt_number(),
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        termination_path=_termination_path(args),
    )
    return run_site(options, stop)


def _cmd_pki(args: argparse.Namespace) -> int:
    from dptrain.federated.pki import make_server_pki, make_site_key

    output = Path(args.output)
    server = make_server_pki(output, hosts=args.host or ["localhost"])
    keys = {site: make_site_key(output, site).public_key for site in args.site or []}
    print(
        json.dumps(
            {
                "caCertificate": str(server.ca_certificate),
                "certificate": str(server.certificate),
                "key": str(server.key),
                "publicKeys": keys,
            },
            indent=1,
        )
    )
    return 0


# --- parser ----------------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", nargs="?", metavar="MANIFEST", help="YAML/JSON manifest file")
    parser.add_argument("--from-env", metavar="VAR", help="read the manifest from environment variable VAR instead")
    parser.add_argument("--output", required=True, metavar="DIR", help="the pod's volume (journal, checkpoints)")
    parser.add_argument("--metrics-port", type=int, default=0, metavar="N", help="serve Prometheus metrics (0: off)")
    parser.add_argument(
        "--metrics-address",
        default=os.environ.get(PodEnv.METRICS_ADDRESS) or "0.0.0.0",
        metavar="ADDR",
        help="address to serve metrics on (default: $DPTRAIN_METRICS_ADDRESS, else 0.0.0.0)",
    )
    parser.add_argument("--termination-message-path", metavar="P", help="where to write the termination message")
    parser.add_argument("--quiet", action="store_true", help="warnings only")


def add_commands(commands: Any) -> None:
    """Register ``federate`` and ``federation`` on the ``dptrain`` parser's subcommands."""
    federate = commands.add_parser(
        "federate",
        help="run a whole federation locally (a SuperLink and one SuperNode per site as local processes)",
        description="Run a DPFederatedJob and its sites' PrivateDatasets on this machine with Flower; writes "
        "DIR/global-model.pt, DIR/federation-report.json and DIR/sites/<site>/privacy-report.json.",
    )
    federate.add_argument("manifest", metavar="JOB.yaml", help="a DPFederatedJob and the PrivateDataset of each site")
    federate.add_argument("--output", metavar="DIR", help="output folder (default: runs/<federation name>)")
    federate.add_argument(
        "--secure", action="store_true", help="TLS and SuperNode authentication with keys generated in DIR/pki"
    )
    federate.add_argument(
        "--join-timeout", type=float, default=120.0, metavar="S", help="how long round 1 waits for every site"
    )
    federate.add_argument("--quiet", action="store_true", help="warnings only")
    federate.set_defaults(func=_cmd_federate)

    federation = commands.add_parser("federation", help="the coordinator's and a site's pod processes, key material")
    roles = federation.add_subparsers(dest="role", required=True, metavar="ROLE")
    server = roles.add_parser("server", help="the coordinator: Flower's SuperLink and the federation's run")
    _common(server)
    server.add_argument("--port", type=int, default=0, metavar="N", help="SuperLink port (default: spec.superlink)")
    server.add_argument("--host", default="0.0.0.0", metavar="ADDR", help="address the SuperLink binds")
    server.add_argument("--tls-dir", metavar="DIR", help="folder with ca.crt, tls.crt, tls.key (the TLS Secret)")
    server.add_argument(
        "--expected-sites", metavar="A,B", help=f"sites round 1 waits for (default ${EXPECTED_SITES_ENV})"
    )
    server.add_argument("--join-timeout", type=float, default=300.0, metavar="S", help="how long round 1 waits")
    server.set_defaults(func=_cmd_server)

    site = roles.add_parser("site", help="a site: Flower's SuperNode dialling the coordinator, next to the data")
    _common(site)
    site.add_argument("--data-dir", metavar="DIR", help="where a file dataset's path resolves (the data claim)")
    site.add_argument("--superlink", metavar="HOST:PORT", help="override spec.superlink.address")
    site.add_argument("--ca", metavar="FILE", help="CA certificate of the SuperLink (TLS)")
    site.add_argument("--auth-key", metavar="FILE", help="the SuperNode's private key (SuperNode authentication)")
    site.add_argument("--runtime-host", default="127.0.0.1", metavar="ADDR", help="the SuperNode's local Runtime API")
    site.add_argument("--runtime-port", type=int, default=SUPERNODE_RUNTIME_PORT, metavar="N", help="its port")
    site.set_defaults(func=_cmd_site)

    pki = roles.add_parser("pki", help="test key material: a CA, the SuperLink certificate, SuperNode keys")
    pki.add_argument("--output", required=True, metavar="DIR")
    pki.add_argument("--host", action="append", metavar="NAME", help="a name the SuperLink certificate must carry")
    pki.add_argument("--site", action="append", metavar="SITE", help="a site to make a SuperNode key pair for")
    pki.set_defaults(func=_cmd_pki)
