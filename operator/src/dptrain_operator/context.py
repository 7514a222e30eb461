"""What every handler needs: settings, the API wrapper, the metrics. Built once in main.run()."""

from __future__ import annotations

from dataclasses import dataclass

from dptrain_operator.kube import KubeApi
from dptrain_operator.metrics import OperatorMetrics
from dptrain_operator.settings import Settings
from dptrain_operator.workers import AccountingWorkers


@dataclass(frozen=True)
class OperatorContext:
    settings: Settings
    kube: KubeApi
    metrics: OperatorMetrics
    workers: AccountingWorkers
