"""kopf handlers: thin adapters from kopf's callbacks to the reconcile functions."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import kopf

from dptrain_api import API_GROUP, API_VERSION
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.datasets import reconcile_dataset, release_dataset
from dptrain_operator.handlers.federations import register_federations
from dptrain_operator.handlers.jobs import delete_children, reconcile_and_write
from dptrain_operator.state import Event

JOBS = "dptrainingjobs"
DATASETS = "privatedatasets"
_log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    """kopf runs timers beside event handlers: one lock per object keeps its reconciliations in sequence."""
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def _forget_lock(uid: str) -> None:
    with _locks_guard:
        _locks.pop(uid, None)


def _post(body: kopf.Body, events: Sequence[Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason.value, message=event.message[:1024])


def _counted(ctx: OperatorContext, kind: str, work: Callable[[], Any]) -> Any:
    try:
        return work()
    except kopf.TemporaryError:
        raise
    except Exception:
        ctx.metrics.reconcile_errors.labels(kind=kind).inc()
        raise


def _reconcile_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> None:
    """A per-job lock plus a fresh read of the job makes every reconciliation see what the previous one wrote."""
    ctx: OperatorContext = memo["ctx"]
    metadata = body["metadata"]
    with _lock(metadata["uid"]):
        state = _counted(
            ctx,
            "DPTrainingJob",
            lambda: reconcile_and_write(ctx, metadata["namespace"], metadata["name"], metadata["uid"], logger),
        )
    if state is None:
        return
    _post(body, state.events)
    ctx.metrics.observe_job(state.uid, state.phase)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Every handler, registered on `registry` (main.py calls this; nothing registers at import)."""
    interval = ctx.settings.scrape_interval

    def on_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        _reconcile_job(body, memo, logger)

    def on_job_delete(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        uid = body["metadata"]["uid"]
        with _lock(uid):
            _counted(ctx, "DPTrainingJob", lambda: delete_children(dict(body), memo["ctx"], logger))
        _forget_lock(uid)

    def on_dataset(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        with _lock(body["metadata"]["uid"]):
            events = _counted(ctx, "PrivateDataset", lambda: reconcile_dataset(dict(body), memo["ctx"]))
        _post(body, events)

    def on_dataset_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        uid = body["metadata"]["uid"]
        with _lock(uid):
            events = _counted(ctx, "PrivateDataset", lambda: release_dataset(dict(body), memo["ctx"]))
        _post(body, events)
        _forget_lock(uid)

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
    # The timer copies the ledger into the status again (a status edited by hand is restored).
    resync = ctx.settings.dataset_resync_seconds
    kopf.timer(
        API_GROUP, API_VERSION, DATASETS, interval=resync, initial_delay=resync, registry=registry, errors=errors
    )(on_dataset)
    # Not optional: kopf keeps a finalizer on every PrivateDataset, so its deletion always unbinds the ledger.
    kopf.on.delete(API_GROUP, API_VERSION, DATASETS, registry=registry, errors=errors, backoff=5)(on_dataset_delete)
    # Federations: the coordinator's DPFederatedJob and a site's DPFederatedSite (handlers/federations.py).
    register_federations(registry, ctx, lock=_lock, forget=_forget_lock, post=_post, counted=_counted)
