"""The real operator (`dptrain-operator`), run as a subprocess against the test API server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

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

    def start(self, timeout: float = 30.0) -> OperatorProcess:
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "DPTRAIN_NAMESPACES": self.namespace,
            "DPTRAIN_SCRAPE_INTERVAL": str(self.scrape_interval),
            "DPTRAIN_METRICS_PORT": str(self.metrics_port),
            "DPTRAIN_LIVENESS_PORT": str(self.liveness_port),
            **self.extra_env,
        }
        script = Path(sys.executable).parent / "dptrain-operator"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
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
