"""The real operator (`dptrain-operator`) against the test API server: a subprocess (OperatorProcess), or its
image run with podman (OperatorContainer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """Starts the operator watching `namespace`; `kill()` simulates a crash, `start()` again restarts it."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_dir: Path,
        *,
        scrape_interval: float = 1.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """extra_env (e.g. the env of the Helm chart's Deployment) is applied last, over the settings above; its
        DPTRAIN_METRICS_PORT / DPTRAIN_LIVENESS_PORT, when set, are the ports metrics() and start() use."""
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_dir = log_dir
        self.scrape_interval = scrape_interval
        self.extra_env = dict(extra_env or {})
        self.metrics_port = int(self.extra_env.get("DPTRAIN_METRICS_PORT") or _free_port())
        self.liveness_port = int(self.extra_env.get("DPTRAIN_LIVENESS_PORT") or _free_port())
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.namespace}-{self.starts}.log"

    def settings_env(self) -> dict[str, str]:
        """The operator's own environment: its kubeconfig and settings."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "DPTRAIN_NAMESPACES": self.namespace,
            "DPTRAIN_SCRAPE_INTERVAL": str(self.scrape_interval),
            "DPTRAIN_METRICS_PORT": str(self.metrics_port),
            "DPTRAIN_LIVENESS_PORT": str(self.liveness_port),
            **self.extra_env,
        }

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        script = Path(sys.executable).parent / "dptrain-operator"
        env = {**os.environ, **self.settings_env()}
        return subprocess.Popen([str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 30.0) -> OperatorProcess:
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = self._launch(log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not live after {timeout}s:\n{self.logs()[-3000:]}")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "\n".join(
            (self.log_dir / f"operator-{self.namespace}-{n}.log").read_text(errors="replace")
            for n in range(1, self.starts + 1)
            if (self.log_dir / f"operator-{self.namespace}-{n}.log").exists()
        )


class OperatorContainer(OperatorProcess):
    """The operator run from its image with podman, as the Helm chart's Deployment runs it: UID 65532, read-only
    root filesystem with a small writable /tmp, no capabilities, no privilege escalation, the chart's default
    memory and CPU limits; host networking (it reaches the API server on 127.0.0.1 and the trainer pods on their
    127.0.0.x IPs, and serves metrics/healthz on the host's ports). Its kubeconfig (certificates inlined) is
    mounted read-only. kill() is `podman kill` (SIGKILL, a crash), stop() `podman stop` (SIGTERM)."""

    KUBECONFIG_IN_CONTAINER = "/etc/dptrain/kubeconfig"

    def __init__(self, kubeconfig: Path, namespace: str, log_dir: Path, *, image: str, **kwargs: Any) -> None:
        super().__init__(kubeconfig, namespace, log_dir, **kwargs)
        self.image = image
        self.name = ""

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        from tests.support import podman

        flat = self.log_dir / "kubeconfig"
        view = subprocess.run(
            ["kubectl", "config", "view", "--flatten", "--minify", "--kubeconfig", str(self.kubeconfig)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        flat.write_text(view.stdout)
        flat.chmod(0o644)  # readable by UID 65532 in the container (a test credential)
        self.name = f"dptrain-operator-{self.namespace}-{self.starts}"[:120]
        podman.podman("rm", "--force", self.name, check=False)
        env = {**self.settings_env(), "KUBECONFIG": self.KUBECONFIG_IN_CONTAINER, "HOME": "/tmp"}
        command = [
            "podman", "run", "--rm", "--name", self.name, "--pull=never", "--network=host",
            "--user=65532:65532", "--read-only", "--read-only-tmpfs=false", "--tmpfs=/tmp:rw,size=64m,mode=1777",
            "--cap-drop=ALL", "--security-opt", "no-new-privileges", "--memory=1g", "--memory-swap=1g", "--cpus=1",
            f"--volume={flat}:{self.KUBECONFIG_IN_CONTAINER}:ro",
            *(f"--env={key}={value}" for key, value in env.items()),
            self.image, "dptrain-operator",
        ]  # fmt: skip
        return subprocess.Popen(command, env=podman.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            from tests.support import podman

            podman.podman("kill", "--signal=KILL", self.name, check=False)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            from tests.support import podman

            podman.podman("stop", "--time=10", self.name, check=False, timeout=60)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.name:
            from tests.support import podman

            podman.podman("rm", "--force", self.name, check=False)
