"""The Prometheus exporter: scraped over HTTP, its values match the training result."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dptrain.data import load_data
from dptrain.engine import train
from dptrain.metrics import PrometheusExporter, metric_labels
from dptrain.plan import make_plan
from dptrain_api import DPTrainingJob

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _job(namespace: str | None = "wards") -> DPTrainingJob:
    metadata = {"name": "metrics-job", **({"namespace": namespace} if namespace else {})}
    return DPTrainingJob.model_validate(
        {
            "metadata": metadata,
            "spec": {
                "dataset": {"builtin": "breast-cancer"},
                "model": {"architecture": "logistic"},
                "privacy": {"targetEpsilon": 8.0, "noiseMultiplier": 2.0},
                "training": {"epochs": 1, "batchSize": 64, "seed": 1},
                "checkpoint": {"everySteps": 4},
            },
        }
    )


def test_metrics_scraped_over_http_match_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPTRAIN_CPU_LIMIT", "1")
    monkeypatch.delenv("DPTRAIN_JOB_NAME", raising=False)
    monkeypatch.delenv("DPTRAIN_JOB_NAMESPACE", raising=False)
    job = _job()
    data = load_data(job.spec.dataset)
    plan = make_plan(job, num_examples=data.num_examples)
    exporter = PrometheusExporter(labels=metric_labels(job), port=_free_port(), address="127.0.0.1")
    port = exporter.start()
    try:
        assert port > 0
        scraped_during: list[float] = []

        class Scraper:
            def on_start(self, *_args: object, **_kwargs: object) -> None: ...

            def on_step(self, progress: object) -> None:
                if getattr(progress, "step", 0) == 2:  # mid-run: the journal's charged ε is already exposed
                    labels = (("job", "metrics-job"), ("namespace", "wards"))
                    scraped_during.append(_scrape(port)[("dptrain_epsilon_spent", labels)])

            def on_finish(self, _result: object) -> None: ...

        result = train(job, data, plan, workdir=tmp_path, observers=[exporter, Scraper()])
        samples = _scrape(port)
    finally:
        exporter.close()

    labels = (("job", "metrics-job"), ("namespace", "wards"))

    def value(name: str) -> float:
        return samples[(name, labels)]

    assert value("dptrain_epsilon_spent") == result.epsilon
    assert value("dptrain_epsilon_target") == 8.0
    assert value("dptrain_delta") == plan.delta
    assert value("dptrain_noise_multiplier") == 2.0
    assert value("dptrain_sample_rate") == plan.sample_rate
    assert value("dptrain_planned_steps") == plan.steps
    assert value("dptrain_steps_total") == result.steps_run == plan.steps
    assert value("dptrain_progress_ratio") == 1.0
    assert value("dptrain_attempt") == 1
    assert value("dptrain_training_finished") == 1
    assert value("dptrain_eval_accuracy") == pytest.approx(result.eval_metrics["accuracy"])
    assert value("dptrain_eval_auc") == pytest.approx(result.eval_metrics["auc"])  # binary task
    assert value("dptrain_holdout_loss") == pytest.approx(result.eval_metrics["loss"])
    assert value("dptrain_charged_releases") == result.charged_releases
    assert 1 <= result.charged_releases <= plan.releases  # at most one release per checkpoint
    assert not any(name == "dptrain_train_loss" for name, _ in samples)  # the training loss never leaves
    assert not any(name == "dptrain_examples_per_second" for name, _ in samples)  # timing of private batches
    assert len(scraped_during) == 1
    assert 0 < scraped_during[0] <= result.epsilon


def test_port_zero_serves_nothing() -> None:
    exporter = PrometheusExporter(labels=metric_labels(None, {}), port=0)
    assert exporter.start() == 0
    exporter.close()


def test_labels_come_from_env_then_manifest_then_defaults() -> None:
    job = _job()
    assert metric_labels(job, {}) == {"job": "metrics-job", "namespace": "wards"}
    assert metric_labels(_job(namespace=None), {}) == {"job": "metrics-job", "namespace": "default"}
    assert metric_labels(None, {}) == {"job": "local", "namespace": "default"}
    env = {"DPTRAIN_JOB_NAME": "from-env", "DPTRAIN_JOB_NAMESPACE": "ns-env"}
    assert metric_labels(job, env) == {"job": "from-env", "namespace": "ns-env"}


def test_each_exporter_has_its_own_registry() -> None:
    first = PrometheusExporter(labels={"job": "a", "namespace": "n"})
    second = PrometheusExporter(labels={"job": "b", "namespace": "n"})  # no duplicate-registration error
    assert first.registry is not second.registry
