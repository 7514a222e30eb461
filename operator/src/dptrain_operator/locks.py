"""Locks by key, owned by whoever needs them (the handlers' per-object locks, the context's per-ledger locks): no
module-global state."""

from __future__ import annotations

import threading


class KeyedLocks:
    """One lock per key (an object's UID, a ledger's name), created on first use; re-entrant, so a thread that
    holds it may take it again (a ledger write inside another never deadlocks)."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def of(self, key: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(key, threading.RLock())

    def forget(self, key: str) -> None:
        with self._guard:
            self._locks.pop(key, None)
