"""One version: the workspace pyproject.toml's. Packaging metadata needs literal copies (each package's pyproject,
the Flower App, the chart, the images' labels); this test fails when one of them drifts, naming it."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from dptrain_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

PACKAGES = ["api/pyproject.toml", "operator/pyproject.toml", "trainer-image/pyproject.toml",
            "trainer-image/src/dptrain/federated/app/pyproject.toml"]  # fmt: skip


@pytest.mark.parametrize("path", PACKAGES)
def test_every_package_carries_the_one_version(path: str) -> None:
    assert tomllib.loads((REPO / path).read_text())["project"]["version"] == VERSION, f"{path}: set it to {VERSION}"


def test_the_chart_and_its_app_carry_it() -> None:
    chart = yaml.safe_load((REPO / "charts/dptrain/Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (VERSION, VERSION)


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "trainer-image/Dockerfile"])
def test_the_images_label_it(dockerfile: str) -> None:
    labels = re.findall(r'org\.opencontainers\.image\.version="([^"]+)"', (REPO / dockerfile).read_text())
    assert labels == [VERSION]


def test_installed_packages_and_the_default_trainer_image_agree() -> None:
    """The installed metadata (what reports and the operator read) and the default image tag come from it."""
    assert {version(name) for name in ("dptrain-api", "dptrain-operator", "dptrain")} == {VERSION}
    assert Settings().trainer_image.endswith(f":{VERSION}")


def test_no_other_copy_of_the_version_literal() -> None:
    """Everything else reads the version (Makefile, images/build.py, test support, benchmarks): no new copies."""
    allowed = {*PACKAGES, "pyproject.toml", "charts/dptrain/Chart.yaml", "operator/Dockerfile",
               "trainer-image/Dockerfile", "CHANGELOG.md", "constraints.txt"}  # fmt: skip
    pattern = re.compile(rf"(?<![\d.]){re.escape(VERSION)}(?![\d.])")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    skipped = (".csv", ".json", ".png", ".pt", ".md")  # data, dashboards and prose (the CHANGELOG names versions)
    found = [
        path
        for path in tracked
        if path not in allowed
        and not path.endswith(skipped)
        and not path.startswith(("tests/unit/", "tests/integration/"))  # tests may pin an image name as a fixture
        and pattern.search((REPO / path).read_text(errors="ignore"))
    ]
    assert not found, f"the version literal {VERSION} is copied in {found}: read it from pyproject.toml"
