#!/usr/bin/env python3
"""Build the dptrain images with podman from the repository's Dockerfiles (``make images``).

    python3 images/build.py [--repository localhost/dptrain] [--tag <version>] [--only trainer operator]
    python3 images/build.py --cuda          # the CUDA trainer variant, only where its torch wheels are reachable

The Dockerfiles stay the one recipe; this script only chooses their build arguments for the machine it runs on:

* ``BASE_IMAGE``: the Dockerfiles' default (``python:3.11.x-slim-<suite>``) when it is in local storage or can be
  pulled; otherwise a base bootstrapped from Debian packages (mmdebstrap: python3, python3-venv, ca-certificates
  of the same Debian suite, so the same Python 3.11), imported as ``<repository>/debian-python:<suite>-3.11``.
* pip inside the build reaches the same package index the host uses: the host's pip settings that say WHERE
  packages come from (index-url, extra-index-url, find-links, cert, trusted-host, timeout; from pip's config
  files and ``PIP_*``) go into a pip.conf mounted read-only at /etc/pip.conf of the build containers, with the
  local folders and the CA bundle they name (``podman build --volume``: build-time only, never in a layer).
* torch: from the Dockerfile's ``TORCH_INDEX_URL`` when it answers; else the CPU wheel of the same version from
  the host's find-links (``TORCH_VERSION=<v>+cpu``, which no CUDA wheel on another index can match).

Nothing here edits /etc: podman reads ``images/containers.conf`` through ``CONTAINERS_CONF`` (set by the
Makefile; set here too when unset). Standard library only, so it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]


def project_version() -> str:
    """dptrain's one version (the workspace pyproject.toml): the images' default tag and their version label."""
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


DOCKERFILES = {"trainer": REPO / "trainer-image" / "Dockerfile", "operator": REPO / "operator" / "Dockerfile"}
CONTAINERS_CONF = REPO / "images" / "containers.conf"
WORK_DIR = REPO / "build" / "images"
CUDA_INDEX_URL = "https://download.pytorch.org/whl/cu128"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Where the host's CA bundle appears inside build containers (pip's `cert`): an intercepting proxy's CA is in the
# host bundle, not in the base image's.
CERT_IN_BUILD = "/etc/dptrain-build/ca-certificates.crt"
PYPI = "https://pypi.org/simple"


def log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


# --- the Dockerfiles -------------------------------------------------------------------------------------------


def dockerfile_args(path: Path) -> dict[str, str]:
    """``ARG NAME=default`` of a Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", path.read_text(), flags=re.MULTILINE))


def debian_suite(base_image: str) -> str:
    """The Debian suite of a python:X-slim-<suite> tag (bookworm when it names none)."""
    tag = base_image.split("@", 1)[0].rsplit(":", 1)[-1]
    last = tag.rsplit("-", 1)[-1]
    return last if "-" in tag and last.isalpha() and last != "slim" else "bookworm"


def python_series(base_image: str) -> str:
    match = re.search(r":(\d+\.\d+)", base_image)
    return match.group(1) if match else "3"


# --- the host's pip settings -----------------------------------------------------------------------------------


@dataclass
class PipSettings:
    """What decides where pip finds packages (nothing else of the host's pip configuration is carried over)."""

    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    cert: str | None = None
    trusted_hosts: list[str] = field(default_factory=list)
    timeout: str | None = None

    def local_paths(self) -> list[str]:
        """Host folders/files the settings name (file:// indexes, find-links folders), to mount in the build."""
        paths: list[str] = []
        for location in [*([self.index_url] if self.index_url else []), *self.extra_index_urls, *self.find_links]:
            path = _local_path(location)
            if path is None:
                continue
            # A file index links its files relative to itself (../../files/x.whl): mount the folder above /simple.
            if Path(path).name == "simple":
                path = str(Path(path).parent)
            if path not in paths and Path(path).exists():
                paths.append(path)
        return paths

    def to_conf(self) -> str:
        lines = ["# Generated by images/build.py from the host's pip settings; mounted at /etc/pip.conf.", "[global]"]
        if self.index_url:
            lines.append(f"index-url = {self.index_url}")
        if self.extra_index_urls:
            lines.append("extra-index-url = " + " ".join(self.extra_index_urls))
        if self.find_links:
            lines.append("find-links = " + " ".join(self.find_links))
        if self.cert:
            lines.append(f"cert = {CERT_IN_BUILD}")
        if self.trusted_hosts:
            lines.append("trusted-host = " + " ".join(self.trusted_hosts))
        if self.timeout:
            lines.append(f"default-timeout = {self.timeout}")
        lines.append("disable-pip-version-check = true")
        return "\n".join(lines) + "\n"


def _local_path(location: str) -> str | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return parsed.path
    if not parsed.scheme and location.startswith("/"):
        return location
    return None


def pip_config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's configuration files in its order of precedence (later wins): global, user, PIP_CONFIG_FILE."""
    xdg_dirs = environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    home = Path(environ.get("HOME", str(Path.home())))
    xdg_home = Path(environ.get("XDG_CONFIG_HOME", str(home / ".config")))
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d]
    files += [Path("/etc/pip.conf"), home / ".pip" / "pip.conf", xdg_home / "pip" / "pip.conf"]
    if environ.get("PIP_CONFIG_FILE") and environ["PIP_CONFIG_FILE"] != os.devnull:
        files.append(Path(environ["PIP_CONFIG_FILE"]))
    return files


_KEYS = {
    "index-url": "index_url",
    "extra-index-url": "extra_index_urls",
    "find-links": "find_links",
    "cert": "cert",
    "trusted-host": "trusted_hosts",
    "timeout": "timeout",
    "default-timeout": "timeout",
}


def host_pip_settings(environ: Mapping[str, str], files: Sequence[Path]) -> PipSettings:
    """The host's pip settings as pip merges them: files in order ([global], then [install] and [wheel], which
    the build runs), then PIP_* environment variables."""
    if environ.get("PIP_CONFIG_FILE") == os.devnull:
        files = []
    raw: dict[str, str] = {}
    for path in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError) as error:
            log(f"ignoring unreadable pip configuration {path}: {error}")
            continue
        for section in ("global", "install", "wheel"):
            if parser.has_section(section):
                raw.update({key: value for key, value in parser.items(section) if key in _KEYS})
    for key in _KEYS:
        value = environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            raw[key] = value
    settings = PipSettings()
    for key, value in raw.items():
        attribute = _KEYS[key]
        if isinstance(getattr(settings, attribute), list):
            setattr(settings, attribute, value.split())
        else:
            setattr(settings, attribute, value.strip())
    return settings


def build_mounts(settings: PipSettings, pip_conf: Path) -> list[str]:
    """``podman build --volume`` arguments: the generated pip.conf, the CA bundle, the local package folders."""
    volumes = [f"{pip_conf}:/etc/pip.conf:ro"]
    if settings.cert:
        volumes.append(f"{settings.cert}:{CERT_IN_BUILD}:ro")
    volumes += [f"{path}:{path}:ro" for path in settings.local_paths()]
    return [argument for volume in volumes for argument in ("--volume", volume)]


# --- torch -----------------------------------------------------------------------------------------------------


def reachable(url: str, cert: str | None, timeout: float = 10.0) -> bool:
    """Does a package index answer (any HTTP status below 500)?"""
    import ssl

    context = ssl.create_default_context(cafile=cert) if cert else None
    request = urllib.request.Request(url, method="GET", headers={"User-Agent": "dptrain-images"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def local_cpu_torch(settings: PipSettings, version: str) -> str | None:
    """`<version>+cpu` when a CPU wheel of torch `version` lies in one of the host's find-links folders."""
    for location in settings.find_links:
        path = _local_path(location)
        if path and Path(path).is_dir() and any(Path(path).glob(f"torch-{version}+cpu-*.whl")):
            return f"{version}+cpu"
    return None


def torch_args(settings: PipSettings, defaults: Mapping[str, str], *, cuda: bool) -> dict[str, str] | None:
    """TORCH_INDEX_URL / TORCH_VERSION build arguments for this machine (None: no such torch is reachable)."""
    index = CUDA_INDEX_URL if cuda else defaults["TORCH_INDEX_URL"]
    version = defaults["TORCH_VERSION"]
    if reachable(index.rstrip("/") + "/torch/", settings.cert):
        log(f"torch {version} from {index}")
        return {"TORCH_INDEX_URL": index} if cuda else {}
    if cuda:
        return None
    local = local_cpu_torch(settings, version)
    if local is None:
        return None
    # `+cpu` can only match the CPU wheel: PyPI's plain `torch` (a CUDA build) can never be picked instead.
    log(f"{index} is not reachable: torch {local} from the host's find-links")
    return {"TORCH_INDEX_URL": settings.index_url or PYPI, "TORCH_VERSION": local}


# --- podman ----------------------------------------------------------------------------------------------------


def podman(*args: str, check: bool = True, capture: bool = False, timeout: float | None = None) -> str:
    result = subprocess.run(
        ["podman", *args], capture_output=capture, text=True, check=False, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise SystemExit(f"images: podman {shlex.join(args)} failed with exit code {result.returncode}\n{detail}")
    return result.stdout if capture else ""


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0


def image_size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image, capture=True).strip())


def bootstrap_base(default_base: str, repository: str, *, rebuild: bool) -> str:
    """A python3 base from Debian packages of the default base's suite (mmdebstrap), imported into podman."""
    suite = debian_suite(default_base)
    series = python_series(default_base)
    image = f"{repository}/debian-python:{suite}-{series}"
    if image_exists(image) and not rebuild:
        log(f"base: reusing {image} (bootstrapped earlier; --rebuild-base to redo it)")
        return image
    if shutil.which("mmdebstrap") is None:
        raise SystemExit(
            f"images: {default_base} cannot be pulled and mmdebstrap is missing (apt-get install mmdebstrap)"
        )
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tarball = WORK_DIR / f"debian-python-{suite}.tar"
    started = time.monotonic()
    log(f"base: bootstrapping {image} from Debian {suite} ({', '.join(BASE_PACKAGES)})")
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES),
            # Like the python:slim images: no documentation, manual pages or translations.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--quiet",
            suite,
            str(tarball),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    podman("import", "--change", 'CMD ["/usr/bin/python3"]', str(tarball), image, capture=True)
    tarball.unlink()
    version = podman("run", "--rm", "--pull=never", "--network=none", image, "python3", "--version", capture=True)
    if not version.split()[-1].startswith(series):
        raise SystemExit(f"images: Debian {suite} has {version.strip()}, the images are built for Python {series}")
    log(f"base: {image} ({version.strip()}) in {time.monotonic() - started:.0f} s")
    return image


def choose_base(default_base: str, repository: str, *, base: str | None, pull: bool, rebuild: bool) -> str | None:
    """BASE_IMAGE to pass (None: the Dockerfiles' default, which is in local storage)."""
    if base:
        return base
    if image_exists(default_base):
        return None
    if pull:
        log(f"base: pulling {default_base}")
        result = subprocess.run(
            ["podman", "pull", "--quiet", default_base],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode == 0:
            return None
        log(f"base: cannot pull {default_base}: {result.stderr.strip().splitlines()[-1:]}")
    return bootstrap_base(default_base, repository, rebuild=rebuild)


def build(name: str, tag: str, build_args: Mapping[str, str], mounts: Sequence[str]) -> float:
    arguments = [f"--build-arg={key}={value}" for key, value in build_args.items()]
    started = time.monotonic()
    log(f"building {tag} from {DOCKERFILES[name].relative_to(REPO)} {' '.join(arguments)}")
    podman(
        "build",
        "--pull=never",
        "--network=host",
        *arguments,
        *mounts,
        "--file",
        str(DOCKERFILES[name]),
        "--tag",
        tag,
        str(REPO),
    )
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repository", default="localhost/dptrain", help="images are <repository>/<name>:<tag>")
    parser.add_argument("--tag", default=project_version())
    parser.add_argument("--only", nargs="+", choices=list(DOCKERFILES), default=list(DOCKERFILES))
    parser.add_argument("--cuda", action="store_true", help="build the CUDA trainer (<tag>-cuda) instead")
    parser.add_argument("--base", help="BASE_IMAGE to use (default: the Dockerfiles' base, else bootstrapped)")
    parser.add_argument("--no-pull", action="store_true", help="never try to pull the default base")
    parser.add_argument("--rebuild-base", action="store_true", help="bootstrap the Debian base again")
    parser.add_argument("--summary", type=Path, help="write build times and sizes here (JSON)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    if shutil.which("podman") is None:
        raise SystemExit("images: podman is missing (Debian: apt-get install podman buildah runc mmdebstrap)")

    defaults = {name: dockerfile_args(path) for name, path in DOCKERFILES.items()}
    default_base = defaults["trainer"]["BASE_IMAGE"]
    if defaults["operator"]["BASE_IMAGE"] != default_base:
        raise SystemExit("images: the two Dockerfiles name different BASE_IMAGE defaults")
    settings = host_pip_settings(os.environ, pip_config_files(os.environ))
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    pip_conf = WORK_DIR / "pip.conf"
    pip_conf.write_text(settings.to_conf())
    mounts = build_mounts(settings, pip_conf)

    names = ["trainer"] if args.cuda else args.only
    torch: dict[str, str] = {}
    if "trainer" in names:
        found = torch_args(settings, defaults["trainer"], cuda=args.cuda)
        if found is None and args.cuda:
            log(f"CUDA trainer skipped: {CUDA_INDEX_URL} is not reachable from here (see README: Images)")
            return 0
        if found is None:
            raise SystemExit(
                f"images: no CPU torch {defaults['trainer']['TORCH_VERSION']}: {defaults['trainer']['TORCH_INDEX_URL']}"
                " is not reachable and no torch-<version>+cpu wheel is in the host's pip find-links"
            )
        torch = found
    base = choose_base(default_base, args.repository, base=args.base, pull=not args.no_pull, rebuild=args.rebuild_base)
    common = {"BASE_IMAGE": base} if base else {}

    summary: dict[str, dict[str, float | str]] = {}
    for name in names:
        tag = f"{args.repository}/{name}:{args.tag}{'-cuda' if args.cuda else ''}"
        seconds = build(name, tag, {**common, **(torch if name == "trainer" else {})}, mounts)
        summary[name] = {"image": tag, "build_seconds": round(seconds, 1), "size_bytes": image_size(tag)}
    for name, facts in summary.items():
        log(f"{name}: {facts['image']}  {int(facts['size_bytes']) / 1e6:.0f} MB  built in {facts['build_seconds']} s")
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps({"base": base or default_base, "images": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
