"""Reading a trainer's progress: its Prometheus endpoint while it runs, its termination message after."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class TrainerSample:
    epsilon_spent: float | None = None
    steps: int | None = None
    planned_steps: int | None = None
    loss: float | None = None
    eval_metric: str | None = None
    eval_value: float | None = None
    examples_per_second: float | None = None


_GAUGES = {
    "dptrain_epsilon_spent": "epsilon_spent",
    "dptrain_steps": "steps",
    "dptrain_planned_steps": "planned_steps",
    "dptrain_train_loss": "loss",
    "dptrain_examples_per_second": "examples_per_second",
}


def parse_metrics(text: str) -> TrainerSample:
    values: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in _GAUGES and not sample.name.endswith("_created"):
                values[_GAUGES[name]] = sample.value
            # AUC wins when both are exported (binary tasks report it as their headline metric).
            elif name == "dptrain_eval_auc" or (name == "dptrain_eval_accuracy" and "eval_metric" not in values):
                values["eval_metric"] = name.removeprefix("dptrain_eval_")
                values["eval_value"] = sample.value
    for key in ("steps", "planned_steps"):
        if key in values:
            values[key] = int(values[key])
    return TrainerSample(**values)


def scrape(pod_ip: str, port: int, *, timeout: float = 2.0) -> TrainerSample | None:
    """None when the endpoint does not answer (not started yet, or gone)."""
    try:
        response = httpx.get(f"http://{pod_ip}:{port}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text)


def termination_message(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's JSON summary from the terminated container state, if it wrote one."""
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        message = terminated.get("message")
        if not message:
            continue
        try:
            summary = json.loads(message)
        except json.JSONDecodeError:
            return None
        return summary if isinstance(summary, dict) else None
    return None


def exit_code(pod: dict[str, Any]) -> int | None:
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if "exitCode" in terminated:
            return int(terminated["exitCode"])
    return None
