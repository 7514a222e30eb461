"""FakeNode: a small fake kubelet for the testenv API server, which has no scheduler and no kubelet.

A ``FakeNode`` watches Pods (of one namespace or all) and runs every pod that is unbound or bound
to it, as local processes, writing ``status`` the way a kubelet does::

    node = FakeNode(cluster.api, namespace, work_dir=tmp_path, node_name="testnode")
    node.start()
    ...                       # create pods; they are Running in well under a second
    node.stop()               # SIGTERM, then SIGKILL, every process it started

What it does, per pod
---------------------
* binds it (``spec.nodeName``, JSON merge patch with a resourceVersion precondition, so several
  nodes can share a cluster), gives it a unique loopback address ``127.0.0.X`` (X from 2 up, freed;
  ``127.0.N+1.X`` under pytest-xdist worker gwN, so parallel workers never collide)
  when the pod object is gone) as ``status.podIP``/``podIPs`` (``hostIP`` is 127.0.0.1), writes
  ``Pending``, then starts the containers and writes ``Running`` with the conditions
  (PodScheduled, PodReadyToStartContainers, Initialized, ContainersReady, Ready) and
  ``containerStatuses`` (``state.running.startedAt``, ready, restartCount 0, image);
* a pod with ``spec.schedulingGates`` is not bound until they are all removed (as the scheduler does: Kueue
  admits a pod group by removing its gate from every pod);
* init containers run first, one after the other; a failing one fails the pod;
* a container runs ``command + args`` (``$(VAR)`` expanded as Kubernetes does) as a process in a
  new session (its "container": when its main process exits, the rest of the group is SIGKILLed).
  An empty ``command`` means "the image's entrypoint", which a fake node cannot know unless it is
  given ``image_entrypoints``; otherwise the pod fails with reason ``ErrImagePull``;
* the environment is the container's ``env``/``envFrom`` (values, ``fieldRef`` metadata.name,
  metadata.namespace, metadata.uid, metadata.labels/annotations['k'], spec.nodeName,
  spec.serviceAccountName, status.podIP(s), status.hostIP(s); ``resourceFieldRef`` limits/requests
  cpu, memory, ephemeral-storage rounded up as Kubernetes does, so cpu is whole cores with the
  default divisor and an unset limit is the node's capacity; ``configMapKeyRef``/``secretKeyRef``),
  on top of the node's ``PATH`` (with the directory of ``sys.executable`` in front, so the
  virtualenv's console scripts run), ``HOME``, ``LANG``/``LC_*``, ``TMPDIR``, ``VIRTUAL_ENV``,
  ``PYTHON*`` and ``HOSTNAME=<pod name>``; the working directory is ``workingDir`` (mapped) or a
  per-pod folder. Cluster DNS for pods, emulated: an env value that is a pod's DNS name in a headless Service
  (``<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]`` of a pod that sets both and has not ended) is
  resolved to that pod's IP when the container starts, waiting up to ``mount_timeout`` seconds for the pod to
  get one (the processes share the host's resolver, which knows no cluster names);
* stdout+stderr of all its containers go to ``work_dir/logs/<namespace>_<pod>.log`` (``logs()``);
* when the main process exits, ``state.terminated`` (exitCode, reason Completed/Error, or the one
  given to ``kill``, message, startedAt, finishedAt, containerID) is written; once all containers
  have exited the phase is Succeeded (all exit 0) or Failed, with Ready/ContainersReady False
  (reason PodCompleted). ``restartPolicy`` other than Never is treated as Never (with a warning).
  A pod this node cannot run (missing ConfigMap, bad fieldRef, command not found, ...) goes Failed
  with a reason (FailedMount, CreateContainerConfigError, ContainerCannotRun, ErrImagePull,
  FakeNodeError) instead of stopping the node.

Volumes and paths: the container paths do not exist here
--------------------------------------------------------
Processes run on the host, so every ``volumeMount`` is a real host folder:

* ``persistentVolumeClaim`` -> ``work_dir/pvc/<namespace>/<claimName>``, shared by all pods and kept
  after they are gone (what a claim is for); ``pvc_dir()`` returns it;
* ``emptyDir`` -> a per-pod folder; ``hostPath`` -> ``work_dir/hostpath/<path>``;
* ``configMap``/``secret`` -> a per-pod folder holding the keys as files (``items``, ``optional``,
  ``defaultMode``; secret values base64-decoded, ``stringData`` honoured); ``downwardAPI`` and
  ``projected`` likewise. A missing ConfigMap/Secret is waited for ``mount_timeout`` seconds, then
  the pod fails with FailedMount;
* ``subPath`` selects a path inside the volume.

A process learns the mapping two ways: env ``DPTRAIN_PATH_MAP`` is the JSON object
``{containerPath: hostPath}`` (mounts and the termination message path), and every env value,
command word and arg that starts with a mapped container path (``/x`` or ``/x/...``, also as
``--flag=/x/...``) is rewritten to the host path (longest prefix first). So a trainer started with
``--output /var/run/dptrain/checkpoints`` receives ``--output <work_dir>/pvc/ns/claim``.
Only whole words are rewritten: a container path inside a longer string (``sh -c "echo > /x/f"``, a
``python -c`` script) is NOT, and would touch the host's real path; pass paths as separate args
or read ``DPTRAIN_PATH_MAP``/``DPTRAIN_TERMINATION_MESSAGE_PATH``.

The ``terminationMessagePath`` (default ``/dev/termination-log``) maps to a per-pod host file, is
rewritten the same way and is also given as env ``DPTRAIN_TERMINATION_MESSAGE_PATH``. On exit up to
4096 bytes of it become ``state.terminated.message``; if it is empty, the policy is
FallbackToLogsOnError and the exit code is not 0, the last 80 lines (at most 2048 bytes) of the
container's output are used instead.

Deletion
--------
The testenv serves Pod as a custom resource, so ``DELETE`` removes a pod at once (no graceful
deletion): the node sees a DELETED event, SIGTERMs the main process, SIGKILLs the group after
``terminationGracePeriodSeconds`` (capped at ``max_grace_seconds``) and frees the IP. A pod with
finalizers gets a ``deletionTimestamp`` instead: the node does the same, writes the terminated
status, then deletes the pod with gracePeriodSeconds=0 as a kubelet does (the finalizers are left to
their owners unless ``remove_finalizers_on_delete``). ``kill()`` simulates a crash (SIGKILL: exit
code 137, reason Error, or any reason given, e.g. OOMKilled).

Container mode
--------------
Everything above that is about processes on the host (path rewriting, ``DPTRAIN_PATH_MAP``, the node's
``PATH``/``HOME``, process groups) is this class's container runtime, in the ``_launch``/``_signal``/
``_kill_container``/``_exited`` hooks. ``ContainerNode`` (``container_node.py``) overrides them to run each
container in its image through podman, with the same volumes, env, pod IPs and status; see its docstring.

The node uses its own ApiClient (same Configuration as the one given) and plain JSON, never the
generated models, so an odd pod cannot break its watch. Status writes are JSON merge patches of
``/status`` (no resourceVersion, like the kubelet's), retried on 409/429/5xx and connection errors.
The watch resumes from the last resourceVersion and relists on 410 Gone.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("tests.support.node")

Json = dict[str, Any]

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
TERMINAL_PHASES = ("Succeeded", "Failed")
MERGE_PATCH = "application/merge-patch+json"
_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "VIRTUAL_ENV", "TZ")
_TAIL_KEEP = 16384
_POD_DNS_NAME = re.compile(
    r"^(?P<hostname>[a-z][a-z0-9-]*)\.(?P<subdomain>[a-z][a-z0-9-]*)(?:\.(?P<namespace>[a-z0-9-]+)(?:\.svc(?:\.cluster\.local)?)?)?$"
)


class PodStartError(Exception):
    """This pod cannot run: it goes Failed with ``reason`` (the node goes on)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- quantities, downward API, $(VAR) expansion, path mapping: pure helpers ---

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX: dict[str, Fraction] = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}


def parse_quantity(quantity: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("500m", "1.5", "4Gi", "1e3") as an exact Fraction."""
    text = str(quantity).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return Fraction(match.group(1)) * _SUFFIX[match.group(2) or ""]


def _node_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def resource_field_value(pod: Json, container_name: str, ref: Json) -> str:
    """The value of a resourceFieldRef, as the kubelet computes it.

    cpu: ceil(milli-cores / divisor in milli-cores) -- whole cores with the default divisor "1";
    memory/ephemeral-storage: ceil(bytes / divisor). An unset limit is the node's capacity; an
    unset request is the limit when one is set (API defaulting), else 0.
    """
    name = ref.get("containerName") or container_name
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"].get("containers", [])]
    container = next((c for c in containers if c.get("name") == name), None)
    if container is None:
        raise PodStartError("CreateContainerConfigError", f"resourceFieldRef names unknown container {name!r}")
    resource = str(ref.get("resource", ""))
    kind, _, res = resource.partition(".")
    if kind not in ("limits", "requests") or res not in ("cpu", "memory", "ephemeral-storage"):
        raise PodStartError("CreateContainerConfigError", f"unsupported resourceFieldRef resource {resource!r}")
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    capacity = {"cpu": Fraction(os.cpu_count() or 1), "memory": Fraction(_node_memory_bytes())}
    capacity["ephemeral-storage"] = Fraction(100 * 2**30)
    raw = limits.get(res) if kind == "limits" else requests.get(res, limits.get(res))
    value = parse_quantity(raw) if raw is not None else (capacity[res] if kind == "limits" else Fraction(0))
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor <= 0:
        raise PodStartError("CreateContainerConfigError", f"resourceFieldRef divisor must be positive: {ref}")
    if res == "cpu":
        return str(math.ceil(math.ceil(value * 1000) / math.ceil(divisor * 1000)))
    return str(math.ceil(math.ceil(value) / divisor))


_KEYED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']*)'\]$")


def field_ref_value(pod: Json, field_path: str) -> str:
    """The value of a fieldRef (the fields the downward API supports)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status") or {}
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs") or []),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs") or []),
    }
    if field_path in simple:
        return str(simple[field_path] or "")
    if field_path in ("metadata.labels", "metadata.annotations"):
        values = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f"{key}={json.dumps(str(values[key]))}" for key in sorted(values))
    keyed = _KEYED_FIELD.match(field_path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    raise PodStartError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {field_path!r}")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $(VAR) -> value if defined (else kept), $$ -> $."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(variables[name] if name in variables else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(char)
        i += 1
    return "".join(out)


def rewrite_path(value: str, path_map: Sequence[tuple[str, str]]) -> str:
    """value with a leading mapped container path replaced by its host path (longest first);
    also the value part of ``--flag=/container/path``."""
    for container_path, host_path in path_map:
        prefix = container_path.rstrip("/")
        if not prefix:
            continue
        if value == prefix or value.startswith(prefix + "/"):
            return host_path + value[len(prefix) :]
    if value.startswith("-") and "=" in value:
        flag, _, rest = value.partition("=")
        rewritten = rewrite_path(rest, path_map)
        if rewritten != rest:
            return f"{flag}={rewritten}"
    return value


def _sorted_map(path_map: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted(path_map.items(), key=lambda item: len(item[0].rstrip("/")), reverse=True)


def _json_body(response: object) -> Json:
    data = cast(Any, response).data
    return cast(Json, json.loads(data)) if data else {}


def _status_code(error: BaseException) -> int | None:
    return error.status if isinstance(error, ApiException) else None


def _tail_text(data: bytes) -> str:
    lines = data.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    return b"".join(lines)[-FALLBACK_LOG_BYTES:].decode("utf-8", errors="replace")


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- one container, one pod ---


@dataclass
class _Container:
    spec: Json
    init: bool
    term_file: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    reason: str | None = None  # terminated reason; set up front for kill(reason=...) and start failures
    message: str = ""
    tail: bytearray = field(default_factory=bytearray)
    tail_lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    reported: bool = False
    runtime_id: str | None = None  # the container runtime's name for it (container mode), else None
    image_id: str | None = None

    @property
    def name(self) -> str:
        return str(self.spec.get("name", ""))

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.done.is_set()

    def add_output(self, chunk: bytes) -> None:
        with self.tail_lock:
            self.tail.extend(chunk)
            if len(self.tail) > _TAIL_KEEP:
                del self.tail[: len(self.tail) - _TAIL_KEEP]


class _PodRun:
    def __init__(self, node: FakeNode, pod: Json) -> None:
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta.get("namespace", "default")
        self.name: str = meta["name"]
        self.dir = node.work_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.log_path = node.log_path(self.namespace, self.name)
        self.ip: str | None = None
        self.start_time: str | None = None
        self.phase = "Pending"
        self.pod_reason: str | None = None
        self.pod_message: str | None = None
        spec = pod.get("spec") or {}
        self.init_containers = [self._container(c, True) for c in spec.get("initContainers") or []]
        self.containers = [self._container(c, False) for c in spec.get("containers") or []]
        self.wake = threading.Event()
        self.terminate_requested = False
        self.kill_deadline: float | None = None
        self.term_sent = False
        self.deleted = False  # the API object is gone: no more status writes
        self.finished = threading.Event()
        self.transitions: dict[str, tuple[str, str]] = {}
        self.current: _Container | None = None  # the container being started
        self.thread = threading.Thread(target=self.run, name=f"fakenode-{self.namespace}/{self.name}", daemon=True)

    def _container(self, spec: Json, init: bool) -> _Container:
        return _Container(spec=spec, init=init, term_file=self.dir / "termination" / str(spec.get("name", "c")))

    @property
    def all_containers(self) -> list[_Container]:
        return [*self.init_containers, *self.containers]

    # --- requests from the watch thread / the test ---

    def request_termination(self, deleted: bool) -> None:
        if deleted:
            self.deleted = True
        if not self.terminate_requested:
            self.terminate_requested = True
            grace = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            try:
                grace_s = float(grace)
            except (TypeError, ValueError):
                grace_s = 30.0
            self.kill_deadline = time.monotonic() + max(0.0, min(grace_s, self.node.max_grace_seconds))
        self.wake.set()

    # --- the pod's thread ---

    def run(self) -> None:
        try:
            if not self._bind():
                return
            self.ip = self.node._allocate_ip(self.uid)
            self.start_time = now()
            self.phase = "Pending"
            self._write_status()
            self._prepare_dirs()
            if self.init_containers:
                for container in self.init_containers:
                    if self.terminate_requested:
                        break
                    self._start(container)
                    self._write_status()
                    self._wait([container])
                    self._write_status()
                    if container.exit_code != 0:
                        self._finish()
                        return
            if not self.terminate_requested:
                for container in self.containers:
                    self._start(container)
                self.phase = "Running"
                self._write_status()
                self._wait(self.containers)
            self._finish()
        except PodStartError as failure:
            self._fail(failure.reason, failure.message)
        except Exception as error:
            log.exception("fake node: pod %s/%s", self.namespace, self.name)
            self.node.errors.append(f"{self.namespace}/{self.name}: {error!r}")
            self._fail("FakeNodeError", f"the fake node could not run this pod: {error!r}")
        finally:
            self._kill_all(signal.SIGKILL)
            self.finished.set()
            self.node._pod_finished(self)

    def _bind(self) -> bool:
        for _ in range(10):
            if self.node._stopping.is_set() or self.deleted:
                return False
            node_name = (self.pod.get("spec") or {}).get("nodeName")
            if node_name == self.node.node_name:
                return True
            if node_name:
                return False  # bound to another node
            body = {
                "metadata": {"resourceVersion": self.pod["metadata"]["resourceVersion"]},
                "spec": {"nodeName": self.node.node_name},
            }
            try:
                self.pod = _json_body(
                    self.node.core.patch_namespaced_pod(
                        self.name, self.namespace, body, _content_type=MERGE_PATCH, _preload_content=False
                    )
                )
                return True
            except ApiException as error:
                if error.status == 404:
                    return False
                if error.status != 409:
                    raise
            try:  # conflict: somebody else changed it; look again
                self.pod = _json_body(
                    self.node.core.read_namespaced_pod(self.name, self.namespace, _preload_content=False)
                )
            except ApiException as error:
                if error.status == 404:
                    return False
                raise
            if self.pod["metadata"]["uid"] != self.uid:
                return False
        return False

    def _prepare_dirs(self) -> None:
        (self.dir / "termination").mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        policy = (self.pod.get("spec") or {}).get("restartPolicy") or "Always"
        if policy != "Never":
            log.warning("fake node: pod %s/%s has restartPolicy %s; run as Never", self.namespace, self.name, policy)

    # --- starting a container ---

    def _start(self, container: _Container) -> None:
        self.current = container
        spec = container.spec
        container.term_file.parent.mkdir(parents=True, exist_ok=True)
        container.term_file.write_bytes(b"")
        path_map = self.node._mounts(self, spec)
        term_path = spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        path_map[term_path] = str(container.term_file)
        variables = self.node._container_env(self, spec)
        log_file = self.log_path.open("ab", buffering=0)
        try:
            container.proc = self.node._launch(self, container, path_map, variables)
        except OSError as error:
            log_file.close()
            raise PodStartError("ContainerCannotRun", f"container {container.name!r}: cannot start: {error}") from error
        except BaseException:
            log_file.close()
            raise
        container.started_at = now()
        proc = container.proc
        pump = threading.Thread(target=self._pump, args=(proc, container, log_file), daemon=True)
        pump.start()
        threading.Thread(target=self._reap, args=(proc, container, pump), daemon=True).start()

    def _entrypoint(self, spec: Json) -> list[str]:
        command = [str(word) for word in spec.get("command") or []]
        if command:
            return command
        image = str(spec.get("image", ""))
        known = self.node.image_entrypoints
        for key in (image, re.split(r"[@]", image)[0], re.sub(r":[^:/]*$", "", re.split(r"[@]", image)[0])):
            if key in known:
                return list(known[key])
        raise PodStartError(
            "ErrImagePull",
            f"container {spec.get('name')!r}: no command, and the fake node does not know the entrypoint "
            f"of image {image!r} (give FakeNode(image_entrypoints=...) or set command)",
        )

    def _pump(self, proc: subprocess.Popen[bytes], container: _Container, log_file: Any) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            while chunk := os.read(fd, 65536):
                log_file.write(chunk)
                container.add_output(chunk)
        except OSError:
            pass
        finally:
            log_file.close()
            proc.stdout.close()

    def _reap(self, proc: subprocess.Popen[bytes], container: _Container, pump: threading.Thread) -> None:
        returncode = proc.wait()
        # PID 1 is gone: so is the rest of the container (before the pump waits for the pipe's end, which a
        # leftover child would hold open). In container mode the group is the podman client alone.
        _signal_group(proc.pid, signal.SIGKILL)
        pump.join(timeout=5)
        self.node._exited(container, returncode)
        container.finished_at = now()
        if container.reason is None:
            container.reason = "Completed" if container.exit_code == 0 else "Error"
        container.message = self._termination_message(container)
        container.done.set()
        self.wake.set()

    def _termination_message(self, container: _Container) -> str:
        try:
            with container.term_file.open("rb") as handle:
                message = handle.read(TERMINATION_MESSAGE_LIMIT)
        except OSError:
            message = b""
        if message:
            return message.decode("utf-8", errors="replace")
        policy = container.spec.get("terminationMessagePolicy") or "File"
        if policy == "FallbackToLogsOnError" and container.exit_code != 0:
            with container.tail_lock:
                return _tail_text(bytes(container.tail))
        return ""

    # --- waiting, terminating ---

    def _wait(self, containers: list[_Container]) -> None:
        while True:
            self.wake.clear()
            if self.terminate_requested and not self.term_sent:
                self.term_sent = True
                for container in containers:
                    if container.running:
                        self.node._signal(container, signal.SIGTERM)
            if self.term_sent and self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                for container in containers:
                    if container.running:
                        self.node._kill_container(container)
                self.kill_deadline = None
            pending = [c for c in containers if not c.done.is_set()]
            newly_done = [c for c in containers if c.done.is_set() and not c.reported]
            for container in newly_done:
                container.reported = True
            if not pending:
                return
            if newly_done:
                self._write_status()
            timeout = 1.0
            if self.kill_deadline is not None and self.term_sent:
                timeout = max(0.0, min(timeout, self.kill_deadline - time.monotonic()))
            self.wake.wait(timeout)

    def _kill_all(self, sig: int) -> None:
        for container in self.all_containers:
            if container.running:
                if sig == signal.SIGKILL:
                    self.node._kill_container(container)
                else:
                    self.node._signal(container, sig)

    def _finish(self) -> None:
        ran = [c for c in self.all_containers if c.proc is not None or c.exit_code is not None]
        failed = any(c.exit_code not in (0, None) for c in ran) or any(c.exit_code is None for c in self.containers)
        self.phase = "Failed" if failed else "Succeeded"
        self._write_status()
        self._finalize_deletion()

    def _fail(self, reason: str, message: str) -> None:
        self._kill_all(signal.SIGKILL)
        for container in self.all_containers:
            if container.proc is not None:
                container.done.wait(5)
        self.phase = "Failed"
        self.pod_reason, self.pod_message = reason, message
        current = self.current
        if current is not None and current.proc is None and reason != "FailedMount":
            # could not start (ErrImagePull, ContainerCannotRun, CreateContainerConfigError): report it
            # as a container that exited with 128, as container runtimes do for a failed exec
            current.started_at = current.finished_at = now()
            current.exit_code, current.reason, current.message = 128, reason, message
            current.done.set()
        if not self.start_time:
            self.start_time = now()
        with contextlib.suppress(Exception):
            self._write_status()
        with contextlib.suppress(Exception):
            self._finalize_deletion()

    def _finalize_deletion(self) -> None:
        """A pod that was deleted gracefully (deletionTimestamp, kept by finalizers): the kubelet's
        final delete with gracePeriodSeconds=0 (and, if asked, the finalizers removed)."""
        if self.deleted or self.node._stopping.is_set() or not self.terminate_requested:
            return
        core = self.node.core
        if self.node.remove_finalizers_on_delete:
            with contextlib.suppress(ApiException):
                core.patch_namespaced_pod(
                    self.name,
                    self.namespace,
                    {"metadata": {"finalizers": None}},
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                )
        with contextlib.suppress(ApiException):
            core.delete_namespaced_pod(
                self.name,
                self.namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                _preload_content=False,
            )

    # --- status ---

    def _condition(self, kind: str, status: bool, reason: str | None = None) -> Json:
        value = "True" if status else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != value:
            self.transitions[kind] = (value, now())
        condition: Json = {"type": kind, "status": value, "lastTransitionTime": self.transitions[kind][1]}
        if reason:
            condition["reason"] = reason
        return condition

    def _container_status(self, container: _Container) -> Json:
        spec = container.spec
        state: Json
        if container.exit_code is not None and container.done.is_set():
            terminated: Json = {
                "exitCode": container.exit_code,
                "reason": container.reason,
                "startedAt": container.started_at,
                "finishedAt": container.finished_at,
                "containerID": self.node._container_id(self, container),
            }
            if container.message:
                terminated["message"] = container.message
            if container.exit_signal:
                terminated["signal"] = container.exit_signal
            state = {"terminated": terminated}
        elif container.proc is not None:
            state = {"running": {"startedAt": container.started_at}}
        else:
            initializing = not container.init and any(c.exit_code is None for c in self.init_containers)
            state = {"waiting": {"reason": "PodInitializing" if initializing else "ContainerCreating"}}
        image = str(spec.get("image", ""))
        status: Json = {
            "name": container.name,
            "image": image,
            "imageID": self.node._image_id(container),
            "ready": container.running and not container.init,
            "started": container.running,
            "restartCount": 0,
            "state": state,
            "lastState": {},
        }
        if container.proc is not None:
            status["containerID"] = self.node._container_id(self, container)
        return status

    def _status(self) -> Json:
        terminal = self.phase in TERMINAL_PHASES
        initialized = all(c.exit_code == 0 for c in self.init_containers)
        ready = self.phase == "Running" and all(c.running for c in self.containers)
        not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        status: Json = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "qosClass": self._qos_class(),
            "conditions": [
                self._condition("PodReadyToStartContainers", self.ip is not None),
                self._condition("Initialized", initialized, None if initialized else "ContainersNotInitialized"),
                self._condition("Ready", ready, None if ready else not_ready_reason),
                self._condition("ContainersReady", ready, None if ready else not_ready_reason),
                self._condition("PodScheduled", True),
            ],
            "containerStatuses": [self._container_status(c) for c in self.containers],
        }
        if self.ip is not None:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.init_containers:
            status["initContainerStatuses"] = [self._container_status(c) for c in self.init_containers]
        if self.pod_reason:
            status["reason"] = self.pod_reason
            status["message"] = self.pod_message
        return status

    def _qos_class(self) -> str:
        resources = [(c.spec.get("resources") or {}) for c in self.containers]
        if not any(r.get("limits") or r.get("requests") for r in resources):
            return "BestEffort"
        for r in resources:
            limits, requests = r.get("limits") or {}, r.get("requests") or {}
            for res in ("cpu", "memory"):
                if res not in limits or parse_quantity(requests.get(res, limits[res])) != parse_quantity(limits[res]):
                    return "Burstable"
        return "Guaranteed"

    def _write_status(self) -> None:
        if self.deleted or self.node._stopping.is_set():
            return
        body = {"status": self._status()}
        # the pod this process sees: fieldRefs read status.podIP from it
        addresses = {k: v for k, v in body["status"].items() if k in ("podIP", "podIPs", "hostIP", "hostIPs")}
        self.pod.setdefault("status", {}).update(addresses)
        self.node._retry(
            lambda: self.node.core.patch_namespaced_pod_status(
                self.name, self.namespace, body, _content_type=MERGE_PATCH, _preload_content=False
            ),
            on_gone=self._gone,
        )

    def _gone(self) -> None:
        self.deleted = True


# --- the node ---


class FakeNode:
    """A fake kubelet (see the module docstring)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str | None = None,
        work_dir: Path | None = None,
        node_name: str = "testnode",
        *,
        max_grace_seconds: float = 5.0,
        mount_timeout: float = 10.0,
        image_entrypoints: Mapping[str, Sequence[str]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        remove_finalizers_on_delete: bool = False,
        watch_timeout_seconds: int = 60,
        ip_block: int | None = None,
    ) -> None:
        """``ip_block`` N gives this node's pods 127.0.N.x (default: by pytest-xdist worker): a second node on the same
        machine (a second test cluster, say) needs its own block, or two pods would share an address."""
        self.ip_block = ip_block
        self.api = ApiClient(api_client.configuration)
        self.core = CoreV1Api(self.api)
        self.namespace = namespace
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="fakenode-"))
        self.node_name = node_name
        self.max_grace_seconds = max_grace_seconds
        self.mount_timeout = mount_timeout
        self.image_entrypoints: dict[str, list[str]] = {k: list(v) for k, v in (image_entrypoints or {}).items()}
        self.extra_env = dict(extra_env or {})
        self.remove_finalizers_on_delete = remove_finalizers_on_delete
        self.watch_timeout_seconds = watch_timeout_seconds
        self.errors: list[str] = []  # internal errors (a test may assert it stays empty)
        self._lock = threading.RLock()
        self._runs: dict[str, _PodRun] = {}  # by uid
        self._by_name: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid of the latest run
        self._ips: dict[int, str] = {}  # host part -> uid
        self._stopping = threading.Event()
        self._stopped = False
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch_response: Any = None

    # --- lifecycle ---

    def start(self, timeout: float = 10.0) -> FakeNode:
        """Starts the watch thread; returns once the first list is done (pods that exist are taken)."""
        if self._thread is not None:
            raise RuntimeError("FakeNode already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._watch_loop, name=f"fakenode-{self.node_name}", daemon=True)
        self._thread.start()
        if not self._synced.wait(timeout):
            raise TimeoutError(f"fake node {self.node_name}: no pod list within {timeout} s: {self.errors}")
        return self

    def stop(self, grace_seconds: float = 2.0) -> None:
        """SIGTERM every process this node runs, SIGKILL what is left after grace_seconds; stop the threads.
        No status is written from here on. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._interrupt_watch()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            for container in run.all_containers:
                if container.running:
                    self._signal(container, signal.SIGTERM)
            run.wake.set()
        deadline = time.monotonic() + grace_seconds
        for run in runs:
            for container in run.all_containers:
                if container.proc is not None:
                    container.done.wait(max(0.0, deadline - time.monotonic()))
        for run in runs:
            run._kill_all(signal.SIGKILL)
            run.wake.set()
        for run in runs:
            run.thread.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.api.close()

    def __enter__(self) -> FakeNode:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- for tests ---

    def log_path(self, namespace: str, name: str) -> Path:
        return self.work_dir / "logs" / f"{namespace}_{name}.log"

    def logs(self, namespace: str, name: str) -> str:
        """stdout+stderr of the pod's containers so far ("" if it never ran here)."""
        try:
            return self.log_path(namespace, name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pvc_dir(self, namespace: str, claim_name: str) -> Path:
        """The host folder that backs PersistentVolumeClaim claim_name."""
        return self.work_dir / "pvc" / namespace / claim_name

    def pod_dir(self, namespace: str, name: str) -> Path | None:
        run = self._run(namespace, name)
        return run.dir if run is not None else None

    def pid(self, namespace: str, name: str, container: str | None = None) -> int | None:
        """The main process id of a running container (the first running one by default), else None."""
        target = self._running_container(namespace, name, container)
        return self._main_pid(target) if target is not None and target.proc is not None else None

    def kill(
        self,
        namespace: str,
        name: str,
        sig: int = signal.SIGKILL,
        *,
        container: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Sends sig to a container's main process (a crash: SIGKILL gives exit code 137, reason
        Error, or the reason given, e.g. "OOMKilled"). LookupError if nothing of that pod runs here."""
        target = self._running_container(namespace, name, container)
        if target is None or target.proc is None:
            raise LookupError(f"no running container {container or ''} of pod {namespace}/{name} on this node")
        if reason is not None:
            target.reason = reason
        self._signal(target, sig)

    def wait_for_pod(self, namespace: str, name: str, predicate: Callable[[Json], bool], timeout: float = 10.0) -> Json:
        """Polls the API until predicate(pod as a dict) holds; returns that pod (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        pod: Json = {}
        while True:
            try:
                pod = _json_body(self.core.read_namespaced_pod(name, namespace, _preload_content=False))
                if predicate(pod):
                    return pod
            except ApiException as error:
                if error.status != 404:
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"pod {namespace}/{name}: condition not met in {timeout} s; last status "
                    f"{json.dumps(pod.get('status'))}; node errors {self.errors}; logs:\n{self.logs(namespace, name)}"
                )
            time.sleep(0.02)

    def wait_for_phase(self, namespace: str, name: str, *phases: str, timeout: float = 10.0) -> Json:
        """wait_for_pod until status.phase is one of phases (default: Succeeded or Failed)."""
        wanted = phases or TERMINAL_PHASES
        return self.wait_for_pod(namespace, name, lambda pod: (pod.get("status") or {}).get("phase") in wanted, timeout)

    # --- the container runtime: host processes here; ContainerNode (container_node.py) runs images with podman ---

    def _launch(
        self, run: _PodRun, container: _Container, path_map: Mapping[str, str], variables: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Starts the container's main process; its stdout+stderr on a pipe. OSError: it cannot start."""
        spec = container.spec
        ordered = _sorted_map(path_map)
        argv = [*run._entrypoint(spec), *(str(a) for a in spec.get("args") or [])]
        argv = [rewrite_path(expand(word, variables), ordered) for word in argv]
        env = self._base_env(run.name)
        env.update({key: rewrite_path(value, ordered) for key, value in variables.items()})
        env["DPTRAIN_PATH_MAP"] = json.dumps(dict(path_map), sort_keys=True)
        env["DPTRAIN_TERMINATION_MESSAGE_PATH"] = str(container.term_file)
        cwd = run.dir / "rootfs"
        if spec.get("workingDir"):
            mapped = rewrite_path(str(spec["workingDir"]), ordered)
            cwd = Path(mapped) if mapped != spec["workingDir"] else run.dir / "rootfs" / mapped.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            raise OSError(f"{argv[0]!r}: {error}") from error

    def _signal(self, container: _Container, sig: int) -> None:
        """Sends sig to the container's main process."""
        if container.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                container.proc.send_signal(sig)

    def _kill_container(self, container: _Container) -> None:
        """SIGKILLs everything the container runs (its process group)."""
        if container.proc is not None:
            _signal_group(container.proc.pid, signal.SIGKILL)

    def _exited(self, container: _Container, returncode: int) -> None:
        """The main process ended with returncode: set exit_code (and exit_signal, reason when known)."""
        if returncode < 0:
            container.exit_signal = -returncode
            container.exit_code = 128 - returncode
        else:
            container.exit_code = returncode

    def _main_pid(self, container: _Container) -> int | None:
        return container.proc.pid if container.proc is not None else None

    def _container_id(self, run: _PodRun, container: _Container) -> str:
        pid = container.proc.pid if container.proc is not None else 0
        return f"fakenode://{run.uid}/{container.name}/{pid}"

    def _image_id(self, container: _Container) -> str:
        return f"fakenode://{container.spec.get('image', '')}"

    # --- internals: runs, IPs ---

    def _run(self, namespace: str, name: str) -> _PodRun | None:
        with self._lock:
            uid = self._by_name.get((namespace, name))
            return self._runs.get(uid) if uid is not None else None

    def _running_container(self, namespace: str, name: str, container: str | None) -> _Container | None:
        run = self._run(namespace, name)
        if run is None:
            return None
        for candidate in run.all_containers:
            if candidate.running and (container is None or candidate.name == container):
                return candidate
        return None

    def _allocate_ip(self, uid: str) -> str:
        # Parallel test workers (pytest-xdist gwN) each run their own node: give each its own /24
        # (127.0.N+1.x) so two trainers never bind the same address and port.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        first = 2 + 256 * (int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0)
        if self.ip_block is not None:
            first = 2 + 256 * self.ip_block
        with self._lock:
            for host in range(first, 65535):
                if host % 256 in (0, 255) or host in self._ips:
                    continue
                self._ips[host] = uid
                return f"127.0.{host // 256}.{host % 256}"
        raise PodStartError("FailedCreatePodSandBox", "the fake node ran out of loopback addresses")

    def _release(self, run: _PodRun) -> None:
        """The pod object is gone and its processes too: forget it, free its IP."""
        with self._lock:
            if not run.deleted or not run.finished.is_set():
                return
            self._runs.pop(run.uid, None)
            if self._by_name.get((run.namespace, run.name)) == run.uid:
                del self._by_name[(run.namespace, run.name)]
            for host in [h for h, uid in self._ips.items() if uid == run.uid]:
                del self._ips[host]

    def _pod_finished(self, run: _PodRun) -> None:
        self._release(run)

    # --- internals: the watch ---

    def _pods_path_kwargs(self) -> tuple[Callable[..., Any], tuple[str, ...]]:
        if self.namespace:
            return self.core.list_namespaced_pod, (self.namespace,)
        return self.core.list_pod_for_all_namespaces, ()

    def _watch_loop(self) -> None:
        resource_version: str | None = None
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                    self._synced.set()
                resource_version = self._watch_once(resource_version)
                backoff = 0.1
            except Exception as error:
                if self._stopping.is_set():
                    break
                if _status_code(error) == 410:
                    resource_version = None
                    continue
                log.warning("fake node %s: watch failed (%r); retrying", self.node_name, error)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _relist(self) -> str:
        func, args = self._pods_path_kwargs()
        listed = _json_body(func(*args, _preload_content=False, _request_timeout=30))
        items: list[Json] = listed.get("items") or []
        seen = {item["metadata"]["uid"] for item in items}
        with self._lock:
            vanished = [run for uid, run in self._runs.items() if uid not in seen]
        for run in vanished:
            self._on_deleted(run)
        for item in items:
            self._safe_handle("ADDED", item)
        return str(listed["metadata"]["resourceVersion"])

    def _watch_once(self, resource_version: str) -> str | None:
        func, args = self._pods_path_kwargs()
        response = func(
            *args,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=self.watch_timeout_seconds,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout_seconds + 30),
        )
        self._watch_response = response
        try:
            if self._stopping.is_set():
                return resource_version
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
                resource_version = str((obj.get("metadata") or {}).get("resourceVersion") or resource_version)
                if kind != "BOOKMARK":
                    self._safe_handle(str(kind), obj)
                if self._stopping.is_set():
                    break
        finally:
            self._watch_response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return resource_version

    def _interrupt_watch(self) -> None:
        response = self._watch_response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _safe_handle(self, kind: str, pod: Json) -> None:
        try:
            self._handle(kind, pod)
        except Exception as error:
            log.exception("fake node %s: event %s", self.node_name, kind)
            self.errors.append(f"event {kind}: {error!r}")

    def _handle(self, kind: str, pod: Json) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        with self._lock:
            run = self._runs.get(uid)
        if kind == "DELETED":
            if run is not None:
                self._on_deleted(run)
            return
        if run is not None:
            run.pod = _merge_latest(run.pod, pod)
            if meta.get("deletionTimestamp"):
                run.request_termination(deleted=False)
            return
        if not self._should_run(pod):
            return
        if self._stopping.is_set():
            return
        run = _PodRun(self, pod)
        with self._lock:
            if uid in self._runs:
                return
            self._runs[uid] = run
            self._by_name[(run.namespace, run.name)] = uid
        run.thread.start()

    def _should_run(self, pod: Json) -> bool:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in TERMINAL_PHASES:
            return False
        node_name = spec.get("nodeName")
        if node_name and node_name != self.node_name:
            return False
        if not node_name and spec.get("schedulingGates"):
            return False  # not schedulable yet (a queue holds it); the update that removes the gates starts it
        if node_name == self.node_name and status.get("startTime"):
            # started by an earlier incarnation of this node, whose processes are gone
            self._mark_lost(pod)
            return False
        return True

    def _mark_lost(self, pod: Json) -> None:
        meta = pod["metadata"]
        body = {
            "status": {
                "phase": "Failed",
                "reason": "NodeLost",
                "message": f"the fake node {self.node_name} that ran this pod was restarted",
            }
        }
        self._retry(
            lambda: self.core.patch_namespaced_pod_status(
                meta["name"], meta.get("namespace", "default"), body, _content_type=MERGE_PATCH, _preload_content=False
            ),
            on_gone=lambda: None,
        )

    def _on_deleted(self, run: _PodRun) -> None:
        run.request_termination(deleted=True)
        if run.finished.is_set():
            self._release(run)

    # --- internals: API calls ---

    def _retry(self, call: Callable[[], object], on_gone: Callable[[], None], attempts: int = 8) -> None:
        """call(), retried on 409/429/5xx and connection errors; 404 -> on_gone()."""
        delay = 0.05
        for attempt in range(attempts):
            try:
                call()
                return
            except ApiException as error:
                if error.status == 404:
                    on_gone()
                    return
                if error.status not in (409, 429, 500, 502, 503, 504) or attempt == attempts - 1:
                    raise
            except OSError:
                if attempt == attempts - 1:
                    raise
            except Exception as error:  # urllib3 errors
                if "urllib3" not in type(error).__module__ or attempt == attempts - 1:
                    raise
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 1.0)

    def _read(self, kind: str, namespace: str, name: str, optional: bool, wait: float) -> Json | None:
        """A ConfigMap or Secret; waits up to wait seconds for it to appear; None if optional and absent."""
        reader = self.core.read_namespaced_config_map if kind == "ConfigMap" else self.core.read_namespaced_secret
        deadline = time.monotonic() + wait
        while True:
            try:
                return _json_body(reader(name, namespace, _preload_content=False))
            except ApiException as error:
                if error.status != 404:
                    raise
            if optional:
                return None
            if time.monotonic() >= deadline or self._stopping.is_set():
                raise PodStartError("FailedMount", f"{kind} {namespace}/{name} not found")
            time.sleep(0.1)

    @staticmethod
    def _data(kind: str, obj: Json) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if kind == "ConfigMap":
            out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
            out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
            out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
        return out

    # --- internals: env ---

    def _base_env(self, pod_name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in _PASSTHROUGH_ENV or k.startswith(("PYTHON", "LC_"))}
        bin_dir = str(Path(sys.executable).parent)
        path = env.get("PATH", os.defpath)
        if bin_dir not in path.split(os.pathsep):
            path = bin_dir + os.pathsep + path
        env["PATH"] = path
        env["HOSTNAME"] = pod_name
        env.update(self.extra_env)
        return env

    def _container_env(self, run: _PodRun, spec: Json) -> dict[str, str]:
        env: dict[str, str] = {}
        pod = run.pod
        for source in spec.get("envFrom") or []:
            prefix = str(source.get("prefix") or "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                ref = source.get(key)
                if ref is None:
                    continue
                obj = self._env_source(kind, run.namespace, ref)
                if obj is not None:
                    env.update({prefix + k: v.decode("utf-8", "replace") for k, v in self._data(kind, obj).items()})
        for var in spec.get("env") or []:
            name = str(var["name"])
            if "valueFrom" not in var or var.get("value") is not None:
                env[name] = expand(str(var.get("value") or ""), env)
                continue
            source = var["valueFrom"] or {}
            if "fieldRef" in source:
                env[name] = field_ref_value(pod, str(source["fieldRef"].get("fieldPath", "")))
            elif "resourceFieldRef" in source:
                env[name] = resource_field_value(pod, str(spec.get("name", "")), source["resourceFieldRef"])
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "ConfigMap" if "configMapKeyRef" in source else "Secret"
                ref = source.get("configMapKeyRef") or source.get("secretKeyRef") or {}
                obj = self._env_source(kind, run.namespace, ref)
                data = self._data(kind, obj) if obj is not None else {}
                if ref.get("key") in data:
                    env[name] = data[ref["key"]].decode("utf-8", "replace")
                elif not ref.get("optional"):
                    raise PodStartError(
                        "CreateContainerConfigError", f"couldn't find key {ref.get('key')} in {kind} {ref.get('name')}"
                    )
            else:
                raise PodStartError("CreateContainerConfigError", f"unsupported valueFrom for env {name}: {source}")
        return {name: self._resolve_pod_dns(run.namespace, value) for name, value in env.items()}

    def _resolve_pod_dns(self, namespace: str, value: str) -> str:
        """``value`` unless it is the DNS name of a pod in a headless Service: then that pod's IP (see the module
        docstring), waited for while the pod exists without one."""
        found = _POD_DNS_NAME.match(value)
        if found is None:
            return value
        namespace = found["namespace"] or namespace
        deadline = time.monotonic() + self.mount_timeout
        while True:
            listed = _json_body(self.core.list_namespaced_pod(namespace, _preload_content=False, _request_timeout=30))
            named = [
                pod
                for pod in listed.get("items") or []
                if (pod.get("spec") or {}).get("hostname") == found["hostname"]
                and (pod.get("spec") or {}).get("subdomain") == found["subdomain"]
                and (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES
                and not pod["metadata"].get("deletionTimestamp")
            ]
            if not named:
                return value  # no such record: the name stays (and fails to resolve, as it would in a cluster)
            address = next((pod["status"].get("podIP") for pod in named if pod.get("status", {}).get("podIP")), None)
            if address:
                return str(address)
            if time.monotonic() >= deadline or self._stopping.is_set():
                return value
            time.sleep(0.1)

    def _env_source(self, kind: str, namespace: str, ref: Json) -> Json | None:
        try:
            return self._read(kind, namespace, str(ref.get("name", "")), bool(ref.get("optional")), 0.0)
        except PodStartError as failure:
            raise PodStartError("CreateContainerConfigError", failure.message) from None

    # --- internals: volumes ---

    def _mounts(self, run: _PodRun, spec: Json) -> dict[str, str]:
        """{mountPath: host path} of a container, creating/populating the volumes."""
        volumes = {v.get("name"): v for v in (run.pod.get("spec") or {}).get("volumes") or []}
        path_map: dict[str, str] = {}
        for mount in spec.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is None:
                raise PodStartError("FailedMount", f"volumeMount {mount.get('name')!r} names no volume of the pod")
            host = self._volume_dir(run, volume)
            sub_path = str(mount.get("subPath") or "")
            if sub_path:
                host = host / sub_path
                if not host.exists():
                    host.mkdir(parents=True, exist_ok=True)
            path_map[str(mount["mountPath"])] = str(host)
        return path_map

    def _volume_dir(self, run: _PodRun, volume: Json) -> Path:
        name = str(volume.get("name"))
        per_pod = run.dir / "volumes" / name
        if "persistentVolumeClaim" in volume:
            path = self.pvc_dir(run.namespace, str(volume["persistentVolumeClaim"].get("claimName")))
        elif "hostPath" in volume:
            path = self.work_dir / "hostpath" / str(volume["hostPath"].get("path", "")).lstrip("/")
        elif "emptyDir" in volume:
            path = per_pod
        elif per_pod.exists():
            return per_pod  # populated for an earlier container of this pod
        elif "configMap" in volume or "secret" in volume:
            self._project(run, per_pod, [volume], mode=None)
            return per_pod
        elif "downwardAPI" in volume or "projected" in volume:
            sources = volume["projected"].get("sources", []) if "projected" in volume else [volume]
            mode = volume["projected"].get("defaultMode") if "projected" in volume else None
            self._project(run, per_pod, sources, mode)
            return per_pod
        else:
            log.warning("fake node: volume %s of %s/%s: unsupported type, empty dir", name, run.namespace, run.name)
            path = per_pod
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _project(self, run: _PodRun, target: Path, sources: Iterable[Json], mode: int | None) -> None:
        staging = target.with_name(target.name + ".tmp")
        staging.mkdir(parents=True, exist_ok=True)
        for source in sources:
            if "configMap" in source or "secret" in source:
                kind = "ConfigMap" if "configMap" in source else "Secret"
                ref = source.get("configMap") or source.get("secret") or {}
                obj_name = str(ref.get("name") or ref.get("secretName") or "")
                obj = self._read(kind, run.namespace, obj_name, bool(ref.get("optional")), self.mount_timeout)
                data = self._data(kind, obj) if obj is not None else {}
                items = ref.get("items")
                default_mode = ref.get("defaultMode", mode)
                if items:
                    for item in items:
                        if item.get("key") not in data:
                            if ref.get("optional"):
                                continue
                            raise PodStartError("FailedMount", f"{kind} {obj_name} has no key {item.get('key')!r}")
                        self._write_file(staging / item["path"], data[item["key"]], item.get("mode", default_mode))
                else:
                    for key, content in data.items():
                        self._write_file(staging / key, content, default_mode)
            elif "downwardAPI" in source:
                for item in (source["downwardAPI"] or {}).get("items") or []:
                    if "fieldRef" in item:
                        text = field_ref_value(run.pod, str(item["fieldRef"].get("fieldPath", "")))
                    else:
                        ref = item.get("resourceFieldRef") or {}
                        text = resource_field_value(run.pod, str(ref.get("containerName", "")), ref)
                    self._write_file(staging / item["path"], text.encode(), item.get("mode", mode))
            elif "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                self._write_file(staging / str(token.get("path", "token")), b"fake-token", mode)
        staging.rename(target)

    @staticmethod
    def _write_file(path: Path, data: bytes, mode: int | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(int(mode) if mode is not None else 0o644)


def _merge_latest(old: Json, new: Json) -> Json:
    """The newer of two versions of a pod (a watch event may be older than the node's own patch
    response), keeping the node's own view of what it wrote (nodeName, podIP...)."""
    try:
        if int(new["metadata"]["resourceVersion"]) < int(old["metadata"]["resourceVersion"]):
            return old
    except (KeyError, TypeError, ValueError):
        pass
    merged = dict(new)
    if not (new.get("spec") or {}).get("nodeName") and (old.get("spec") or {}).get("nodeName"):
        merged["spec"] = {**(new.get("spec") or {}), "nodeName": old["spec"]["nodeName"]}
    status = dict(new.get("status") or {})
    for key in ("podIP", "podIPs", "hostIP", "hostIPs"):
        if key not in status and key in (old.get("status") or {}):
            status[key] = old["status"][key]
    merged["status"] = status
    return merged


def _lines(response: Any) -> Iterator[str]:
    buffer = bytearray()
    for chunk in response.stream(amt=None, decode_content=False):
        buffer.extend(chunk)
        while (newline := buffer.find(b"\n")) != -1:
            line = bytes(buffer[:newline]).decode("utf-8", errors="replace")
            del buffer[: newline + 1]
            if line.strip():
                yield line
