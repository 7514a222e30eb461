"""Flower's own processes and CLI, driven as Flower documents them (flwr 1.42): ``flower-superlink``,
``flower-supernode`` and the ``flwr`` CLI (``flwr run``, ``flwr ls``, ``flwr stop``, ``flwr supernode register``).

Every process gets its own ``FLWR_HOME`` (apps, CLI config), telemetry and update checks off, and runtime
dependency installation off (the code is pre-installed in the image). Each runs in its own session so stopping it
stops its SuperExec and app processes too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from dptrain.errors import ConfigurationError

__all__ = [
    "CONNECTION",
    "FlowerCli",
    "FlowerProcess",
    "TlsClient",
    "TlsServer",
    "flower_env",
    "flower_executable",
    "wait_until_serving",
]

logger = logging.getLogger(__name__)

CONNECTION: Final = "dptrain"
"""The SuperLink connection name in the CLI's config.toml."""
FINISHED_STATES: Final = ("finished:completed", "finished:failed", "finished:stopped")
_PR_SET_PDEATHSIG: Final = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when its parent dies (a killed supervisor leaves no SuperLink behind
    holding the port; in a pod the container's end does the same for everything)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def flower_executable(name: str) -> str:
    """A Flower console script: next to this Python (the image's or the virtualenv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigurationError(f"{name} is not installed: install dptrain with the federated extra (flwr)")
    return found


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: its own FLWR_HOME, no telemetry, no update check, no runtime installs."""
    home.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **os.environ,
        "PATH": path,  # Flower starts its SuperExec and app processes by name
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


@dataclass(frozen=True)
class TlsServer:
    """The SuperLink's certificate (it must name the address the sites dial, and 127.0.0.1)."""

    ca_certificate: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class TlsClient:
    """How a SuperNode (or the CLI) verifies the SuperLink, and the SuperNode's authentication key."""

    ca_certificate: Path
    auth_key: Path | None = None


class FlowerProcess:
    """One long-lived Flower process (SuperLink or SuperNode) with its log file; stopping it stops its children."""

    def __init__(self, name: str, command: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("ab")
        self._log_start = self._log.tell()  # the log is appended to across restarts: where this process's begins
        logger.info("starting %s: %s", name, " ".join(self.command))
        self.process = subprocess.Popen(  # a fixed Flower executable and our own arguments
            self.command,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopping it stops its SuperExec and app processes too
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one async-signal-safe prctl call
        )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group (graceful shutdown), SIGKILL what is left after ``grace`` seconds."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._log.close()

    def log_of_this_start(self) -> str:
        """Everything this process (and its children) logged, not what earlier starts did."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def wait_until_serving(address: str, *, tls: TlsClient | None, process: FlowerProcess, timeout: float = 120.0) -> None:
    """Poll the SuperLink's HTTP(S) API until it answers (its FastAPI /docs page)."""
    scheme = "https" if tls is not None else "http"
    context = ssl.create_default_context(cafile=str(tls.ca_certificate)) if tls is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running:
            raise RuntimeError(f"{process.name} exited with {process.returncode}:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/docs", timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError, ssl.SSLError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{process.name} did not serve on {address} within {timeout:.0f}s:\n{process.log_tail()}")


class FlowerCli:
    """The ``flwr`` CLI against one SuperLink (its Control API), with its own FLWR_HOME and config.toml."""

    def __init__(self, home: Path, *, address: str, tls: TlsClient | None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{tls.ca_certificate}"' if tls is not None else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
        )
        self.env = flower_env(home)

    def _call(self, *args: str, timeout: float = 120.0) -> Any:
        command = [flower_executable("flwr"), *args, "--format", "json"]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        try:
            return json.loads(result.stdout) if result.stdout.strip() else {}
        except ValueError:
            output = f"{result.stdout[-1500:]} {result.stderr[-1500:]}"
            raise RuntimeError(f"flwr {' '.join(args)} failed (exit {result.returncode}): {output}") from None

    def run(self, app: Path, run_config: Mapping[str, str]) -> str:
        """``flwr run APP dptrain --run-config ...``: the run id."""
        config = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
        answer = self._call("run", str(app), CONNECTION, "--run-config", config, timeout=300)
        if not answer.get("success") or "run-id" not in answer:
            raise RuntimeError(f"flwr run was refused: {answer}")
        return str(answer["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        answer = self._call("ls", CONNECTION)
        return list(answer.get("runs") or [])

    def run_status(self, run_id: str) -> tuple[str, str]:
        """(status, status-details) of one run: pending, starting, running, finished:completed|failed|stopped."""
        answer = self._call("ls", CONNECTION, "--run-id", run_id)
        runs = answer.get("runs") or []
        if not runs:
            return "unknown", str(answer)
        return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))

    def stop(self, run_id: str) -> None:
        self._call("stop", run_id, CONNECTION)

    def stop_unfinished(self) -> list[str]:
        """Stop every run not finished (after a SuperLink restart, a dead run would still hold the SuperNodes)."""
        stopped = []
        for run in self.runs():
            if str(run.get("status", "")) not in FINISHED_STATES:
                self.stop(str(run["run-id"]))
                stopped.append(str(run["run-id"]))
        return stopped

    def registered_nodes(self) -> dict[str, str]:
        """name → node id of the SuperNodes registered (SuperNode authentication)."""
        answer = self._call("supernode", "ls", CONNECTION)
        return {
            str(node.get("name")): str(node.get("node-id")) for node in answer.get("nodes") or [] if node.get("name")
        }

    def register(self, name: str, public_key: str) -> None:
        """Register a site's SuperNode public key under its site name (idempotent across restarts)."""
        if name in self.registered_nodes():
            return
        path = self.home / f"{name}.pub"
        path.write_text(public_key.strip() + "\n")
        answer = self._call("supernode", "register", str(path), CONNECTION, "--name", name)
        if not answer.get("success") and "already in use" in str(answer.get("error-message", "")):
            # registered by an earlier coordinator on the same database (`flwr supernode ls` lists only some nodes)
            logger.info("the SuperNode key of site %s is already registered", name)
            return
        if not answer.get("success"):
            raise ConfigurationError(f"cannot register the SuperNode key of site {name}: {answer}")
