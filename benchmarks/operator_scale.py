"""Operator scale benchmark: apply→pod-created latency (p50/p90 over N jobs, one at a time), the operator's resident
memory with many jobs, and its API load: requests per running job per minute (and how many answered 409), read off
the API server's own ``apiserver_request_total`` over a quiet window, against the testenv API server.

    .venv/bin/python benchmarks/operator_scale.py [--latency-jobs 20] [--jobs 200] [--rate-jobs 6]
                                                  [--rate-window 60] [--json out.json]

Without ``--running`` no kubelet runs, so pods stay Pending: this measures the operator itself (admission,
planning, rendering, API writes, timers), not training. With ``--running`` a fake kubelet (tests/support/node.py)
runs the trainers as local processes: the request rate is then that of running jobs (scrapes, status writes), and
the pod-end → status latency is measured: a poller watching both sees a trainer pod reach Succeeded and then its
job's phase follow (p50 over ``--end-jobs`` short jobs; the operator sees the pod's end through its pod watch).

    .venv/bin/python benchmarks/operator_scale.py --only-rate --running [--rate-jobs 4] [--end-jobs 5]
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


def job(name: str, *, epochs: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"builtin": "breast-cancer"},
            "model": {"architecture": "logistic"},
            "privacy": {"targetEpsilon": 2.0},
            "training": {"epochs": epochs, "batchSize": 64},
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


def request_counts(cluster: Any) -> dict[tuple[str, str, str], float]:
    """apiserver_request_total by (verb, resource, code), as the API server counts them."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition(" ")
        labels = dict(part.split("=", 1) for part in labels_text[len("apiserver_request_total{") : -1].split(","))
        key = tuple(labels.get(name, '""').strip('"') for name in ("verb", "resource", "code"))
        counts[key] = counts.get(key, 0.0) + float(value)  # type: ignore[index]
    return counts  # type: ignore[return-value]


def request_rate(cluster: Any, namespace: str, *, jobs: int, window: float, epochs: int = 2) -> dict[str, Any]:
    """Apply ``jobs`` jobs, let them settle (admitted, pod created), then count the API server's requests over
    ``window`` seconds: per job per minute, the 409s among them, and the busiest (verb, resource)."""
    documents = [job(f"rate-{i}", epochs=epochs) for i in range(jobs)]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))
    for document in documents:
        wait_for_pod(cluster, namespace, document["metadata"]["name"], timeout=120)
    time.sleep(15)
    before = request_counts(cluster)
    time.sleep(window)
    after = request_counts(cluster)
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    delta = {key: value for key, value in delta.items() if value > 0 and key[1]}  # resources only (not /metrics)
    total = sum(delta.values())
    conflicts = sum(value for (verb, _, code), value in delta.items() if code == "409")
    by_call: dict[str, float] = {}
    for (verb, resource, _), value in delta.items():
        by_call[f"{verb} {resource}"] = by_call.get(f"{verb} {resource}", 0.0) + value
    per_minute = 60.0 / window / jobs
    return {
        "rate_jobs": jobs,
        "requests_per_job_per_minute": total * per_minute,
        "conflicts_409_share": conflicts / total if total else 0.0,
        "busiest": {
            call: round(value * per_minute, 1) for call, value in sorted(by_call.items(), key=lambda kv: -kv[1])[:8]
        },
    }


def _phase(cluster: Any, namespace: str, kind: str, name: str) -> str | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "jsonpath={.status.phase}", check=False)
    return result.stdout.strip() or None if result.returncode == 0 else None


def pod_end_latency(cluster: Any, namespace: str, *, jobs: int) -> list[float]:
    """Seconds from a poller seeing each short job's trainer pod Succeeded to it seeing the job Succeeded."""
    latencies = []
    for i in range(jobs):
        name = f"end-{i}"
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job(name)))
        deadline = time.monotonic() + 300
        pod_done = None
        while time.monotonic() < deadline:
            if pod_done is None and _phase(cluster, namespace, "pod", f"{name}-attempt-1") == "Succeeded":
                pod_done = time.monotonic()
            if _phase(cluster, namespace, "dptj", name) in ("Succeeded", "Failed"):
                latencies.append(time.monotonic() - (pod_done or time.monotonic()))
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(name)
    return latencies


def running_rate(cluster: Any, namespace: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The request rate of jobs whose trainers run (a fake kubelet), then the pod-end → status latency."""
    from tests.support.node import FakeNode

    with FakeNode(cluster.api, namespace, work_dir=work / "node"):
        rate = request_rate(cluster, namespace, jobs=args.rate_jobs, window=args.rate_window, epochs=3000)
        running = [_phase(cluster, namespace, "dptj", f"rate-{i}") for i in range(args.rate_jobs)]
        rate["jobs_running_at_the_end"] = sum(phase == "Running" for phase in running)
        for i in range(args.rate_jobs):
            cluster.kubectl("delete", "dptj", f"rate-{i}", "-n", namespace, "--wait=true", "--timeout=120s")
        latencies = pod_end_latency(cluster, namespace, jobs=args.end_jobs)
    rate["pod_end_to_status_p50_s"] = statistics.median(latencies)
    rate["pod_end_to_status_max_s"] = max(latencies)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rate-jobs", type=int, default=6)
    parser.add_argument("--rate-window", type=float, default=60.0)
    parser.add_argument("--only-rate", action="store_true", help="measure the request rate only")
    parser.add_argument("--running", action="store_true", help="run the trainers (fake kubelet) for the rate")
    parser.add_argument("--end-jobs", type=int, default=5, help="short jobs for the pod-end → status latency")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dptrain-bench-"))
    cluster = start_cluster(work / "kube")
    namespace = "bench"
    cluster.kubectl("create", "namespace", namespace)
    operator = OperatorProcess(cluster.kubeconfig, namespace, work / "logs", scrape_interval=5.0).start()
    assert operator.process is not None
    try:
        if args.running:
            rate = running_rate(cluster, namespace, work, args)
        else:
            rate = request_rate(cluster, namespace, jobs=args.rate_jobs, window=args.rate_window)
        if args.only_rate:
            if args.json:
                args.json.write_text(json.dumps(rate, indent=2))
            print(json.dumps(rate, indent=2))
            return 0
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
            **{key: value for key, value in rate.items() if key != "busiest"},
        }
        result["busiest_calls_per_job_per_minute"] = rate["busiest"]
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
