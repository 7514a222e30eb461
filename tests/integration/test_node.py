"""The fake node (tests/support/node.py) against the testenv API server: it runs pods the way a
kubelet would, so the operator's tests can rely on it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import CoreV1Api

from tests.support.cluster import Cluster, raw_request
from tests.support.node import FakeNode, expand, parse_quantity, resource_field_value, rewrite_path

pytestmark = pytest.mark.integration

PY = sys.executable


def _pod(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    spec: dict[str, Any] = container.pop("pod_spec", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python:3.11", "command": command, **container}],
            **spec,
        },
    }


def _create(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> None:
    raw_request(cluster.api, "POST", f"/api/v1/namespaces/{namespace}/pods", pod)


def _terminated(pod: dict[str, Any], index: int = 0) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][index]["state"]
    return state["terminated"]  # type: ignore[no-any-return]


def _conditions(pod: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in pod["status"]["conditions"]}


SCRIPT_OK = """
import os, sys
print("ENV", sorted(os.environ))
print("HOSTNAME", os.environ["HOSTNAME"])
with open(sys.argv[1], "w") as f:
    f.write("all good")
assert os.environ["DPTRAIN_TERMINATION_MESSAGE_PATH"] == sys.argv[1]
"""


def test_pod_runs_to_success_with_termination_message(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    created = time.monotonic()
    _create(cluster, namespace, _pod("ok", [PY, "-c", SCRIPT_OK, "/dev/termination-log"]))
    running = node.wait_for_pod(namespace, "ok", lambda p: bool((p.get("status") or {}).get("startTime")), 5)
    assert time.monotonic() - created < 1.0
    assert running["spec"]["nodeName"] == "testnode"

    pod = node.wait_for_phase(namespace, "ok")
    status = pod["status"]
    assert status["phase"] == "Succeeded"
    assert status["podIP"].startswith("127.0.")
    assert status["podIP"] != "127.0.0.1"
    assert status["podIPs"] == [{"ip": status["podIP"]}]
    terminated = _terminated(pod)
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "all good"
    assert terminated["startedAt"]
    assert terminated["finishedAt"]
    assert _conditions(pod)["Ready"] == "False"
    assert _conditions(pod)["PodScheduled"] == "True"
    logs = node.logs(namespace, "ok")
    assert "HOSTNAME ok" in logs
    assert "DPTRAIN_PATH_MAP" in logs


def test_typed_client_reads_the_status(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    """What the node writes deserializes into the generated models (the operator may use them)."""
    _create(cluster, namespace, _pod("typed", [PY, "-c", "print('hi')"]))
    node.wait_for_phase(namespace, "typed")
    pod = CoreV1Api(cluster.api).read_namespaced_pod("typed", namespace)
    assert pod.status is not None
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses is not None
    state = pod.status.container_statuses[0].state
    assert state is not None
    terminated = state.terminated
    assert terminated is not None
    assert terminated.exit_code == 0


def test_failing_command_fails_the_pod(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    script = "import sys; print('line1'); print('boom', file=sys.stderr); sys.exit(3)"
    _create(cluster, namespace, _pod("fail", [PY, "-c", script]))
    _create(
        cluster,
        namespace,
        _pod("fail-logs", [PY, "-c", script], terminationMessagePolicy="FallbackToLogsOnError"),
    )
    _create(cluster, namespace, _pod("noexec", ["/no/such/binary"]))
    no_command = _pod("nocmd", [])
    del no_command["spec"]["containers"][0]["command"]
    _create(cluster, namespace, no_command)

    pod = node.wait_for_phase(namespace, "fail")
    assert pod["status"]["phase"] == "Failed"
    assert _terminated(pod)["exitCode"] == 3
    assert _terminated(pod)["reason"] == "Error"
    assert "message" not in _terminated(pod)  # policy File: no fallback to logs

    pod = node.wait_for_phase(namespace, "fail-logs")
    assert _terminated(pod)["message"] == "line1\nboom\n"

    pod = node.wait_for_phase(namespace, "noexec")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "ContainerCannotRun"
    assert _terminated(pod)["exitCode"] == 128

    pod = node.wait_for_phase(namespace, "nocmd")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "ErrImagePull"
    assert "entrypoint" in pod["status"]["message"]


def test_pvc_is_shared_by_sequential_pods(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    volumes = [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "job-ckpt"}}]
    mounts = [{"name": "ckpt", "mountPath": "/var/run/dptrain/checkpoints"}]
    writer = "import os, sys; open(os.path.join(sys.argv[1], 'state'), 'w').write(os.environ['OUT'])"
    _create(
        cluster,
        namespace,
        _pod(
            "writer",
            [PY, "-c", writer, "/var/run/dptrain/checkpoints"],
            env=[{"name": "OUT", "value": "/var/run/dptrain/checkpoints/x"}],
            volumeMounts=mounts,
            pod_spec={"volumes": volumes},
        ),
    )
    assert node.wait_for_phase(namespace, "writer")["status"]["phase"] == "Succeeded"
    host_dir = node.pvc_dir(namespace, "job-ckpt")
    assert (host_dir / "state").read_text() == str(host_dir / "x")  # env values are rewritten too
    raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}/pods/writer")

    reader = "import sys; open(sys.argv[2], 'w').write(open(sys.argv[1]).read())"
    _create(
        cluster,
        namespace,
        _pod(
            "reader",
            [PY, "-c", reader, "/var/run/dptrain/checkpoints/state", "/dev/termination-log"],
            volumeMounts=mounts,
            pod_spec={"volumes": volumes},
        ),
    )
    pod = node.wait_for_phase(namespace, "reader")
    assert pod["status"]["phase"] == "Succeeded", node.logs(namespace, "reader")
    assert _terminated(pod)["message"] == str(host_dir / "x")


def test_config_map_secret_and_empty_dir_volumes(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    raw_request(
        cluster.api,
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "job-config"}, "data": {"job.yaml": "epochs: 3\n", "other": "x"}},
    )
    raw_request(
        cluster.api,
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "creds"}, "data": {"token": "czNjcjN0"}},  # base64("s3cr3t")
    )
    script = (
        "import json, os, sys\n"
        "m = json.loads(os.environ['DPTRAIN_PATH_MAP'])\n"
        "cfg = open(os.path.join(m['/etc/dptrain'], 'job.yaml')).read()\n"
        "tok = open(sys.argv[1]).read()\n"
        "open(os.path.join(m['/scratch'], 'f'), 'w').write('x')\n"
        "listing = str(sorted(os.listdir(m['/etc/dptrain'])))\n"
        "open(os.environ['DPTRAIN_TERMINATION_MESSAGE_PATH'], 'w').write(cfg + tok + listing)\n"
    )
    _create(
        cluster,
        namespace,
        _pod(
            "mounts",
            [PY, "-c", script, "/etc/creds/token"],
            volumeMounts=[
                {"name": "config", "mountPath": "/etc/dptrain", "readOnly": True},
                {"name": "creds", "mountPath": "/etc/creds"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
            pod_spec={
                "volumes": [
                    {"name": "config", "configMap": {"name": "job-config"}},
                    {"name": "creds", "secret": {"secretName": "creds"}},
                    {"name": "scratch", "emptyDir": {}},
                ]
            },
        ),
    )
    pod = node.wait_for_phase(namespace, "mounts")
    assert pod["status"]["phase"] == "Succeeded", node.logs(namespace, "mounts")
    assert _terminated(pod)["message"] == "epochs: 3\ns3cr3t['job.yaml', 'other']"


def test_downward_api_env(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    names = ["POD_IP", "POD_NAME", "POD_NAMESPACE", "POD_UID", "NODE", "CPUS", "MEM_MI", "MEM", "GREETING"]
    script = f"import json, os, sys; open(sys.argv[1], 'w').write(json.dumps({{k: os.environ[k] for k in {names!r}}}))"
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}},
        {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"containerName": "main", "resource": "requests.memory"}}},
        {"name": "GREETING", "value": "hello $(POD_NAME) $$(POD_NAME) $(UNDEFINED)"},
    ]
    resources = {"limits": {"cpu": "1500m", "memory": "100Mi"}, "requests": {"cpu": "1", "memory": "64Mi"}}
    # a custom terminationMessagePath, given as $(VAR) in args: expanded, then mapped to the host file
    env.append({"name": "MSG", "value": "/var/msg"})
    container = {"env": env, "resources": resources, "terminationMessagePath": "/var/msg", "args": ["$(MSG)"]}
    _create(cluster, namespace, _pod("downward", [PY, "-c", script], **container))
    pod = node.wait_for_phase(namespace, "downward")
    assert pod["status"]["phase"] == "Succeeded", node.logs(namespace, "downward")
    seen = json.loads(_terminated(pod)["message"])
    assert seen["POD_IP"] == pod["status"]["podIP"]
    assert seen["POD_NAME"] == "downward"
    assert seen["POD_NAMESPACE"] == namespace
    assert seen["POD_UID"] == pod["metadata"]["uid"]
    assert seen["NODE"] == "testnode"
    assert seen["CPUS"] == "2"  # 1500m rounds up to whole cores
    assert seen["MEM_MI"] == "100"
    assert seen["MEM"] == str(64 * 2**20)
    assert seen["GREETING"] == "hello downward $(POD_NAME) $(UNDEFINED)"


def test_kill_reports_a_crash(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    _create(cluster, namespace, _pod("crash", ["sleep", "300"]))
    pod = node.wait_for_phase(namespace, "crash", "Running")
    assert _conditions(pod)["Ready"] == "True"
    assert pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    node.kill(namespace, "crash")
    pod = node.wait_for_phase(namespace, "crash")
    assert pod["status"]["phase"] == "Failed"
    assert _terminated(pod)["exitCode"] == 137
    assert _terminated(pod)["reason"] == "Error"

    _create(cluster, namespace, _pod("oom", ["sleep", "300"]))
    node.wait_for_phase(namespace, "oom", "Running")
    node.kill(namespace, "oom", reason="OOMKilled")
    assert _terminated(node.wait_for_phase(namespace, "oom"))["reason"] == "OOMKilled"


def _gone(pid: int) -> bool:
    """Whether process pid has exited (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state == "Z"


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_pod_deletion_kills_the_process(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    _create(cluster, namespace, _pod("sleeper", ["sleep", "300"]))
    node.wait_for_phase(namespace, "sleeper", "Running")
    pid = node.pid(namespace, "sleeper")
    assert pid is not None
    assert not _gone(pid)
    raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}/pods/sleeper")
    assert _wait(lambda: _gone(pid)), "sleep still runs after its pod was deleted"


def test_graceful_deletion_with_finalizer(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    """A finalizer keeps the object: the node SIGTERMs, reports 143 and leaves the finalizer alone."""
    trap = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); time.sleep(300)"
    pod = _pod("graceful", [PY, "-c", trap], pod_spec={"terminationGracePeriodSeconds": 3})
    pod["metadata"]["finalizers"] = ["test.dptrain.io/keep"]
    _create(cluster, namespace, pod)
    node.wait_for_phase(namespace, "graceful", "Running")
    time.sleep(0.3)  # let python install its handler
    raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}/pods/graceful")
    done = node.wait_for_phase(namespace, "graceful")
    assert done["metadata"]["deletionTimestamp"]
    assert done["status"]["phase"] == "Failed"
    assert _terminated(done)["exitCode"] == 7  # the SIGTERM handler ran

    sleeper = _pod("graceful-sleep", ["sleep", "300"], pod_spec={"terminationGracePeriodSeconds": 3})
    sleeper["metadata"]["finalizers"] = ["test.dptrain.io/keep"]
    _create(cluster, namespace, sleeper)
    node.wait_for_phase(namespace, "graceful-sleep", "Running")
    raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}/pods/graceful-sleep")
    done = node.wait_for_phase(namespace, "graceful-sleep")
    assert _terminated(done)["exitCode"] == 143
    assert done["metadata"]["finalizers"] == ["test.dptrain.io/keep"]


def test_concurrent_pods_get_distinct_ips(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    for name in ("a", "b", "c"):
        _create(cluster, namespace, _pod(name, ["sleep", "300"]))
    ips = {node.wait_for_phase(namespace, name, "Running")["status"]["podIP"] for name in ("a", "b", "c")}
    assert len(ips) == 3
    # a process can bind its pod IP (loopback)
    server = (
        "import os, socket; s = socket.socket(); s.bind((os.environ['IP'], 0)); "
        "open(os.environ['DPTRAIN_TERMINATION_MESSAGE_PATH'], 'w').write(s.getsockname()[0])"
    )
    env = [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    _create(cluster, namespace, _pod("binder", [PY, "-c", server], env=env))
    pod = node.wait_for_phase(namespace, "binder")
    assert _terminated(pod)["message"] == pod["status"]["podIP"]
    assert pod["status"]["podIP"] not in ips
    # an IP is reused once its pod is gone
    freed = node.wait_for_phase(namespace, "a", "Running")["status"]["podIP"]
    raw_request(cluster.api, "DELETE", f"/api/v1/namespaces/{namespace}/pods/a")
    assert _wait(lambda: node.pid(namespace, "a") is None)
    time.sleep(0.2)
    _create(cluster, namespace, _pod("d", ["sleep", "300"]))
    assert node.wait_for_phase(namespace, "d", "Running")["status"]["podIP"] == freed


def test_init_containers_run_first(cluster: Cluster, namespace: str, node: FakeNode) -> None:
    pod = _pod(
        "init",
        # paths inside a script are not rewritten: pass them as args
        ["sh", "-c", 'cat "$1/ready" > "$2"', "sh", "/work", "/dev/termination-log"],
        volumeMounts=[{"name": "w", "mountPath": "/work"}],
        pod_spec={
            "volumes": [{"name": "w", "emptyDir": {}}],
            "initContainers": [
                {
                    "name": "prep",
                    "image": "busybox",
                    "command": ["sh", "-c", 'echo prepared > "$1/ready"', "sh", "/work"],
                    "volumeMounts": [{"name": "w", "mountPath": "/work"}],
                }
            ],
        },
    )
    _create(cluster, namespace, pod)
    done = node.wait_for_phase(namespace, "init")
    assert done["status"]["phase"] == "Succeeded", node.logs(namespace, "init")
    assert _terminated(done)["message"] == "prepared\n"
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_missing_config_map_fails_the_pod(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    with FakeNode(cluster.api, namespace, work_dir=tmp_path / "n2", node_name="n2", mount_timeout=0.3) as fake:
        pod = _pod("nocm", ["true"], volumeMounts=[{"name": "c", "mountPath": "/c"}])
        pod["spec"]["volumes"] = [{"name": "c", "configMap": {"name": "absent"}}]
        _create(cluster, namespace, pod)
        done = fake.wait_for_phase(namespace, "nocm")
        assert done["status"]["phase"] == "Failed"
        assert done["status"]["reason"] == "FailedMount"
        assert done["spec"]["nodeName"] == "n2"


def test_stop_kills_children(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    fake = FakeNode(cluster.api, namespace, work_dir=tmp_path / "n3").start()
    _create(cluster, namespace, _pod("orphan", ["sh", "-c", "sleep 300 & sleep 300"]))
    fake.wait_for_phase(namespace, "orphan", "Running")
    pid = fake.pid(namespace, "orphan")
    assert pid is not None
    started = time.monotonic()
    fake.stop(grace_seconds=0.5)
    assert time.monotonic() - started < 3
    assert _gone(pid)
    # the whole process group (the backgrounded sleep too) is gone
    assert _wait(lambda: not _group_alive(pid))


def test_watch_relists_on_410_and_reconnects(
    cluster: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first watch starts from an expired resourceVersion (the server answers 410 Gone): the node
    relists. Its watches also end every second (server-side timeout) and are resumed."""
    fake = FakeNode(cluster.api, namespace, work_dir=tmp_path / "n4", watch_timeout_seconds=1)
    relists: list[str] = []
    real_relist = fake._relist

    def relist() -> str:
        relists.append(real_relist())
        return "1" if len(relists) == 1 else relists[-1]

    monkeypatch.setattr(fake, "_relist", relist)
    with fake:
        assert _wait(lambda: len(relists) >= 2), "no relist after 410"
        time.sleep(1.5)  # at least one server-side watch timeout
        _create(cluster, namespace, _pod("late", ["true"]))
        assert fake.wait_for_phase(namespace, "late", timeout=5)["status"]["phase"] == "Succeeded"
        assert len(relists) == 2  # resumed from the last resourceVersion: no further relist
    assert fake.errors == []


def test_all_namespaces_node_leaves_foreign_pods_alone(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    foreign = _pod("foreign", ["true"], pod_spec={"nodeName": "elsewhere"})
    _create(cluster, namespace, foreign)
    with FakeNode(cluster.api, None, work_dir=tmp_path / "n5", node_name="everywhere") as fake:
        _create(cluster, namespace, _pod("mine", ["true"]))
        done = fake.wait_for_phase(namespace, "mine")
        assert done["spec"]["nodeName"] == "everywhere"
        assert done["status"]["phase"] == "Succeeded"
        untouched = fake.wait_for_pod(namespace, "foreign", lambda pod: True)
        assert not untouched.get("status")
        assert fake.pid(namespace, "foreign") is None


def _group_alive(pgid: int) -> bool:
    """Whether a process of group pgid still runs (zombies, which only wait to be reaped, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_pure_helpers() -> None:
    assert parse_quantity("1500m") == parse_quantity("1.5")
    assert parse_quantity("1Gi") == 2**30
    assert parse_quantity("1e3") == 1000
    pod = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "250m"}}}]}}
    assert resource_field_value(pod, "c", {"resource": "limits.cpu"}) == "1"
    assert resource_field_value(pod, "c", {"resource": "limits.cpu", "divisor": "1m"}) == "250"
    assert resource_field_value(pod, "c", {"resource": "requests.cpu"}) == "1"  # requests default to limits
    assert expand("$(A)-$$(A)-$(B)-$", {"A": "x"}) == "x-$(A)-$(B)-$"
    mapping = [("/var/run/a/b", "/h/ab"), ("/var/run/a", "/h/a")]
    assert rewrite_path("/var/run/a/b/c", mapping) == "/h/ab/c"
    assert rewrite_path("/var/run/ab", mapping) == "/var/run/ab"
    assert rewrite_path("--out=/var/run/a", mapping) == "--out=/h/a"
