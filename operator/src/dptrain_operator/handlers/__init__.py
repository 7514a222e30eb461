"""kopf handlers: thin adapters from kopf's callbacks to the reconcile functions."""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf

from dptrain_api import API_GROUP, API_VERSION
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.datasets import forget_dataset, reconcile_dataset
from dptrain_operator.handlers.jobs import delete_children, reconcile_and_write

JOBS = "dptrainingjobs"
DATASETS = "privatedatasets"
_log = logging.getLogger(__name__)


_job_locks: dict[str, threading.Lock] = {}
_job_locks_guard = threading.Lock()


def _job_lock(uid: str) -> threading.Lock:
    with _job_locks_guard:
        return _job_locks.setdefault(uid, threading.Lock())


def _reconcile_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> None:
    """kopf runs timers beside event handlers: a per-job lock plus a fresh read of the job makes every
    reconciliation see the status the previous one wrote (no stale overwrite, no duplicate events)."""
    ctx: OperatorContext = memo["ctx"]
    metadata = body["metadata"]
    with _job_lock(metadata["uid"]):
        try:
            state = reconcile_and_write(ctx, metadata["namespace"], metadata["name"], metadata["uid"], logger)
        except Exception:
            ctx.metrics.reconcile_errors.labels(kind="DPTrainingJob").inc()
            raise
    if state is None:
        return
    for event in state.events:
        kopf.event(body, type=event.type, reason=event.reason.value, message=event.message[:1024])
    ctx.metrics.observe_job(state.uid, state.phase)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Every handler, registered on `registry` (main.py calls this; nothing registers at import)."""
    interval = ctx.settings.scrape_interval

    def on_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        _reconcile_job(body, memo, logger)

    def on_job_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        with _job_lock(body["metadata"]["uid"]):
            delete_children(dict(body), memo["ctx"])
        with _job_locks_guard:
            _job_locks.pop(body["metadata"]["uid"], None)

    def on_dataset(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconcile_dataset(dict(body), memo["ctx"])

    def on_dataset_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        forget_dataset(dict(body), memo["ctx"])

    errors = kopf.ErrorsMode.TEMPORARY
    for decorate in (kopf.on.create, kopf.on.resume):
        decorate(API_GROUP, API_VERSION, JOBS, registry=registry, errors=errors, backoff=2)(on_job)
    kopf.on.update(API_GROUP, API_VERSION, JOBS, field="spec", registry=registry, errors=errors, backoff=2)(on_job)
    # The first timer run waits one interval: creation is handled by on.create.
    kopf.timer(
        API_GROUP, API_VERSION, JOBS, interval=interval, initial_delay=interval, registry=registry, errors=errors
    )(on_job)
    kopf.on.delete(API_GROUP, API_VERSION, JOBS, registry=registry, errors=errors, backoff=2)(on_job_delete)
    for decorate in (kopf.on.create, kopf.on.resume, kopf.on.update):
        decorate(API_GROUP, API_VERSION, DATASETS, registry=registry, errors=errors, backoff=2)(on_dataset)
    kopf.on.delete(API_GROUP, API_VERSION, DATASETS, registry=registry, optional=True)(on_dataset_delete)
