"""End to end in containers: the operator runs from its image, every trainer pod runs in the trainer image (through
ContainerNode), with the pod the operator renders: UID 65532, read-only root filesystem, no capabilities, its
volumes, its memory and CPU limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dptrain_api import DPTrainingJob, parse_resource
from dptrain_operator.settings import Settings
from tests.support import e2e, podman
from tests.support.cluster import Cluster, raw_request
from tests.support.container_node import ContainerNode
from tests.support.e2e import apply, condition, diagnose, get, phase_is, pods, wait_for
from tests.support.manifests import base_manifest, sample_trainer_pod
from tests.support.operator import OperatorContainer

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.containers]
UID = 65532


@pytest.fixture
def operator(
    cluster: Cluster, namespace: str, tmp_path: Path, operator_image: str, trainer_image: str
) -> Iterator[OperatorContainer]:
    process = OperatorContainer(
        cluster.kubeconfig,
        namespace,
        tmp_path / "operator",
        image=operator_image,
        extra_env={"DPTRAIN_TRAINER_IMAGE": trainer_image, "DPTRAIN_IMAGE_PULL_POLICY": "Never"},
    )
    process.start(timeout=120)
    yield process
    process.stop()


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """The e2e helpers' job, with a memory limit: in a container it is a real cgroup limit."""
    resources = {"memory": "1Gi", **spec.pop("resources", {})}
    return e2e.job_manifest(name, resources=resources, **spec)


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]
    return state["terminated"]  # type: ignore[no-any-return]


def test_a_job_runs_to_success_in_containers_with_epsilon_on_status(
    cluster: Cluster, namespace: str, container_node: ContainerNode, operator: OperatorContainer
) -> None:
    apply(cluster, namespace, job_manifest("tiny"))
    job = wait_for(
        phase_is(cluster, namespace, "tiny", "Succeeded", "Failed"),
        timeout=240,
        what="the job to finish",
        diagnose=diagnose(cluster, namespace, container_node, operator),
    )
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, container_node, operator)()
    privacy = job["status"]["privacy"]
    claim = container_node.pvc_dir(namespace, "tiny-checkpoint")
    report = json.loads((claim / "privacy-report.json").read_text())
    epsilon = report["guarantee"]["epsilon"]
    assert epsilon <= privacy["epsilonSpent"] <= epsilon + 1e-6
    assert privacy["epsilonSpent"] <= privacy["targetEpsilon"] == 2.0
    assert privacy["steps"] == privacy["plannedSteps"]
    assert job["status"]["progress"]["percent"] == "100%"
    # The trainer wrote its outputs as UID 65532 into its claim, and nothing into its image: its root filesystem
    # was read-only, so `podman diff` lists at most the folders holding the mount points the runtime made (the
    # volumes; /etc for podman's hosts, hostname and resolv.conf).
    assert {path.stat().st_uid for path in claim.iterdir()} == {UID}
    (pod,) = pods(cluster, namespace)
    assert _terminated(pod)["containerID"].startswith("podman://")
    changes = {path for paths in container_node.root_changes.values() for path in paths}
    mount_points = {"/etc", "/tmp", "/var", "/var/lib", "/var/lib/dptrain", "/var/lib/dptrain/checkpoint", "/dev"}
    assert changes <= mount_points | {"/dev/termination-log"}, changes
    # ... and the operator that ran it is its image's container, locked down as the chart's Deployment.
    config = podman.podman("inspect", "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}", operator.name)
    assert config.stdout.split() == [f"{UID}:{UID}", "true"]


def test_a_killed_trainer_is_retried_and_the_retry_resumes(
    cluster: Cluster, namespace: str, container_node: ContainerNode, operator: OperatorContainer
) -> None:
    # ~2000 steps (~15 s of training): the kill must land mid-training, after the operator's first scrape, on a
    # busy 2-core CI machine too (with 6 epochs the whole run once finished before the scrape).
    apply(cluster, namespace, job_manifest("crashy", training={"epochs": 200}))
    claim = container_node.pvc_dir(namespace, "crashy-checkpoint")
    wait_for(
        (claim / "checkpoint.pt").exists,
        timeout=180,
        what="a first checkpoint",
        diagnose=diagnose(cluster, namespace, container_node, operator),
    )

    def scraped() -> int | None:
        """Steps the operator saw on the trainer's metrics endpoint (the container's port on its 127.0.0.x IP)."""
        ledger = get(
            cluster, namespace, "privacyledger", get(cluster, namespace, "dptj", "crashy")["status"]["ledgerName"]
        )
        entries = [e for e in ledger.get("status", {}).get("entries", []) if e["jobName"] == "crashy"]
        return entries[0].get("observedSteps") if entries else None

    observed = wait_for(scraped, timeout=60, what="the operator to scrape the trainer container")
    container_node.kill(namespace, "crashy-attempt-1")  # SIGKILL to the container
    job = wait_for(
        phase_is(cluster, namespace, "crashy", "Succeeded", "Failed"),
        timeout=240,
        what="the retried job to finish",
        diagnose=diagnose(cluster, namespace, container_node, operator),
    )
    assert job["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, container_node, operator)()
    assert job["status"]["attempts"] == 2
    first = next(pod for pod in pods(cluster, namespace) if pod["metadata"]["name"] == "crashy-attempt-1")
    assert (_terminated(first)["exitCode"], _terminated(first)["reason"]) == (137, "Error")
    assert "resum" in container_node.logs(namespace, "crashy-attempt-2").lower()
    entries = [json.loads(line) for line in (claim / "privacy-journal.jsonl").read_text().splitlines() if line.strip()]
    intents = [entry for entry in entries if entry.get("type") == "intent" and entry["partition"] == "train"]
    planned = job["status"]["privacy"]["plannedSteps"]
    assert {entry["attempt"] for entry in intents} == {1, 2}, f"killed after {observed} of {planned} steps"
    assert sum(entry["steps"] for entry in intents) <= planned


def test_a_too_small_memory_limit_fails_the_job_as_oom_killed(
    cluster: Cluster, namespace: str, container_node: ContainerNode, operator: OperatorContainer
) -> None:
    # The trainer needs ~300 MiB just for torch and its data; 160Mi is a real kernel OOM kill.
    apply(cluster, namespace, job_manifest("cramped", resources={"memory": "160Mi"}))
    job = wait_for(
        phase_is(cluster, namespace, "cramped", "Succeeded", "Failed"),
        timeout=180,
        what="the job to fail",
        diagnose=diagnose(cluster, namespace, container_node, operator),
    )
    failed = condition(job, "Failed")
    assert (job["status"]["phase"], failed["reason"]) == ("Failed", "OOMKilled"), failed
    assert "raise spec.resources.memory" in failed["message"]
    assert "160Mi" in failed["message"]
    (pod,) = pods(cluster, namespace)  # no retry: the same limit would be killed again
    assert (_terminated(pod)["exitCode"], _terminated(pod)["reason"]) == (137, "OOMKilled")
    assert job["status"]["attempts"] == 1


WRITE_PROBE = r"""
import errno, json, os
results = {}
for path in ("/etc/x", "/x", "/opt/dptrain/x", "/usr/x", "/var/tmp/x", "/run/x", "/home/x",
             os.environ["PROBE_SCRATCH"] + "/x", os.environ["PROBE_CHECKPOINT"] + "/x"):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        results[path] = "ok"
    except OSError as error:
        results[path] = errno.errorcode[error.errno]
with open("/dev/termination-log", "w") as handle:
    json.dump({"uid": os.getuid(), "writes": results}, handle)
"""


def test_the_trainer_pod_writes_only_to_its_volumes(
    cluster: Cluster, namespace: str, container_node: ContainerNode, trainer_image: str
) -> None:
    """The pod exactly as the operator renders it (security context, volumes, env), its command swapped for a
    probe: every write outside the scratch and checkpoint volumes fails, because the root filesystem is
    read-only."""
    settings = Settings(trainer_image=trainer_image)
    document = base_manifest("job")
    document["metadata"].update(namespace=namespace, uid="0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10")
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    pod = sample_trainer_pod(job, settings)
    pod["metadata"].pop("finalizers", None)
    pod["metadata"].pop("ownerReferences", None)
    container = pod["spec"]["containers"][0]
    container["command"] = ["python3", "-c", WRITE_PROBE]
    container["env"] += [
        {"name": "PROBE_SCRATCH", "value": settings.scratch_mount_path},
        {"name": "PROBE_CHECKPOINT", "value": settings.checkpoint_mount_path},
    ]
    container["resources"] = {"limits": {"cpu": "1", "memory": "256Mi"}}
    raw_request(cluster.api, "POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    done = container_node.wait_for_phase(namespace, pod["metadata"]["name"], timeout=60)
    assert done["status"]["phase"] == "Succeeded", container_node.logs(namespace, pod["metadata"]["name"])
    facts = json.loads(_terminated(done)["message"])
    assert facts["uid"] == UID
    writes = facts["writes"]
    volumes = {f"{settings.scratch_mount_path}/x", f"{settings.checkpoint_mount_path}/x"}
    assert {writes[path] for path in volumes} == {"ok"}, writes
    assert {result for path, result in writes.items() if path not in volumes} == {"EROFS"}, writes
