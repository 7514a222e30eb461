"""Reading a trainer's progress: its Prometheus endpoint while it runs, its termination message after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dptrain_api import TerminationMessage, TrainerMetric


@dataclass(frozen=True)
class TrainerSample:
    epsilon_spent: float | None = None
    steps: int | None = None
    planned_steps: int | None = None
    charged_steps: int | None = None
    charged_releases: int | None = None
    loss: float | None = None
    eval_metric: str | None = None
    eval_value: float | None = None


_GAUGES = {
    TrainerMetric.EPSILON_SPENT: "epsilon_spent",
    TrainerMetric.STEPS: "steps",
    TrainerMetric.PLANNED_STEPS: "planned_steps",
    TrainerMetric.CHARGED_STEPS: "charged_steps",
    TrainerMetric.CHARGED_RELEASES: "charged_releases",
    TrainerMetric.HOLDOUT_LOSS: "loss",
}
_INTEGERS = ("steps", "planned_steps", "charged_steps", "charged_releases")


def parse_metrics(text: str) -> TrainerSample:
    values: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = sample.name.removesuffix("_total")
            if name in _GAUGES:
                values[_GAUGES[TrainerMetric(name)]] = sample.value
            # AUC wins when both are exported (binary tasks report it as their headline metric).
            elif name == TrainerMetric.EVAL_AUC or (
                name == TrainerMetric.EVAL_ACCURACY and "eval_metric" not in values
            ):
                values["eval_metric"] = name.removeprefix("dptrain_eval_")
                values["eval_value"] = sample.value
    for key in _INTEGERS:
        if key in values:
            values[key] = int(values[key])
    return TrainerSample(**values)


def _metrics_text(pod_ip: str, port: int, *, timeout: float = 2.0) -> str | None:
    """The pod's Prometheus page; None when it does not answer (not started yet, or gone)."""
    try:
        response = httpx.get(f"http://{pod_ip}:{port}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return response.text


def scrape(pod_ip: str, port: int, *, timeout: float = 2.0) -> TrainerSample | None:
    """A trainer's progress; None when the endpoint does not answer (not started yet, or gone)."""
    text = _metrics_text(pod_ip, port, timeout=timeout)
    return parse_metrics(text) if text is not None else None


def scrape_federation(pod: dict[str, Any], port: int) -> dict[str, dict[str, float]]:
    """A coordinator's or SuperNode's federation series: metric name → {site label (or ""): value}; empty when the
    pod does not answer."""
    ip = (pod.get("status") or {}).get("podIP")
    text = _metrics_text(ip, port) if ip else None
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text or ""):
        for sample in family.samples:
            if sample.name.startswith("dptrain_federation_"):
                values.setdefault(sample.name, {})[sample.labels.get("site", "")] = float(sample.value)
    return values


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return {}


def termination_message(pod: dict[str, Any]) -> TerminationMessage | None:
    """The trainer's summary from the terminated container state, if it wrote one of this contract."""
    return TerminationMessage.parse(_terminated(pod).get("message"))


def exit_code(pod: dict[str, Any]) -> int | None:
    code = _terminated(pod).get("exitCode")
    return int(code) if code is not None else None
