"""Entry point: `dptrain-operator` (or `python -m dptrain_operator`). Only wiring lives here."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import kopf

from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers import register
from dptrain_operator.kube import Kube, load_api_client
from dptrain_operator.metrics import OperatorMetrics
from dptrain_operator.settings import Settings
from dptrain_operator.watched import WatchedKube
from dptrain_operator.workers import AccountingWorkers

ANNOTATION_PREFIX = "dptrain.io"


_HANDLER_THREADS = 20
"""Threads that run the (synchronous) handlers."""


def configure(settings: kopf.OperatorSettings) -> None:
    # Handler progress and diff-base live in annotations: status belongs to the CRD's schema (which
    # prunes unknown fields) and to users reading it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/cleanup"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = _HANDLER_THREADS
    # Bound how many objects are worked on at once (per watched kind) and how many events are posted at once. kopf's
    # default is unbounded: 500 jobs applied together then held ~500 HTTPS connections open at the same moment, each
    # with its TLS and 256 KiB read buffers, and the memory stayed with the process after the burst.
    settings.queueing.worker_limit = 2 * _HANDLER_THREADS
    settings.queueing.idle_timeout = 1.0  # a worker holds its slot while idle: free it soon (kopf's default is 5 s)
    settings.posting.worker_limit = 4
    # A deleted job's timer may be mid-reconciliation; re-check soon (kopf's default is 60 s) so the
    # finalizer is released, and the job gone, within seconds.
    settings.background.cancellation_polling = 1.0


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="dptrain operator: DPTrainingJob and PrivateDataset controller")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    settings = Settings.from_env()
    metrics = OperatorMetrics()
    metrics.serve(settings.metrics_port)
    ctx = OperatorContext(
        settings=settings,
        kube=WatchedKube(Kube(load_api_client())),
        metrics=metrics,
        workers=AccountingWorkers(timeout=settings.plan_timeout_seconds, memory_mib=settings.plan_memory_mib),
    )

    registry = kopf.OperatorRegistry()
    register(registry, ctx)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In-cluster service account, else the kubeconfig (as the kubernetes client resolves them).
        return kopf.login_via_client(**kwargs)

    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    kopf.run(
        registry=registry,
        memo=kopf.Memo(ctx=ctx),
        standalone=True,
        liveness_endpoint=liveness,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
    )


if __name__ == "__main__":
    run()
