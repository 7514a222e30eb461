"""ContainerNode: the fake kubelet of node.py, running each pod container in its image with podman.

``FakeNode`` runs containers as host processes (fast; paths rewritten to host folders). ``ContainerNode`` is the
same kubelet (binding, 127.0.0.x pod IPs, volumes as the same host folders, env with fieldRef/resourceFieldRef,
status, deletion, ``kill()``), but a container is ``podman create`` + ``podman start --attach`` of its image, so the
image, its layout and the pod's security settings are what runs::

    node = ContainerNode(cluster.api, namespace, work_dir=tmp_path)   # then as FakeNode

How a pod container maps to podman (``podman_create_args``, a pure function):

* image: ``spec.image`` (or ``image_aliases[image]``) from local storage only (``--pull=never``); missing ->
  the pod fails with ErrImagePull. ``command`` -> ``--entrypoint`` (the image's CMD is then dropped, as in
  Kubernetes), ``args`` -> the arguments; ``$(VAR)`` expanded as process mode does; ``workingDir`` -> ``--workdir``.
* env: exactly the container's ``env``/``envFrom`` (resolved as in process mode) on top of the image's ENV; no
  host variables, no path rewriting (the container sees the container paths). ``--hostname`` is the pod name.
* volumes: each ``volumeMount`` is a bind mount of the host folder process mode uses (``pvc_dir()`` for claims, a
  per-pod folder for emptyDir/configMap/secret/downwardAPI), read-only where the mount or the claim says so;
  configMap/secret/downwardAPI/projected always read-only. ``emptyDir.medium: Memory`` is a tmpfs (its
  sizeLimit). The ``terminationMessagePath`` is a per-container host file (mode 0666, as the kubelet makes it)
  bind-mounted at that path.
* pod ``fsGroup``: the kubelet's volume ownership for emptyDir and claims -- group fsGroup, setgid folders, group
  read/write (read-only mounts: read) -- and ``--group-add`` fsGroup + ``supplementalGroups``. An emptyDir
  folder is 0777 as the kubelet makes it.
* securityContext (container over pod): ``runAsUser``/``runAsGroup`` -> ``--user``; ``runAsNonRoot`` refuses a
  root (or non-numeric) user with CreateContainerConfigError, as the kubelet does;
  ``readOnlyRootFilesystem`` -> ``--read-only --read-only-tmpfs=false`` (nothing writable but the volumes);
  ``capabilities`` -> ``--cap-drop``/``--cap-add``; ``allowPrivilegeEscalation: false`` ->
  ``--security-opt no-new-privileges``; ``privileged``; ``seccompProfile: Unconfined``.
* resources: ``limits.memory`` -> ``--memory`` = ``--memory-swap`` (no swap, as on a kubelet), so a too-small limit
  ends in a real kernel OOM kill; ``limits.cpu`` -> ``--cpus`` (a CFS quota the trainer reads); ``requests.cpu``
  -> ``--cpu-shares`` (the kubelet's formula). Extended resources (``nvidia.com/gpu``) are ignored.
* network: ``--network host``; the pod keeps its 127.0.0.x IP (fieldRef status.podIP), and whatever the container
  binds on it is reachable from the host (the operator's scrape, Prometheus).

Exit: ``state.terminated.exitCode`` is podman's exit code of the container; ``reason`` OOMKilled when the kernel
killed it for memory, StartError (exit code 128, podman's error as the message) when its command could not start,
else Completed/Error. podman 4.3's conmon writes its OOM marker into its working directory while podman reads it
from the container's bundle, so ``podman start`` runs with the bundle as its working directory (then
``podman inspect`` reports OOMKilled right; newer podman writes it there anyway). Signals (deletion, ``kill()``,
``stop()``) go through ``podman kill``; every container is removed once it ended, and ``stop()`` removes any left.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient

from tests.support import podman as podman_support
from tests.support.node import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    FakeNode,
    PodStartError,
    _Container,
    _PodRun,
    expand,
    parse_quantity,
)

log = logging.getLogger("tests.support.container_node")

Json = dict[str, Any]
NODE_LABEL = "io.dptrain.fakenode"
_START_ERROR_EXIT = 128  # what the kubelet reports for a container whose command could not start


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    read_only: bool = False
    tmpfs_bytes: int | None = None  # an emptyDir of medium Memory: a tmpfs of this size (None: a bind mount)

    def option(self) -> list[str]:
        if self.tmpfs_bytes is not None:
            return ["--tmpfs", f"{self.container_path}:rw,size={self.tmpfs_bytes},mode=1777"]
        return ["--volume", f"{self.host_path}:{self.container_path}:{'ro' if self.read_only else 'rw'}"]


_ALWAYS_READ_ONLY = ("configMap", "secret", "downwardAPI", "projected")
_OWNED_VOLUMES = ("emptyDir", "persistentVolumeClaim")  # the volumes whose ownership the kubelet sets to fsGroup


def volume_mounts(pod: Json, spec: Json, path_map: Mapping[str, str]) -> list[Mount]:
    """The container's mounts: every volumeMount as a bind of the host folder path_map gives for it."""
    volumes = {v.get("name"): v for v in (pod.get("spec") or {}).get("volumes") or []}
    mounts: list[Mount] = []
    for mount in spec.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name")) or {}
        path = str(mount["mountPath"])
        claim = volume.get("persistentVolumeClaim") or {}
        read_only = bool(mount.get("readOnly") or claim.get("readOnly")) or any(k in volume for k in _ALWAYS_READ_ONLY)
        empty_dir = volume.get("emptyDir")
        if isinstance(empty_dir, dict) and empty_dir.get("medium") == "Memory":
            size = math.ceil(parse_quantity(empty_dir.get("sizeLimit") or "64Mi"))
            mounts.append(Mount(path, path_map[path], read_only, tmpfs_bytes=size))
        else:
            mounts.append(Mount(path, path_map[path], read_only))
    return mounts


def security_context(pod: Json, spec: Json) -> Json:
    """The container's effective security context: the pod's fields, overridden by the container's."""
    pod_context = dict((pod.get("spec") or {}).get("securityContext") or {})
    inherited = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
    merged = {key: pod_context[key] for key in inherited if key in pod_context}
    merged.update(spec.get("securityContext") or {})
    return merged


def run_as(context: Json, image_user: str) -> str | None:
    """The --user value (None: the image's own USER). PodStartError when runAsNonRoot cannot hold."""
    uid = context.get("runAsUser")
    gid = context.get("runAsGroup")
    user = str(uid) if uid is not None else image_user.split(":", maxsplit=1)[0]
    if context.get("runAsNonRoot"):
        if not user or user in ("0", "root"):
            raise PodStartError("CreateContainerConfigError", "container has runAsNonRoot and image will run as root")
        if not user.isdigit():
            raise PodStartError(
                "CreateContainerConfigError",
                f"container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root",
            )
    if uid is None and gid is None:
        return None
    if gid is None:
        return user
    return f"{user or 0}:{gid}"


def resource_options(spec: Json) -> list[str]:
    resources = spec.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    options: list[str] = []
    if "memory" in limits:
        memory = math.ceil(parse_quantity(limits["memory"]))
        options += [f"--memory={memory}b", f"--memory-swap={memory}b"]
    if "cpu" in limits:
        options.append(f"--cpus={float(parse_quantity(limits['cpu'])):g}")
    cpu_request = requests.get("cpu", limits.get("cpu"))
    if cpu_request is not None:
        # the kubelet's cpu.shares: milli-CPU * 1024 / 1000, at least 2
        options.append(f"--cpu-shares={max(2, math.ceil(parse_quantity(cpu_request) * 1024))}")
    return options


def security_options(pod: Json, context: Json, user: str | None) -> list[str]:
    options: list[str] = []
    if user is not None:
        options.append(f"--user={user}")
    pod_context = (pod.get("spec") or {}).get("securityContext") or {}
    groups = [pod_context["fsGroup"]] if pod_context.get("fsGroup") is not None else []
    groups += [g for g in pod_context.get("supplementalGroups") or [] if g not in groups]
    options += [f"--group-add={group}" for group in groups]
    if context.get("readOnlyRootFilesystem"):
        # Only the volumes are writable: podman's --read-only alone would add tmpfs on /run, /tmp and /var/tmp.
        options += ["--read-only", "--read-only-tmpfs=false"]
    if context.get("privileged"):
        options.append("--privileged")
    capabilities = context.get("capabilities") or {}
    options += [f"--cap-drop={cap}" for cap in capabilities.get("drop") or []]
    options += [f"--cap-add={cap}" for cap in capabilities.get("add") or []]
    if context.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        options += ["--security-opt", "seccomp=unconfined"]
    return options


def podman_create_args(
    pod: Json,
    spec: Json,
    *,
    name: str,
    image: str,
    image_user: str,
    mounts: Sequence[Mount],
    env: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """The `podman create` arguments of one pod container (see the module docstring)."""
    meta = pod.get("metadata") or {}
    context = security_context(pod, spec)
    args = ["create", "--name", name, "--pull=never", "--network=host", f"--hostname={meta.get('name', name)}"]
    args += [f"--label={key}={value}" for key, value in (labels or {}).items()]
    args += security_options(pod, context, run_as(context, image_user))
    args += resource_options(spec)
    for mount in mounts:
        args += mount.option()
    args += [f"--env={key}={value}" for key, value in env.items()]
    if spec.get("workingDir"):
        args.append(f"--workdir={expand(str(spec['workingDir']), env)}")
    command = [expand(str(word), env) for word in spec.get("command") or []]
    if command:
        args.append("--entrypoint=" + json.dumps(command))
    args.append(image)
    args += [expand(str(word), env) for word in spec.get("args") or []]
    return args


def set_volume_ownership(path: Path, gid: int, *, read_only: bool) -> None:
    """The kubelet's fsGroup ownership of a volume: group gid, group rw (r when read-only), setgid folders."""
    targets = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for target in targets:
        if target.is_symlink():
            continue
        os.chown(target, -1, gid)
        mode = target.stat().st_mode
        if target.is_dir():
            mode |= 0o2050 if read_only else 0o2070
        else:
            mode |= 0o040 if read_only else 0o060
        target.chmod(mode & 0o7777)


class ContainerNode(FakeNode):
    """A FakeNode whose containers run in their images through podman (see the module docstring)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str | None = None,
        work_dir: Path | None = None,
        node_name: str = "testnode",
        *,
        image_aliases: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(api_client, namespace, work_dir, node_name, **kwargs)
        self.image_aliases = dict(image_aliases or {})
        self._tag = f"{node_name}-{os.getpid()}-{id(self) % 100000}"
        self._created: set[str] = set()  # podman names of containers not removed yet
        self._created_lock = threading.Lock()
        self.root_changes: dict[str, list[str]] = {}  # `podman diff` of every ended container, by pod/container

    # --- the runtime hooks of FakeNode ---

    def _launch(
        self, run: _PodRun, container: _Container, path_map: Mapping[str, str], variables: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        spec = container.spec
        requested = str(spec.get("image", ""))
        image = self.image_aliases.get(requested, requested)
        inspected = podman_support.podman("image", "inspect", image, check=False)
        if inspected.returncode != 0:
            raise PodStartError("ErrImagePull", f"image {requested!r} is not in the node's local storage: make images")
        config = json.loads(inspected.stdout)[0]
        container.image_id = "sha256:" + str(config.get("Id", ""))
        image_user = str((config.get("Config") or {}).get("User") or "")
        mounts = volume_mounts(run.pod, spec, path_map)
        term_path = str(spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
        mounts.append(Mount(term_path, str(container.term_file)))
        self._prepare_volumes(run, mounts)
        container.term_file.chmod(0o666)
        env = {**self.extra_env, **variables}
        name = f"{self._tag}-{run.uid[:8]}-{container.name}"[:120]
        args = podman_create_args(
            run.pod,
            spec,
            name=name,
            image=image,
            image_user=image_user,
            mounts=mounts,
            env=env,
            labels={NODE_LABEL: self._tag, "io.kubernetes.pod.name": run.name},
        )
        podman_support.podman("rm", "--force", name, check=False)  # a leftover of an earlier run of this pod
        created = podman_support.podman(*args, check=False)
        if created.returncode != 0:
            raise PodStartError("CreateContainerError", created.stderr.strip()[-1000:])
        with self._created_lock:
            self._created.add(name)
        container.runtime_id = name
        bundle = podman_support.podman("inspect", "--format", "{{.StaticDir}}", name).stdout.strip()
        # podman 4.3: conmon writes its OOM marker into its working directory; podman reads it from the bundle.
        return subprocess.Popen(
            ["podman", "start", "--attach", name],
            cwd=bundle,
            env=podman_support.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _prepare_volumes(self, run: _PodRun, mounts: Sequence[Mount]) -> None:
        pod_spec = run.pod.get("spec") or {}
        volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
        by_path = {m.get("mountPath"): volumes.get(m.get("name")) or {} for m in self._all_mounts(pod_spec)}
        fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
        for mount in mounts:
            volume = by_path.get(mount.container_path) or {}
            if mount.tmpfs_bytes is not None or not any(kind in volume for kind in _OWNED_VOLUMES):
                continue
            host = Path(mount.host_path)
            if "emptyDir" in volume and host.is_dir():
                host.chmod(0o777)  # the kubelet makes emptyDir folders world-writable
            if fs_group is not None:
                set_volume_ownership(host, int(fs_group), read_only=mount.read_only)

    @staticmethod
    def _all_mounts(pod_spec: Json) -> list[Json]:
        containers = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]
        return [mount for container in containers for mount in container.get("volumeMounts") or []]

    def _signal(self, container: _Container, sig: int) -> None:
        name = container.runtime_id
        if name is None:
            return
        deadline = time.monotonic() + 10
        while not container.done.is_set():
            result = podman_support.podman("kill", f"--signal={signal.Signals(sig).name}", name, check=False)
            if result.returncode == 0:
                return
            # Not running (yet: created, starting; or just ended): try again until it runs or has ended.
            if time.monotonic() >= deadline:
                log.warning("container node: podman kill %s %s failed: %s", sig, name, result.stderr.strip())
                return
            container.done.wait(0.1)

    def _kill_container(self, container: _Container) -> None:
        self._signal(container, signal.SIGKILL)

    def _exited(self, container: _Container, returncode: int) -> None:
        name = container.runtime_id
        container.exit_code = returncode
        if name is None:
            return
        inspected = podman_support.podman("inspect", "--format", "{{json .State}}", name, check=False)
        if inspected.returncode == 0:
            state = json.loads(inspected.stdout)
            if state.get("Status") == "created" or state.get("Error"):
                # It never ran: its command could not start (not found, not executable). The kubelet's StartError,
                # with the runtime's error (podman printed it on the attached output) as the message.
                with container.tail_lock:
                    said = bytes(container.tail).decode("utf-8", "replace").strip().splitlines()
                container.exit_code, container.reason = _START_ERROR_EXIT, "StartError"
                container.term_file.write_text((str(state.get("Error") or "") or (said[-1] if said else ""))[:4096])
            else:
                container.exit_code = int(state.get("ExitCode", returncode))
                if state.get("OOMKilled"):
                    container.reason = "OOMKilled"
        diff = podman_support.podman("diff", "--format", "json", name, check=False)
        if diff.returncode == 0 and diff.stdout.strip():
            changes = json.loads(diff.stdout)
            self.root_changes[name] = sorted({path for paths in changes.values() for path in paths or []})
        self._remove(name)

    def _remove(self, name: str) -> None:
        podman_support.podman("rm", "--force", "--time=0", name, check=False)
        with self._created_lock:
            self._created.discard(name)

    def _main_pid(self, container: _Container) -> int | None:
        if container.runtime_id is None:
            return None
        result = podman_support.podman("inspect", "--format", "{{.State.Pid}}", container.runtime_id, check=False)
        pid = result.stdout.strip()
        return int(pid) if result.returncode == 0 and pid.isdigit() and int(pid) > 0 else None

    def _container_id(self, run: _PodRun, container: _Container) -> str:
        return f"podman://{container.runtime_id or ''}"

    def _image_id(self, container: _Container) -> str:
        return container.image_id or ""

    # --- lifecycle ---

    def stop(self, grace_seconds: float = 2.0) -> None:
        """As FakeNode.stop, then removes every container this node created that is still there."""
        super().stop(grace_seconds)
        with self._created_lock:
            left = sorted(self._created)
        for name in left:
            self._remove(name)

    def container_names(self) -> list[str]:
        """podman's names of this node's containers that exist now."""
        label = f"label={NODE_LABEL}={self._tag}"
        result = podman_support.podman("ps", "--all", "--filter", label, "--format", "{{.Names}}")
        return result.stdout.split()
