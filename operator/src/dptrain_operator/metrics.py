"""The operator's own Prometheus metrics (few labels: job phases are counted, not listed per job)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from dptrain_api import JobPhase


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("dptrain_jobs", "DPTrainingJobs by phase", ["phase"], registry=self.registry)
        self.reconcile_errors = Counter(
            "dptrain_reconcile_errors", "Reconciliations that raised an error", ["kind"], registry=self.registry
        )
        self.job_failures = Counter(
            "dptrain_job_failures", "DPTrainingJobs that ended Failed, by reason", ["reason"], registry=self.registry
        )
        self.dataset_epsilon_remaining = Gauge(
            "dptrain_dataset_epsilon_remaining",
            "Privacy budget (ε) a PrivateDataset has left",
            ["namespace", "dataset"],
            registry=self.registry,
        )
        self.dataset_epsilon_spent = Gauge(
            "dptrain_dataset_epsilon_spent",
            "Privacy (ε) committed on a PrivateDataset",
            ["namespace", "dataset"],
            registry=self.registry,
        )
        self.dataset_epsilon_budget = Gauge(
            "dptrain_dataset_epsilon_budget",
            "Total privacy budget (ε) of a PrivateDataset",
            ["namespace", "dataset"],
            registry=self.registry,
        )
        self._phases: dict[str, str] = {}
        for phase in JobPhase:
            self.jobs.labels(phase=phase.value).set(0)

    def observe_job(self, uid: str, phase: str | None) -> None:
        if phase is None:
            self._phases.pop(uid, None)
        else:
            self._phases[uid] = phase
        counts = {phase.value: 0 for phase in JobPhase}
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for name, count in counts.items():
            self.jobs.labels(phase=name).set(count)

    def observe_dataset(self, namespace: str, name: str, *, budget: float, spent: float, remaining: float) -> None:
        self.dataset_epsilon_budget.labels(namespace, name).set(budget)
        self.dataset_epsilon_spent.labels(namespace, name).set(spent)
        self.dataset_epsilon_remaining.labels(namespace, name).set(remaining)

    def forget_dataset(self, namespace: str, name: str) -> None:
        for gauge in (self.dataset_epsilon_budget, self.dataset_epsilon_spent, self.dataset_epsilon_remaining):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=address, registry=self.registry)
