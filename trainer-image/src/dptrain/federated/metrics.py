"""Prometheus series of a federation (:class:`dptrain_api.FederationMetric`), served by the coordinator's and each
site's supervisor. Labels: ``federation``, ``namespace`` and, per site, ``site``. Everything exported is public (ε,
steps, rounds, the plan) or a DP release (the global model's metric, summed from the sites' DP releases)."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from dptrain_api import FederationMetric

__all__ = ["FederationExporter"]

_LABELS = ("federation", "namespace")
_SITE_LABELS = (*_LABELS, "site")


class FederationExporter:
    def __init__(self, *, federation: str, namespace: str, port: int = 0, address: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"federation": federation, "namespace": namespace}
        self.port, self.address = port, address
        self._server: Any = None

        def gauge(name: FederationMetric, documentation: str, *, per_site: bool = False) -> Gauge:
            return Gauge(name, documentation, list(_SITE_LABELS if per_site else _LABELS), registry=self.registry)

        self.rounds_completed = gauge(FederationMetric.ROUNDS_COMPLETED, "Rounds aggregated and checkpointed")
        self.rounds_total = gauge(FederationMetric.ROUNDS_TOTAL, "Rounds of the federation")
        self.round_seconds = gauge(FederationMetric.ROUND_SECONDS, "Wall time of the last round (not DP)")
        self.sites_min = gauge(FederationMetric.SITES_MIN, "The fewest sites a round may aggregate")
        self.finished = gauge(FederationMetric.FINISHED, "1 once the federation (or this site's part) finished")
        self.site_epsilon = gauge(
            FederationMetric.SITE_EPSILON_SPENT, "ε a site's privacy journal has charged", per_site=True
        )
        self.site_target = gauge(FederationMetric.SITE_EPSILON_TARGET, "A site's ε target", per_site=True)
        self.site_steps = gauge(FederationMetric.SITE_STEPS, "DP-SGD steps a site's journal charged", per_site=True)
        self.site_planned = gauge(FederationMetric.SITE_PLANNED_STEPS, "DP-SGD steps of a site's plan", per_site=True)
        self.site_rounds = gauge(FederationMetric.SITE_ROUNDS, "Rounds a site's update counted in", per_site=True)
        self.global_accuracy = gauge(FederationMetric.GLOBAL_ACCURACY, "Global model's held-out accuracy (DP)")
        self.global_auc = gauge(FederationMetric.GLOBAL_AUC, "Global model's held-out ROC AUC (DP, binary tasks)")
        self.global_loss = gauge(FederationMetric.GLOBAL_LOSS, "Global model's held-out clipped loss (DP)")

    def start(self) -> int:
        if self.port and self._server is None:
            self._server, _ = start_http_server(self.port, addr=self.address, registry=self.registry)
        return int(self._server.server_address[1]) if self._server is not None else 0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @staticmethod
    def _set(gauge: Gauge, labels: dict[str, str], value: float | None) -> None:
        if value is not None and math.isfinite(value):
            gauge.labels(**labels).set(value)

    def federation(
        self, *, completed: int, total: int, min_sites: int, round_seconds: float | None, finished: bool
    ) -> None:
        self._set(self.rounds_completed, self.labels, completed)
        self._set(self.rounds_total, self.labels, total)
        self._set(self.sites_min, self.labels, min_sites)
        self._set(self.round_seconds, self.labels, round_seconds)
        self._set(self.finished, self.labels, 1.0 if finished else 0.0)

    def site(
        self,
        name: str,
        *,
        epsilon: float | None,
        target: float | None,
        steps: int | None,
        planned: int | None,
        rounds: int | None,
    ) -> None:
        labels = {**self.labels, "site": name}
        self._set(self.site_epsilon, labels, epsilon)
        self._set(self.site_target, labels, target)
        self._set(self.site_steps, labels, None if steps is None else float(steps))
        self._set(self.site_planned, labels, None if planned is None else float(planned))
        self._set(self.site_rounds, labels, None if rounds is None else float(rounds))

    def global_metric(self, metrics: dict[str, Any]) -> None:
        self._set(self.global_accuracy, self.labels, metrics.get("accuracy"))
        self._set(self.global_auc, self.labels, metrics.get("auc"))
        self._set(self.global_loss, self.labels, metrics.get("loss"))
