"""kopf wiring, in one table: every kind the operator reconciles, its handlers and timers, the watch indexes its
reads come from (:mod:`dptrain_operator.watched`), and the pod watch that pokes a pod's owner the moment the pod
changes (a trainer's end shows in the job's status within the watch's latency, not at the next timer tick)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from dptrain_api import API_GROUP, API_VERSION
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.datasets import reconcile_dataset, release_dataset
from dptrain_operator.handlers.federations import delete_federation, reconcile_federation_and_write
from dptrain_operator.handlers.jobs import delete_children, reconcile_and_write
from dptrain_operator.handlers.sites import delete_site, reconcile_site_and_write
from dptrain_operator.kube import DATASETS, FEDERATIONS, JOBS, SITES
from dptrain_operator.locks import KeyedLocks
from dptrain_operator.render import JOB_UID_LABEL
from dptrain_operator.state import Event
from dptrain_operator.watched import WatchedKube, index_functions

__all__ = ["KINDS", "register"]

_log = logging.getLogger(__name__)

Reconcile = Callable[[OperatorContext, str, str, str, Any], Any]
Delete = Callable[[dict[str, Any], OperatorContext, Any], Any]


@dataclass(frozen=True)
class Kind:
    """A kind the operator reconciles: create/resume/spec updates, a timer and the pod watch all call ``reconcile``
    (level-triggered, idempotent); deletion calls ``delete``."""

    plural: str
    kind: str
    reconcile: Reconcile
    delete: Delete


KINDS: tuple[Kind, ...] = (
    Kind(JOBS, "DPTrainingJob", reconcile_and_write, delete_children),
    Kind(FEDERATIONS, "DPFederatedJob", reconcile_federation_and_write, delete_federation),
    Kind(SITES, "DPFederatedSite", reconcile_site_and_write, delete_site),
)
_BY_KIND = {kind.kind: kind for kind in KINDS}


def _post(body: Any, events: Sequence[Event]) -> None:
    """Post ``events`` on the object ``body`` names (kopf's body, or a plain reference: apiVersion, kind, metadata)."""
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason.value, message=event.message[:1024])


def _counted(ctx: OperatorContext, kind: str, work: Callable[[], Any], *, invariants_permanent: bool = False) -> Any:
    """Run ``work``, counting its failures. A broken invariant (an assertion: a bug, not a cluster hiccup) is a
    kopf.PermanentError where asked: no retry every 2 s (the level-triggered timer still looks again at its own
    interval). Deletions never ask: a deletion given up would drop the finalizer before its pods are settled."""
    try:
        return work()
    except kopf.TemporaryError:
        raise
    except AssertionError as broken:
        ctx.metrics.reconcile_errors.labels(kind=kind).inc()
        if invariants_permanent:
            raise kopf.PermanentError(f"invariant violated (a bug; please report it): {broken!r}") from broken
        raise
    except Exception:
        ctx.metrics.reconcile_errors.labels(kind=kind).inc()
        raise


class _Handlers:
    """The callables kopf invokes: each attaches the watch indexes (kopf passes them to every handler) and runs the
    reconciliation under the object's lock."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self.locks = KeyedLocks()

    def attach(self, indexes: dict[str, Any]) -> None:
        if isinstance(self.ctx.kube, WatchedKube) and not self.ctx.kube.attached:
            self.ctx.kube.attach(indexes)

    def reconcile(self, kind: Kind, namespace: str, name: str, uid: str, logger: Any) -> None:
        with self.locks.of(uid):
            state = _counted(
                self.ctx,
                kind.kind,
                lambda: kind.reconcile(self.ctx, namespace, name, uid, logger),
                invariants_permanent=True,
            )
        if state is None:
            return
        reference = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": kind.kind}
        _post({**reference, "metadata": {"namespace": namespace, "name": name, "uid": uid}}, state.events)
        if kind.kind == "DPTrainingJob":
            self.ctx.metrics.observe_job(state.uid, state.phase)

    def on_change(self, kind: Kind) -> Callable[..., None]:
        def handler(body: kopf.Body, logger: kopf.Logger, **indexes: Any) -> None:
            self.attach(indexes)
            metadata = body["metadata"]
            self.reconcile(kind, metadata["namespace"], metadata["name"], metadata["uid"], logger)

        return handler

    def on_delete(self, kind: Kind) -> Callable[..., None]:
        def handler(body: kopf.Body, logger: kopf.Logger, **indexes: Any) -> None:
            self.attach(indexes)
            uid = body["metadata"]["uid"]
            with self.locks.of(uid):
                _counted(self.ctx, kind.kind, lambda: kind.delete(dict(body), self.ctx, logger))
            self.locks.forget(uid)

        return handler

    def on_pod(self, body: kopf.Body, logger: kopf.Logger, **indexes: Any) -> None:
        """A pod of ours changed: reconcile its owner now (the index already shows the change)."""
        self.attach(indexes)
        owner = next(
            (ref for ref in body.get("metadata", {}).get("ownerReferences") or [] if ref.get("controller")), None
        )
        kind = _BY_KIND.get(str((owner or {}).get("kind")))
        if owner is None or kind is None or owner.get("uid") != body["metadata"].get("labels", {}).get(JOB_UID_LABEL):
            return
        self.reconcile(kind, body["metadata"]["namespace"], str(owner["name"]), str(owner["uid"]), logger)

    def on_dataset(self, body: kopf.Body, **indexes: Any) -> None:
        self.attach(indexes)
        with self.locks.of(body["metadata"]["uid"]):
            events = _counted(self.ctx, "PrivateDataset", lambda: reconcile_dataset(dict(body), self.ctx))
        _post(dict(body), events)

    def on_dataset_delete(self, body: kopf.Body, **indexes: Any) -> None:
        self.attach(indexes)
        uid = body["metadata"]["uid"]
        with self.locks.of(uid):
            events = _counted(self.ctx, "PrivateDataset", lambda: release_dataset(dict(body), self.ctx))
        _post(dict(body), events)
        self.locks.forget(uid)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Every handler, index and watch, registered on ``registry`` (main.py calls this; nothing registers at import)."""
    handlers = _Handlers(ctx)
    interval = ctx.settings.scrape_interval
    errors = kopf.ErrorsMode.TEMPORARY
    # Explicit ids: kopf keeps a retried handler's progress in an annotation named after its id, and an id made from
    # a closure's qualified name ("_Handlers.on_delete.<locals>...") is not a valid annotation name.
    for kind in KINDS:
        on_change = handlers.on_change(kind)
        where = (API_GROUP, API_VERSION, kind.plural)
        for event, decorate in (("create", kopf.on.create), ("resume", kopf.on.resume)):
            decorate(*where, id=f"{kind.plural}-{event}", registry=registry, errors=errors, backoff=2)(on_change)
        kopf.on.update(*where, id=f"{kind.plural}-update", field="spec", registry=registry, errors=errors, backoff=2)(
            on_change
        )
        # The timer: metrics scrapes and deadlines (pod changes arrive through the pod watch). Its first run waits
        # one interval: creation is handled by on.create.
        kopf.timer(
            *where,
            id=f"{kind.plural}-timer",
            interval=interval,
            initial_delay=interval,
            registry=registry,
            errors=errors,
        )(on_change)
        kopf.on.delete(*where, id=f"{kind.plural}-delete", registry=registry, errors=errors, backoff=2)(
            handlers.on_delete(kind)
        )
    datasets = (API_GROUP, API_VERSION, DATASETS)
    for event, decorate in (("create", kopf.on.create), ("resume", kopf.on.resume), ("update", kopf.on.update)):
        decorate(*datasets, id=f"{DATASETS}-{event}", registry=registry, errors=errors, backoff=2)(handlers.on_dataset)
    # The timer copies the ledger into the status again (a status edited by hand is restored).
    resync = ctx.settings.dataset_resync_seconds
    kopf.timer(
        *datasets, id=f"{DATASETS}-timer", interval=resync, initial_delay=resync, registry=registry, errors=errors
    )(handlers.on_dataset)
    # Not optional: kopf keeps a finalizer on every PrivateDataset, so its deletion always unbinds the ledger.
    kopf.on.delete(*datasets, id=f"{DATASETS}-delete", registry=registry, errors=errors, backoff=5)(
        handlers.on_dataset_delete
    )
    for name, ((group, version, plural), filters, function) in index_functions().items():
        kopf.index(group, version, plural, id=name, registry=registry, **filters)(function)
    kopf.on.event("", "v1", "pods", id="pods-event", labels={JOB_UID_LABEL: kopf.PRESENT}, registry=registry)(
        handlers.on_pod
    )
