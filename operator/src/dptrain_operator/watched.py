"""Reads from the watch, not the API: kopf's indexes of what the operator reconciles, with its own writes overlaid.

Every reconciliation used to GET the job (kopf had just delivered it), GET its ledger, LIST its pods, GET its
claim (after POSTing it to learn that it existed: a 409 every tick). kopf keeps a watch on each kind it has
handlers or indexes for, and populates the indexes before any handler runs; :class:`WatchedKube` answers those
reads from them. Its own writes (the new objects the API returns) are overlaid until the watch has caught up, so a
reconciliation right after a write sees that write: the newer resourceVersion wins. What the indexes do not hold
(an object nobody labelled for the operator, a kind with no index) is read from the API as before, and every
write still goes to the API (with its resourceVersion precondition where it had one): a stale read can only make
a precondition fail and the write retry on a fresh read, never write over what it did not see.

Ledgers are not watched. A ledger holds one entry per job that ever charged its records, and this operator is its
only writer: every write (one per job per scrape) would come back through a watch as a whole new copy to decode,
which at 500 jobs on one ledger is O(jobs²) bytes and was most of the operator's memory. Instead the operator keeps
the ledger it last read or wrote (a write-through cache), re-reads it after a failed write (the precondition
failed: someone else wrote) and at least every :data:`LEDGER_CACHE_SECONDS`, so another writer (an operator replica
during a rollout, a steward's edit) is seen within that time and can never be written over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from dptrain_operator.kube import KubeApi
from dptrain_operator.locks import KeyedLocks
from dptrain_operator.render import JOB_UID_LABEL

__all__ = ["INDEXES", "WatchedKube", "index_functions"]

Body = dict[str, Any]
Key = tuple[str, ...]

INDEXES: Final = ("dptrain_jobs", "dptrain_pods", "dptrain_claims")
"""kopf index names (handlers receive them as keyword arguments of these names)."""

LEDGER_CACHE_SECONDS: Final = 30.0
"""How long a ledger read or written by this operator answers reads before it is read again."""


def _version(body: Body) -> int:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return -1


def _newest(*bodies: Body | None) -> Body | None:
    present = [body for body in bodies if body is not None]
    return max(present, key=_version) if present else None


def index_functions() -> dict[str, tuple[tuple[str, str, str], dict[str, Any], Callable[..., Any]]]:
    """name → ((group, version, plural), kopf filters, the index function): what main registers with kopf."""
    from dptrain_api import API_GROUP, API_VERSION
    from dptrain_operator.kube import JOBS

    def by_name(body: Any, namespace: Any, name: Any, **_: Any) -> dict[Key, Body]:
        return {(namespace or "", name): dict(body)}

    def by_owner(body: Any, namespace: Any, labels: Any, **_: Any) -> dict[Key, Body]:
        return {(namespace or "", labels.get(JOB_UID_LABEL, "")): dict(body)}

    import kopf

    children = {"labels": {JOB_UID_LABEL: kopf.PRESENT}}
    return {
        "dptrain_jobs": ((API_GROUP, API_VERSION, JOBS), {}, by_name),
        "dptrain_pods": (("", "v1", "pods"), children, by_owner),
        "dptrain_claims": (("", "v1", "persistentvolumeclaims"), children, by_name),
    }


class WatchedKube:
    """A :class:`~dptrain_operator.kube.KubeApi` whose hot reads come from kopf's indexes once they are attached.

    Until :meth:`attach` (the first handler call hands kopf's indexes over) everything goes to the API. Unknown
    methods are the wrapped API's.
    """

    def __init__(self, kube: KubeApi) -> None:
        self._kube = kube
        self._indexes: Mapping[str, Mapping[Key, Iterable[Body]]] = {}
        self._overlay: dict[tuple[str, Key], Body] = {}
        self._ledgers: dict[str, tuple[float, Body]] = {}  # name → (when read or written, the body)
        self._ledger_reads = KeyedLocks()  # one GET per expired ledger, however many jobs ask at once
        self._lock = threading.Lock()
        self.clock: Callable[[], float] = time.monotonic

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kube, name)

    @property
    def attached(self) -> bool:
        return bool(self._indexes)

    def attach(self, indexes: Mapping[str, Any]) -> None:
        """Use kopf's indexes (populated before any handler runs; kopf keeps them current)."""
        found = {name: indexes[name] for name in INDEXES if name in indexes}
        if len(found) == len(INDEXES):
            self._indexes = found

    # --- the overlay of this operator's own writes ---------------------------------------------------------------

    def _remember(self, index: str, key: Key, body: Any) -> None:
        if isinstance(body, dict) and body.get("metadata", {}).get("resourceVersion"):
            with self._lock:
                self._overlay[(index, key)] = _newest(self._overlay.get((index, key)), body) or body

    def _seen(self, index: str, key: Key) -> list[Body]:
        store = self._indexes[index].get(key)
        return [dict(body) for body in store] if store is not None else []

    def _single(self, index: str, key: Key) -> Body | None:
        """The watch's object under ``key``, or the operator's own newer write of it (dropped once the watch has
        caught up)."""
        seen = _newest(*self._seen(index, key))
        with self._lock:
            mine = self._overlay.get((index, key))
            if mine is not None and seen is not None and _version(seen) >= _version(mine):
                del self._overlay[(index, key)]
                mine = None
        return _newest(seen, mine)

    def _one(self, index: str, key: Key, fetch: Callable[[], Body | None]) -> Body | None:
        if not self.attached:
            return fetch()
        found = self._single(index, key)
        return found if found is not None else fetch()  # not in the index: perhaps not ours; ask the API

    # --- reads ---------------------------------------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> Body | None:
        return self._one("dptrain_jobs", (namespace, name), lambda: self._kube.get_job(namespace, name))

    def _cached_ledger(self, name: str) -> Body | None:
        with self._lock:
            cached = self._ledgers.get(name)
        if cached is not None and self.clock() - cached[0] < LEDGER_CACHE_SECONDS:
            return dict(cached[1])
        return None

    def get_ledger(self, name: str) -> Body | None:
        cached = self._cached_ledger(name)
        if cached is not None:
            return cached
        with self._ledger_reads.of(name):
            cached = self._cached_ledger(name)  # another thread read it while this one waited
            if cached is not None:
                return cached
            found = self._kube.get_ledger(name)
            self._cache_ledger(name, found)
            return found

    def get_claim(self, namespace: str, name: str) -> Body | None:
        return self._one("dptrain_claims", (namespace, name), lambda: self._kube.get_claim(namespace, name))

    def list_pods(self, namespace: str, label_selector: str) -> list[Body]:
        prefix = f"{JOB_UID_LABEL}="
        if not self.attached or not label_selector.startswith(prefix) or "," in label_selector:
            return self._kube.list_pods(namespace, label_selector)
        return self._seen("dptrain_pods", (namespace, label_selector[len(prefix) :]))

    # --- writes (to the API; what they return is remembered) -----------------------------------------------------

    def create_if_absent(self, manifest: Body) -> bool:
        kind, metadata = manifest["kind"], manifest["metadata"]
        namespace, name = metadata.get("namespace", ""), metadata["name"]
        if self.attached and kind == "PersistentVolumeClaim" and self._single("dptrain_claims", (namespace, name)):
            return False  # known from the watch: no POST (the old existence probe answered 409 every tick)
        if self.attached and kind == "Pod":
            owner = metadata.get("labels", {}).get(JOB_UID_LABEL, "")
            if any(pod["metadata"]["name"] == name for pod in self._seen("dptrain_pods", (namespace, owner))):
                return False
        return self._kube.create_if_absent(manifest)

    def _cache_ledger(self, name: str, body: Body | None) -> None:
        with self._lock:
            if body is None:
                self._ledgers.pop(name, None)
            else:
                self._ledgers[name] = (self.clock(), body)

    def replace_ledger_status(self, body: Body) -> Body:
        name = body["metadata"]["name"]
        try:
            written = self._kube.replace_ledger_status(body)
        except BaseException:  # a conflict (someone else wrote) or a ledger gone: the next read asks the API
            self._cache_ledger(name, None)
            raise
        self._cache_ledger(name, written)
        return written

    def create_ledger(self, manifest: Body) -> bool:
        created = self._kube.create_ledger(manifest)
        self._cache_ledger(manifest["metadata"]["name"], None)  # created or already there: read it fresh
        return created

    def patch_job_status(self, namespace: str, name: str, status: Body) -> Any:
        written = self._kube.patch_job_status(namespace, name, status)
        self._remember("dptrain_jobs", (namespace, name), written)
        return written
