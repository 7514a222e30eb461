"""ContainerNode (tests/support/container_node.py): pods run in their images through podman, with the pod's
command/args/env, volumes, security context, limits, termination message and exit codes honoured."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import pytest

from tests.support.cluster import Cluster, raw_request
from tests.support.container_node import ContainerNode

pytestmark = [pytest.mark.integration, pytest.mark.containers]

UID = 65532

PROBE = r"""
import errno, json, os, socket, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
def first(*paths):
    for path in paths:
        try:
            return open(path).read().strip()
        except OSError:
            pass
writes = {}
for path in ("/etc/x", "/x", "/opt/dptrain/x", "/var/tmp/x", "/run/x", "/tmp/x", "/data/out.txt", "/scratch/x",
             "/config/x"):
    try:
        with open(path, "w") as handle:
            handle.write("written in the container")
        writes[path] = "ok"
    except OSError as error:
        writes[path] = errno.errorcode[error.errno]
facts = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()), "hostname": socket.gethostname(),
    "argv": sys.argv[1:], "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ("GREETING", "POD_IP", "CPU", "MEMORY_MI", "PATH", "HOME")},
    "host_env_leaked": any(k.startswith(("PYTEST", "VIRTUAL_ENV", "DPTRAIN_PATH")) for k in os.environ),
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "memory_limit": first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "cpu_quota": first("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                       "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"),
    "writes": writes, "config": open("/config/greeting").read(),
}
with open("/dev/termination-log", "w") as handle:
    json.dump(facts, handle, separators=(",", ":"))
"""

SERVER = r"""
import http.server, os, signal
def stop(*_):
    with open("/dev/termination-log", "w") as handle:
        handle.write("stopped by SIGTERM")
    os._exit(143)
signal.signal(signal.SIGTERM, stop)
server = http.server.HTTPServer((os.environ["POD_IP"], 8080), http.server.SimpleHTTPRequestHandler)
print("serving on", os.environ["POD_IP"], flush=True)
server.serve_forever()
"""


def _pod(name: str, image: str, command: list[str], **container: Any) -> dict[str, Any]:
    spec: dict[str, Any] = container.pop("pod_spec", {})
    metadata: dict[str, Any] = {"name": name, **container.pop("metadata", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": image, "command": command, **container}],
            **spec,
        },
    }


def _create(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> None:
    raw_request(cluster.api, "POST", f"/api/v1/namespaces/{namespace}/pods", pod)


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]
    return state["terminated"]  # type: ignore[no-any-return]


def _locked_down() -> dict[str, Any]:
    """The trainer pod's container securityContext (render/children.py)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_a_pod_runs_in_its_image_with_its_security_context_volumes_env_and_limits(
    cluster: Cluster, namespace: str, container_node: ContainerNode, trainer_image: str
) -> None:
    raw_request(
        cluster.api,
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "from a map"}},
    )
    pod = _pod(
        "probe",
        trainer_image,
        ["python3", "-c", PROBE],
        args=["$(GREETING)", "/data/out.txt"],
        env=[
            {"name": "GREETING", "value": "hello"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "MEMORY_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        ],
        resources={"limits": {"cpu": "1500m", "memory": "300Mi"}},
        volumeMounts=[
            {"name": "store", "mountPath": "/data"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "cfg", "mountPath": "/config"},
        ],
        securityContext=_locked_down(),
        pod_spec={
            "securityContext": {"runAsUser": UID, "runAsGroup": UID, "fsGroup": UID},
            "volumes": [
                {"name": "store", "persistentVolumeClaim": {"claimName": "store"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "cfg", "configMap": {"name": "cfg"}},
            ],
        },
    )
    _create(cluster, namespace, pod)
    done = container_node.wait_for_phase(namespace, "probe", timeout=60)
    terminated = _terminated(done)
    assert done["status"]["phase"] == "Succeeded", (terminated, container_node.logs(namespace, "probe"))
    facts = json.loads(terminated["message"])
    assert (facts["uid"], facts["gid"]) == (UID, UID)
    assert UID in facts["groups"]  # fsGroup
    assert facts["hostname"] == "probe"
    assert facts["argv"] == ["hello", "/data/out.txt"]  # $(VAR) expanded; container paths untouched
    assert facts["env"]["POD_IP"] == done["status"]["podIP"]
    assert (facts["env"]["CPU"], facts["env"]["MEMORY_MI"]) == ("2", "300")  # rounded up, as the kubelet does
    assert facts["env"]["PATH"].startswith("/opt/dptrain/bin:")  # the image's ENV
    assert facts["env"]["HOME"] == "/tmp"
    assert not facts["host_env_leaked"]
    assert (facts["cap_eff"], facts["no_new_privs"]) == ("0000000000000000", "1")
    assert facts["memory_limit"] == str(300 * 2**20)
    assert facts["cpu_quota"].split()[0] in ("150000", "150000 100000")
    writes = facts["writes"]
    assert (writes["/data/out.txt"], writes["/scratch/x"]) == ("ok", "ok")
    read_only = ("/etc/x", "/x", "/opt/dptrain/x", "/var/tmp/x", "/run/x", "/tmp/x", "/config/x")
    assert {writes[path] for path in read_only} == {"EROFS"}, writes
    assert facts["config"] == "from a map"
    written = container_node.pvc_dir(namespace, "store") / "out.txt"
    assert written.read_text() == "written in the container"
    assert (written.stat().st_uid, written.stat().st_gid) == (UID, UID)
    assert terminated["containerID"].startswith("podman://")
    assert done["status"]["containerStatuses"][0]["imageID"].startswith("sha256:")


def test_exit_codes_and_pods_that_cannot_start(
    cluster: Cluster, namespace: str, container_node: ContainerNode, trainer_image: str
) -> None:
    _create(cluster, namespace, _pod("exits-3", trainer_image, ["python3", "-c", "print('bye'); raise SystemExit(3)"]))
    _create(cluster, namespace, _pod("no-command", trainer_image, ["no-such-command"]))
    _create(cluster, namespace, _pod("no-image", "localhost/dptrain/no-such-image:0", ["true"]))
    root = _pod("root", trainer_image, ["true"], securityContext={"runAsNonRoot": True, "runAsUser": 0})
    _create(cluster, namespace, root)
    empty_command = _pod("image-cmd", trainer_image, [], securityContext={"readOnlyRootFilesystem": True})
    _create(cluster, namespace, empty_command)  # the image's CMD: dptrain --help

    exited = container_node.wait_for_phase(namespace, "exits-3", timeout=60)
    assert (exited["status"]["phase"], _terminated(exited)["exitCode"], _terminated(exited)["reason"]) == (
        "Failed",
        3,
        "Error",
    )
    assert "bye" in container_node.logs(namespace, "exits-3")
    missing = _terminated(container_node.wait_for_phase(namespace, "no-command", timeout=60))
    assert (missing["exitCode"], missing["reason"]) == (128, "StartError")
    assert "no-such-command" in missing["message"]
    no_image = container_node.wait_for_phase(namespace, "no-image", timeout=60)
    assert no_image["status"]["reason"] == "ErrImagePull"
    as_root = container_node.wait_for_phase(namespace, "root", timeout=60)
    assert as_root["status"]["reason"] == "CreateContainerConfigError"
    assert "runAsNonRoot" in as_root["status"]["message"]
    default = container_node.wait_for_phase(namespace, "image-cmd", timeout=60)
    assert default["status"]["phase"] == "Succeeded"
    assert "usage: dptrain" in container_node.logs(namespace, "image-cmd")


def test_a_too_small_memory_limit_ends_in_a_real_oom_kill(
    cluster: Cluster, namespace: str, container_node: ContainerNode, trainer_image: str
) -> None:
    hog = "blocks = [bytearray(8 << 20) for _ in range(64)]; print('survived')"
    pod = _pod("hog", trainer_image, ["python3", "-c", hog], resources={"limits": {"memory": "64Mi"}})
    _create(cluster, namespace, pod)
    done = container_node.wait_for_phase(namespace, "hog", timeout=60)
    terminated = _terminated(done)
    assert (done["status"]["phase"], terminated["exitCode"], terminated["reason"]) == ("Failed", 137, "OOMKilled")
    assert "survived" not in container_node.logs(namespace, "hog")


def test_a_pod_serves_on_its_ip_and_stops_on_signals(
    cluster: Cluster, namespace: str, container_node: ContainerNode, trainer_image: str
) -> None:
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    server = _pod(
        "server",
        trainer_image,
        ["python3", "-c", SERVER],
        env=[pod_ip],
        securityContext=_locked_down(),
        metadata={"finalizers": ["example.com/keep"]},  # keeps the deleted pod readable
        pod_spec={"securityContext": {"runAsUser": UID}, "terminationGracePeriodSeconds": 10},
    )
    _create(cluster, namespace, server)
    sleeper = "import time\nwhile True: time.sleep(1)"
    _create(cluster, namespace, _pod("victim", trainer_image, ["python3", "-c", sleeper]))
    running = container_node.wait_for_phase(namespace, "server", "Running", timeout=60)
    address = running["status"]["podIP"]
    assert address.startswith("127.")
    deadline = time.monotonic() + 30
    while True:  # host networking: the pod's port on its 127.0.0.x address, as the operator scrapes a trainer
        try:
            assert httpx.get(f"http://{address}:8080/", timeout=2).status_code == 200
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    container_node.wait_for_phase(namespace, "victim", "Running", timeout=60)
    pid = container_node.pid(namespace, "victim")
    assert pid is not None
    assert pid != os.getpid()
    container_node.kill(namespace, "victim")  # a crash: SIGKILL through the runtime
    killed = _terminated(container_node.wait_for_phase(namespace, "victim", timeout=30))
    assert (killed["exitCode"], killed["reason"]) == (137, "Error")

    raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}/pods/server")
    stopped = container_node.wait_for_pod(
        namespace, "server", lambda p: bool(p["status"]["containerStatuses"][0]["state"].get("terminated")), 30
    )
    assert (_terminated(stopped)["exitCode"], _terminated(stopped)["message"]) == (143, "stopped by SIGTERM")
