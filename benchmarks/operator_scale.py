"""Operator scale benchmark: apply→pod-created latency (p50/p90 over N jobs, one at a time) and the
operator's resident memory with many jobs, against the testenv API server.

    .venv/bin/python benchmarks/operator_scale.py [--latency-jobs 20] [--jobs 200] [--json out.json]

No kubelet runs here, so pods stay Pending: this measures the operator itself (admission, planning,
rendering, API writes, timers), not training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import start_cluster, stop_cluster
from tests.support.operator import OperatorProcess


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"builtin": "breast-cancer"},
            "model": {"architecture": "logistic"},
            "privacy": {"targetEpsilon": 2.0},
            "training": {"epochs": 2, "batchSize": 64},
        },
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_for_pod(cluster: Any, namespace: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = cluster.kubectl("get", "pod", f"{name}-attempt-1", "-n", namespace, "-o", "name", check=False)
        if result.returncode == 0:
            return
        time.sleep(0.02)
    raise TimeoutError(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dptrain-bench-"))
    cluster = start_cluster(work / "kube")
    namespace = "bench"
    cluster.kubectl("create", "namespace", namespace)
    operator = OperatorProcess(cluster.kubeconfig, namespace, work / "logs", scrape_interval=5.0).start()
    assert operator.process is not None
    try:
        idle_rss = rss_mib(operator.process.pid)
        latencies = []
        for i in range(args.latency_jobs):
            name = f"latency-{i}"
            started = time.monotonic()
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job(name)))
            wait_for_pod(cluster, namespace, name)
            latencies.append(time.monotonic() - started)
        bulk = [job(f"bulk-{i}") for i in range(args.jobs - args.latency_jobs)]
        started = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(bulk))
        for document in bulk:
            wait_for_pod(cluster, namespace, document["metadata"]["name"], timeout=600)
        bulk_seconds = time.monotonic() - started
        time.sleep(15)  # a few timer rounds over all jobs
        samples = []
        for _ in range(10):
            samples.append(rss_mib(operator.process.pid))
            time.sleep(1)
        result = {
            "latency_jobs": args.latency_jobs,
            "apply_to_pod_p50_s": statistics.median(latencies),
            "apply_to_pod_p90_s": statistics.quantiles(latencies, n=10, method="inclusive")[-1],
            "apply_to_pod_max_s": max(latencies),
            "jobs": args.jobs,
            "bulk_apply_to_all_pods_s": bulk_seconds,
            "operator_rss_idle_mib": idle_rss,
            "operator_rss_with_jobs_mib": max(samples),
        }
    finally:
        operator.stop()
        stop_cluster(cluster)
    print(f"{'metric':<32} value")
    for key, value in result.items():
        print(f"{key:<32} {value:.3f}" if isinstance(value, float) else f"{key:<32} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
