"""podman for the container tests and the image facts: where the images are, whether podman can run them here.

The images are the ones ``make images`` builds: ``$DPTRAIN_TEST_IMAGE_REPOSITORY/{trainer,operator}:``
``$DPTRAIN_TEST_IMAGE_TAG`` (the Makefile exports both; default ``localhost/dptrain/...:<version>``). podman reads the
repository's ``images/containers.conf`` unless ``CONTAINERS_CONF`` names another one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "images" / "containers.conf"
REQUIRE_ENV = "DPTRAIN_REQUIRE_CONTAINERS"
"""Set (to 1) where the container tests must run (CI): a missing podman or image fails them instead of skipping."""


def project_version() -> str:
    """dptrain's one version (the workspace pyproject.toml), the tag `make images` gives the images."""
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def image(name: str) -> str:
    """The local name of image `name` (trainer, operator) as `make images` tags it."""
    repository = os.environ.get("DPTRAIN_TEST_IMAGE_REPOSITORY") or "localhost/dptrain"
    tag = os.environ.get("DPTRAIN_TEST_IMAGE_TAG") or project_version()
    return f"{repository}/{name}:{tag}"


def env() -> dict[str, str]:
    """The environment podman runs with: this one, plus the repository's containers.conf unless one is set."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF") or str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs `podman args`; with check, a non-zero exit raises RuntimeError with podman's stderr."""
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def unavailable(images: Sequence[str] = ()) -> str | None:
    """Why containers of these images cannot run here (None: they can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (Debian: apt-get install podman buildah runc mmdebstrap; .ci/run does)"
    if os.geteuid() != 0:
        return "the container tests need root podman (cgroup memory/CPU limits, volumes chowned to UID 65532)"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return "podman info timed out"
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-500:]}"
    missing = [name for name in images if podman("image", "exists", name, check=False).returncode != 0]
    if missing:
        return f"image(s) {', '.join(missing)} not built: run `make images`"
    return None


def require(images: Sequence[str] = ()) -> None:
    """Skips the test when the images cannot run here, saying why; fails instead where REQUIRE_ENV is set."""
    reason = unavailable(images)
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: the container tests must run here)")
    pytest.skip(reason)
