"""`make images` (images/build.py) and the container node's pod -> podman translation, without podman: the host's
pip settings carried into the build, the torch and base choices, and the podman options of the trainer pod the
operator renders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dptrain_api import DPTrainingJob, parse_resource
from dptrain_operator.settings import Settings
from tests.support.container_node import Mount, podman_create_args, run_as, volume_mounts
from tests.support.manifests import base_manifest, sample_trainer_pod
from tests.support.node import PodStartError, parse_quantity

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["images_build"] = module
    spec.loader.exec_module(module)
    return module


def test_the_base_suite_and_python_come_from_the_dockerfiles_default(build: ModuleType) -> None:
    base = build.dockerfile_args(REPO / "trainer-image" / "Dockerfile")["BASE_IMAGE"]
    assert base == build.dockerfile_args(REPO / "operator" / "Dockerfile")["BASE_IMAGE"]
    assert (build.debian_suite(base), build.python_series(base)) == ("bookworm", "3.11")
    assert build.debian_suite("python:3.11.14-slim-trixie@sha256:" + "0" * 64) == "trixie"
    assert build.debian_suite("python:3.11-slim") == "bookworm"


def test_the_build_reaches_the_hosts_package_index(build: ModuleType, tmp_path: Path) -> None:
    wheels, index = tmp_path / "wheels", tmp_path / "pypi" / "simple"
    wheels.mkdir()
    index.mkdir(parents=True)
    (tmp_path / "global.conf").write_text(
        f"[global]\nextra-index-url = file://{index}\ncert = /etc/ssl/certs/ca-certificates.crt\n"
        "constraint = /etc/somewhere/constraints.txt\n"
    )
    (tmp_path / "user.conf").write_text(f"[global]\nfind-links = {wheels}\n[install]\ntimeout = 60\n")
    environ = {"PIP_DEFAULT_TIMEOUT": "180", "PIP_TRUSTED_HOST": "mirror.example"}
    settings = build.host_pip_settings(environ, [tmp_path / "global.conf", tmp_path / "user.conf"])
    assert settings.extra_index_urls == [f"file://{index}"]
    assert settings.find_links == [str(wheels)]
    assert (settings.timeout, settings.trusted_hosts) == ("180", ["mirror.example"])  # the environment wins
    # a file index links its files relative to itself: the folder above /simple is mounted
    assert settings.local_paths() == [str(index.parent), str(wheels)]
    conf = settings.to_conf()
    assert f"find-links = {wheels}" in conf
    assert f"cert = {build.CERT_IN_BUILD}" in conf
    assert "constraint" not in conf  # only where packages come from, not the host's version caps
    mounts = build.build_mounts(settings, tmp_path / "pip.conf")
    assert mounts[:2] == ["--volume", f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro"]
    assert f"/etc/ssl/certs/ca-certificates.crt:{build.CERT_IN_BUILD}:ro" in mounts
    assert f"{wheels}:{wheels}:ro" in mounts
    assert build.host_pip_settings({"PIP_CONFIG_FILE": "/dev/null"}, [tmp_path / "user.conf"]).find_links == []


def test_torch_comes_from_its_index_else_the_local_cpu_wheel(
    build: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = build.dockerfile_args(REPO / "trainer-image" / "Dockerfile")
    settings = build.PipSettings(find_links=[str(tmp_path)])
    monkeypatch.setattr(build, "reachable", lambda url, cert: True)
    assert build.torch_args(settings, defaults, cuda=False) == {}  # the Dockerfile's defaults
    assert build.torch_args(settings, defaults, cuda=True) == {"TORCH_INDEX_URL": build.CUDA_INDEX_URL}
    monkeypatch.setattr(build, "reachable", lambda url, cert: False)
    assert build.torch_args(settings, defaults, cuda=True) is None  # no CUDA variant where its wheels are out of reach
    assert build.torch_args(settings, defaults, cuda=False) is None
    version = defaults["TORCH_VERSION"]
    (tmp_path / f"torch-{version}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert build.torch_args(settings, defaults, cuda=False) == {
        "TORCH_INDEX_URL": "https://pypi.org/simple",
        "TORCH_VERSION": f"{version}+cpu",  # only the CPU wheel can match: never a CUDA torch from another index
    }


def _trainer_pod() -> dict[str, Any]:
    document = base_manifest("job")
    document["metadata"].update(namespace="ml", uid="0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10")
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    return sample_trainer_pod(job, Settings(trainer_image="localhost/dptrain/trainer:0.1.0"))


def test_the_trainer_pod_maps_to_a_locked_down_podman_container() -> None:
    pod = _trainer_pod()
    spec = pod["spec"]["containers"][0]
    path_map = {mount["mountPath"]: f"/host{mount['mountPath']}" for mount in spec["volumeMounts"]}
    mounts = [*volume_mounts(pod, spec, path_map), Mount("/dev/termination-log", "/host/termination")]
    args = podman_create_args(
        pod,
        spec,
        name="c",
        image="localhost/dptrain/trainer:0.1.0",
        image_user="65532:65532",
        mounts=mounts,
        env={"DPTRAIN_METRICS_ADDRESS": "127.0.0.2"},
    )
    for option in (
        "--network=host",
        "--pull=never",
        "--user=65532:65532",
        "--group-add=65532",  # fsGroup
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=ALL",
        "no-new-privileges",
        "--env=DPTRAIN_METRICS_ADDRESS=127.0.0.2",
        "/host/tmp:/tmp:rw",
        "/host/var/lib/dptrain/checkpoint:/var/lib/dptrain/checkpoint:rw",
        "/host/termination:/dev/termination-log:rw",
    ):
        assert option in args, option
    limits = spec["resources"]["limits"]
    memory = int(parse_quantity(limits["memory"]))
    assert {f"--memory={memory}b", f"--memory-swap={memory}b"} <= set(args)  # no swap: the limit is the limit
    assert f"--cpus={float(parse_quantity(limits['cpu'])):g}" in args
    entrypoint = next(arg for arg in args if arg.startswith("--entrypoint="))
    assert '"dptrain", "run"' in entrypoint
    assert args[-1] == "localhost/dptrain/trainer:0.1.0"  # no args: the image's CMD is not appended


def test_memory_empty_dirs_are_tmpfs_and_claims_can_be_read_only() -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {
            "volumes": [
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "d", "readOnly": True}},
                {"name": "cfg", "configMap": {"name": "c"}},
            ]
        },
    }
    spec = {
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "data", "mountPath": "/data"},
            {"name": "cfg", "mountPath": "/cfg"},
        ]
    }
    mounts = volume_mounts(pod, spec, {"/dev/shm": "/h/shm", "/data": "/h/data", "/cfg": "/h/cfg"})
    assert [m.option() for m in mounts] == [
        ["--tmpfs", f"/dev/shm:rw,size={16 * 2**20},mode=1777"],
        ["--volume", "/h/data:/data:ro"],
        ["--volume", "/h/cfg:/cfg:ro"],
    ]


def test_run_as_non_root_is_enforced_as_the_kubelet_does() -> None:
    assert run_as({"runAsNonRoot": True}, "65532:65532") is None  # the image's user, which is not root
    assert run_as({"runAsUser": 1000, "runAsGroup": 2000}, "") == "1000:2000"
    for context, image_user in (({"runAsNonRoot": True}, ""), ({"runAsNonRoot": True, "runAsUser": 0}, "65532")):
        with pytest.raises(PodStartError, match="runAsNonRoot"):
            run_as(context, image_user)
    with pytest.raises(PodStartError, match="non-numeric"):
        run_as({"runAsNonRoot": True}, "nobody")
