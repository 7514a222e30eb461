"""``dptrain federate JOB.yaml --output DIR``: a whole federation on one machine.

The manifest holds a DPFederatedJob and the PrivateDataset of each site (its ``sites[]`` name them by namespace and
``datasetRef``). Everything runs as local processes, exactly as in a cluster: one coordinator supervisor (Flower's
SuperLink; the ServerApp submitted with ``flwr run``) and one site supervisor per site (Flower's SuperNode dialling
the SuperLink, the site's ClientApp running dptrain's DP-SGD engine on the site's records with the site's own journal).
Before round 1 each site's plan is checked against its dataset's consent and budget, as a site's operator would.

Output: ``DIR/global-model.pt``, ``DIR/federation-report.json``, and per site ``DIR/sites/<site>/`` with its
``privacy-report.json``, privacy journal and final global model. ``--secure`` runs TLS and SuperNode authentication
with key material generated under ``DIR/pki`` (as Flower documents them); the default is plain loopback.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dptrain.errors import ConfigurationError, PrivacyBudgetError
from dptrain.federated.config import ServerConfig, SiteConfig
from dptrain.federated.flower import TlsClient, TlsServer
from dptrain.federated.server_app import FINAL_MODEL_NAME, FederationStatus
from dptrain.federated.site import site_plan
from dptrain.federated.supervisor import ServerOptions, SiteOptions, run_server, run_site
from dptrain_api import (
    DPFederatedJob,
    PrivateDataset,
    SuperLinkConnection,
    dataset_allows,
    load_federation_manifest_file,
    site_object,
)
from dptrain_api.federation import federation_reference_of

__all__ = ["LocalFederation", "LocalResult", "load_federation", "run_local"]

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalFederation:
    job: DPFederatedJob
    datasets: dict[str, PrivateDataset]
    """site name → its PrivateDataset."""
    base_dir: Path


def load_federation(path: Path) -> LocalFederation:
    resources = load_federation_manifest_file(path)
    jobs = [resource for resource in resources if isinstance(resource, DPFederatedJob)]
    if len(jobs) != 1:
        raise ConfigurationError(f"{path}: expected exactly one DPFederatedJob, found {len(jobs)}")
    job = jobs[0]
    if job.metadata.namespace is None:
        job.metadata.namespace = "default"
    found = [resource for resource in resources if isinstance(resource, PrivateDataset)]
    datasets: dict[str, PrivateDataset] = {}
    for site in job.spec.sites:
        if site.external or site.dataset_ref is None:
            raise ConfigurationError(
                f"{path}: site {site.name} is external (no namespace/datasetRef); a local federation runs every site "
                "here: give it a namespace and the datasetRef of a PrivateDataset in this file"
            )
        matches = [
            dataset
            for dataset in found
            if dataset.metadata.name == site.dataset_ref.name
            and (dataset.metadata.namespace or site.namespace) == site.namespace
        ]
        if len(matches) != 1:
            raise ConfigurationError(
                f"{path}: site {site.name} names PrivateDataset {site.namespace}/{site.dataset_ref.name}; the file "
                f"holds {len(matches)} such PrivateDataset(s)"
            )
        dataset = matches[0]
        dataset.metadata.namespace = site.namespace
        datasets[site.name] = dataset
    return LocalFederation(job=job, datasets=datasets, base_dir=path.resolve().parent)


@dataclass
class LocalResult:
    exit_code: int
    server_exit: int
    site_exits: dict[str, int]
    refused: dict[str, str]
    status: FederationStatus | None


def _secure(job: DPFederatedJob, output: Path, sites: list[str]) -> tuple[TlsServer, dict[str, Path]]:
    from dptrain.federated.pki import make_server_pki, make_site_key

    pki = output / "pki"
    server = make_server_pki(pki, hosts=["127.0.0.1"])
    keys = {name: make_site_key(pki, name) for name in sites}
    spec = job.spec
    spec.superlink = spec.superlink.model_copy(
        update={"insecure": False, "tls_secret_name": "local", "node_authentication": True}
    )
    spec.sites = [site.model_copy(update={"public_key": keys[site.name].public_key}) for site in spec.sites]
    return TlsServer(server.ca_certificate, server.certificate, server.key), {n: k.private_key for n, k in keys.items()}


def run_local(path: Path, output: Path, *, secure: bool = False, join_timeout: float = 120.0) -> LocalResult:  # noqa: C901, PLR0912, PLR0915 - to split with the federated/ regroup by role (issue 24)
    federation = load_federation(path)
    job = federation.job
    output.mkdir(parents=True, exist_ok=True)
    reference = federation_reference_of(job)
    refused: dict[str, str] = {}
    admitted: list[str] = []
    configs: dict[str, SiteConfig] = {}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    tls_server: TlsServer | None = None
    site_keys: dict[str, Path] = {}
    if secure:
        tls_server, site_keys = _secure(job, output, [site.name for site in job.spec.sites])
    else:
        job.spec.superlink = job.spec.superlink.model_copy(
            update={"insecure": True, "tls_secret_name": None, "node_authentication": False}
        )
    for site in job.spec.sites:
        dataset = federation.datasets[site.name]
        if not dataset_allows(dataset, reference):
            refused[site.name] = (
                f"FederationNotAllowed: PrivateDataset {dataset.metadata.name} does not list federation "
                f"{reference.namespace}/{reference.name} in spec.allowFederations"
            )
            continue
        connection = SuperLinkConnection(
            address=address,
            insecure=not secure,
            ca_secret_name="local" if secure else None,
            auth_key_secret_name="local" if secure else None,
        )
        site_resource = site_object(job, site, superlink=connection)
        site_resource.metadata.uid = f"local/{reference.namespace}/{reference.name}/{site.name}"
        config = SiteConfig(
            site=site_resource,
            dataset=dataset,
            workdir=output / "sites" / site.name,
            data_dir=federation.base_dir,
        )
        try:
            plan = site_plan(config)
        except ConfigurationError as error:
            refused[site.name] = f"InvalidPlan: {error}"
            continue
        if plan.planned_epsilon > dataset.spec.budget.epsilon:
            refused[site.name] = (
                f"BudgetExceeded: the site's plan needs ε={plan.planned_epsilon:.4g}, more than its dataset's budget "
                f"ε={dataset.spec.budget.epsilon:g}"
            )
            continue
        configs[site.name] = config
        admitted.append(site.name)
    for name, reason in refused.items():
        logger.warning("site %s refused: %s", name, reason)
    if len(admitted) < job.spec.min_sites:
        raise PrivacyBudgetError(
            f"only {len(admitted)} site(s) can take part ({', '.join(admitted) or 'none'}), fewer than "
            f"minSites={job.spec.min_sites}; refused: {refused}"
        )
    stop = threading.Event()
    server_options = ServerOptions(
        config=ServerConfig(
            federation=job,
            out_dir=output / "coordinator",
            expected_sites=admitted,
            join_timeout_seconds=join_timeout,
        ),
        port=port,
        host="127.0.0.1",
        tls=tls_server,
        termination_path=output / "coordinator" / "termination-message.json",
    )
    results: dict[str, int] = {}

    def server() -> None:
        results["__server__"] = run_server(server_options, stop)

    site_stops = {name: threading.Event() for name in admitted}

    def run_one_site(name: str) -> None:
        config = configs[name]
        tls = None
        if secure:
            assert tls_server is not None
            tls = TlsClient(ca_certificate=tls_server.ca_certificate, auth_key=site_keys[name])
        options = SiteOptions(
            config=config,
            superlink=address,
            tls=tls,
            runtime_port=_free_port(),
            termination_path=config.workdir / "termination-message.json",
        )
        results[name] = run_site(options, site_stops[name])

    threads = [threading.Thread(target=server, name="coordinator", daemon=True)]
    threads += [
        threading.Thread(target=run_one_site, args=(name,), name=f"site-{name}", daemon=True) for name in admitted
    ]
    for thread in threads:
        thread.start()
    try:
        threads[0].join()
        for name, thread in zip(admitted, threads[1:], strict=True):
            thread.join(timeout=20)  # a finished federation told every site before the coordinator returned
            if thread.is_alive():
                site_stops[name].set()
                thread.join(timeout=60)
    except KeyboardInterrupt:
        stop.set()
        for event in site_stops.values():
            event.set()
        for thread in threads:
            thread.join(timeout=60)
        raise
    server_exit = results.get("__server__", 1)
    coordinator = output / "coordinator"
    for name in ("federation-report.json", FINAL_MODEL_NAME):
        if (coordinator / name).exists():
            shutil.copyfile(coordinator / name, output / name)
    status = FederationStatus.read(coordinator)
    site_exits = {name: results.get(name, 1) for name in admitted}
    return LocalResult(
        exit_code=server_exit,
        server_exit=server_exit,
        site_exits=site_exits,
        refused=refused,
        status=status,
    )


def print_result(result: LocalResult, output: Path, job: DPFederatedJob) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stderr)
    status = result.status
    table = Table(title=f"federation {job.metadata.name}: {status.state if status else 'no status'}")
    for column in ("site", "rounds", "ε spent", "target", "steps", "exit"):
        table.add_column(column)
    sites: dict[str, Any] = status.sites if status is not None else {}
    for site in job.spec.sites:
        progress = sites.get(site.name)
        if site.name in result.refused:
            table.add_row(site.name, "-", "-", "-", "-", f"refused: {result.refused[site.name][:60]}")
            continue
        table.add_row(
            site.name,
            str(len(progress.rounds)) if progress else "0",
            f"{progress.epsilon:.4g}" if progress and progress.epsilon is not None else "-",
            f"{job.spec.privacy.target_epsilon:g}",
            str(progress.charged_steps) if progress and progress.charged_steps is not None else "-",
            str(result.site_exits.get(site.name, "-")),
        )
    console.print(table)
    if status is not None and status.global_metric:
        metric = {k: round(v, 4) if isinstance(v, float) else v for k, v in status.global_metric.items()}
        console.print(f"global model (DP held-out, summed over the sites' releases): {metric}")
    report = output / "coordinator" / "termination-message.json"
    if result.server_exit != 0 and report.exists():
        console.print(f"the coordinator failed: {report.read_text()[:1500]}")
    console.print(f"outputs in {output}: global-model.pt, federation-report.json, sites/<site>/privacy-report.json")
