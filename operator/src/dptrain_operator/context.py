"""What every handler needs: settings, the API wrapper, the metrics. Built once in main.run()."""

from __future__ import annotations

from dataclasses import dataclass, field

from dptrain_operator.kube import KubeApi
from dptrain_operator.locks import KeyedLocks
from dptrain_operator.metrics import OperatorMetrics
from dptrain_operator.settings import Settings
from dptrain_operator.workers import AccountingWorkers


@dataclass(frozen=True)
class OperatorContext:
    settings: Settings
    kube: KubeApi
    metrics: OperatorMetrics
    workers: AccountingWorkers
    ledger_locks: KeyedLocks = field(default_factory=KeyedLocks)
    """One writer per ledger in this process: jobs charging the same dataset take turns instead of colliding on
    its resourceVersion (409s); other writers (none in normal operation) are still caught by the precondition."""
