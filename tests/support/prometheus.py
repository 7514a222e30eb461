"""A real Prometheus server for tests (the Debian package `prometheus` provides the binary).

    with PrometheusServer(scrape_configs, rule_files=[rules], work_dir=tmp_path) as prometheus:
        prometheus.wait_for_series('dptrain_jobs{phase="Succeeded"} > 0', timeout=30)
        prometheus.query("up")                       # instant query -> list of {"metric": ..., "value": ...}
        prometheus.query_range(expr, start, end)     # range query -> list of {"metric": ..., "values": [...]}

It listens on 127.0.0.1 on a free port, scrapes and evaluates rules every second (unless told otherwise), keeps
its TSDB in work_dir and is stopped (SIGTERM, then SIGKILL) on exit. Note that Prometheus hands new targets to the
scrape loop at most every 5 s, so the first scrape of a target lands 1-10 s after start.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

DEFAULT_INTERVAL = "1s"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error (bad PromQL, ...) or did not start."""


class PrometheusServer:
    def __init__(
        self,
        scrape_configs: Sequence[dict[str, Any]],
        *,
        work_dir: Path,
        rule_files: Sequence[Path] = (),
        interval: str = DEFAULT_INTERVAL,
        binary: str | None = None,
    ) -> None:
        found = binary or prometheus_binary()
        if found is None:
            raise FileNotFoundError("prometheus not found: install the Debian package `prometheus`")
        self.binary = found
        self.work_dir = Path(work_dir)
        self.scrape_configs = list(scrape_configs)
        self.rule_files = [Path(path) for path in rule_files]
        self.interval = interval
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(timeout=10)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": self.scrape_configs,
        }

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        failures: list[str] = []
        for _ in range(3):  # the port can be taken between choosing and binding it
            self.port = _free_port()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={self.work_dir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--web.enable-lifecycle",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready(timeout):
                return self
            failures.append(self.logs()[-2000:])
            self.stop()
        raise PrometheusError("prometheus did not become ready:\n" + "\n---\n".join(failures))

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self._http.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._http.close()

    def __enter__(self) -> PrometheusServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- HTTP API ----------------------------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = self._http.get(f"{self.url}/api/v1/{path}", params=params)
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(f"{path}: HTTP {response.status_code}: {response.text[:500]}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the vector's samples ({"metric": {...}, "value": [t, "v"]}); a scalar/string as one item."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._api("query", params)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Range query (what a Grafana time-series panel runs): [{"metric": {...}, "values": [[t, "v"], ...]}]."""
        data = self._api("query_range", {"query": expr, "start": start, "end": end, "step": step})
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of `label` on the series `match` selects (what Grafana's label_values(match, label) lists)."""
        return list(self._api(f"label/{label}/values", {"match[]": match}))

    def wait_for_series(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Polls the instant query until it returns at least one series; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no series for {expr!r} after {timeout}s; targets: {self.targets_summary()}\n{self.logs()[-2000:]}"
                )
            time.sleep(0.25)

    def targets(self) -> list[dict[str, Any]]:
        data = self._api("targets", {"state": "active"})
        return list(data["activeTargets"])

    def targets_summary(self) -> list[tuple[str, str, str]]:
        return [(t["labels"].get("job", ""), t["scrapeUrl"], t["health"]) for t in self.targets()]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (alerting and recording) with its health, lastError and, for alerts, state."""
        data = self._api("rules")
        return [rule for group in data["groups"] for rule in group["rules"]]
