"""Facts about the images `make images` built (``make image-facts``): size, `pip check`, no compiler in the final
stage, the user they run as, and the time from `podman run` to the trainer's first DP step.

    .venv/bin/python benchmarks/images.py [--repository localhost/dptrain] [--tag <version>] [--rounds 3] [--json F]

The start-to-first-step time runs the trainer as its pod runs (UID 65532, read-only root filesystem, no
capabilities, no privilege escalation, host network, 2 CPUs, 2 GiB, the checkpoint folder as its volume) on
examples/breast-cancer-logistic.yaml and polls its metrics endpoint every 20 ms until `dptrain_steps_total` >= 1;
the same run as a host process (the virtualenv's `dptrain`) is the baseline. Build times come from
build/images/summary.json, which `make images` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import podman

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "breast-cancer-logistic.yaml"
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "ld", "as", "make")
UID = "65532"
LOCKED = ["--network=none", "--read-only", "--cap-drop=ALL", "--security-opt", "no-new-privileges"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(image: str, *command: str) -> subprocess.CompletedProcess[str]:
    return podman.podman("run", "--rm", "--pull=never", *LOCKED, image, *command, check=False)


def static_facts(image: str) -> dict[str, Any]:
    inspected = json.loads(podman.podman("image", "inspect", image).stdout)[0]
    pip_check = _run(image, "pip", "check")
    found = _run(image, "sh", "-c", " ; ".join(f"command -v {c} || true" for c in COMPILERS))
    user = _run(image, "id", "-u")
    return {
        "image": image,
        "size_mb": round(int(inspected["Size"]) / 1e6),
        "layers": len(inspected.get("RootFS", {}).get("Layers") or []),
        "pip_check": pip_check.stdout.strip() if pip_check.returncode == 0 else f"FAILED: {pip_check.stdout}",
        "compilers": found.stdout.split(),
        "config_user": inspected.get("Config", {}).get("User", ""),
        "runs_as": user.stdout.strip(),
    }


def _first_step(port: int, started: float, process: subprocess.Popen[bytes], timeout: float = 120) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the trainer exited with {process.returncode} before its first step")
        try:
            for line in httpx.get(url, timeout=1).text.splitlines():
                if line.startswith("dptrain_steps_total{") and float(line.rsplit(" ", 1)[1]) >= 1:
                    return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError("no DP step within the timeout")


def time_to_first_step(image: str | None, work: Path) -> tuple[float, float]:
    """(seconds from start to the first DP step, seconds to exit) of one run; image None: a host process."""
    output = work / "checkpoint"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    port = _free_port()
    run = ["run", "/etc/dptrain/job/job.yaml", "--output", "/var/lib/dptrain/checkpoint", "--quiet"]
    run += ["--metrics-port", str(port), "--metrics-address", "127.0.0.1"]
    if image is None:
        command = [str(Path(sys.executable).parent / "dptrain"), "run", str(EXAMPLE), "--output", str(output)]
        command += ["--quiet", "--metrics-port", str(port), "--metrics-address", "127.0.0.1"]
        environ = {**os.environ, "OMP_NUM_THREADS": "2", "DPTRAIN_CPU_LIMIT": "2"}
    else:
        os.chown(output, int(UID), int(UID))
        command = ["podman", "run", "--rm", "--pull=never", "--network=host", f"--user={UID}:{UID}", "--read-only"]
        command += ["--read-only-tmpfs=false", "--tmpfs=/tmp:rw,size=1g,mode=1777", "--cap-drop=ALL"]
        command += ["--security-opt", "no-new-privileges", "--cpus=2", "--memory=2g", "--memory-swap=2g"]
        command += [
            f"--volume={EXAMPLE}:/etc/dptrain/job/job.yaml:ro",
            f"--volume={output}:/var/lib/dptrain/checkpoint",
        ]
        command += ["--env=OMP_NUM_THREADS=2", "--env=DPTRAIN_CPU_LIMIT=2", image, "dptrain", *run]
        environ = podman.env()
    started = time.monotonic()
    process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _first_step(port, started, process)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode != 0:
        raise RuntimeError(f"the trainer failed ({process.returncode}): {stderr.decode()[-2000:]}")
    return first, time.monotonic() - started


def start_overhead(image: str, rounds: int) -> float:
    """Median seconds of `podman run --rm IMAGE python3 -c pass` (the pod's settings), the runtime's own cost."""
    times = []
    for _ in range(rounds):
        started = time.monotonic()
        _run(image, "python3", "-c", "pass")
        times.append(time.monotonic() - started)
    return round(statistics.median(times), 2)


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repository", default=os.environ.get("DPTRAIN_TEST_IMAGE_REPOSITORY") or "localhost/dptrain")
    parser.add_argument("--tag", default=os.environ.get("DPTRAIN_TEST_IMAGE_TAG") or project_version())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "images.json")
    args = parser.parse_args()
    images = {name: f"{args.repository}/{name}:{args.tag}" for name in ("trainer", "operator")}
    reason = podman.unavailable(list(images.values()))
    if reason:
        print(f"images: {reason}", file=sys.stderr)
        return 1
    summary_path = ROOT / "build" / "images" / "summary.json"
    built = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    facts: dict[str, Any] = {name: static_facts(image) for name, image in images.items()}
    for name, entry in (built.get("images") or {}).items():
        if name in facts:
            facts[name]["build_seconds"] = entry.get("build_seconds")
    if built.get("base"):
        facts["base"] = {"image": built["base"], "size_mb": round(int(podman.podman(
            "image", "inspect", "--format", "{{.Size}}", built["base"]).stdout) / 1e6)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dptrain-image-facts-") as work:
        timings: dict[str, list[tuple[float, float]]] = {"container": [], "host process": []}
        for _ in range(args.rounds):  # interleaved: the machine is shared
            timings["container"].append(time_to_first_step(images["trainer"], Path(work)))
            timings["host process"].append(time_to_first_step(None, Path(work)))
    overhead = start_overhead(images["trainer"], max(3, args.rounds))
    startup: dict[str, Any] = {
        mode: {
            "first_step_s": [round(first, 2) for first, _ in runs],
            "first_step_median_s": round(statistics.median(first for first, _ in runs), 2),
            "exit_median_s": round(statistics.median(total for _, total in runs), 2),
        }
        for mode, runs in timings.items()
    }
    print("| image | size | build | pip check | compilers | USER / id -u |")
    print("|---|---|---|---|---|---|")
    for name in images:
        entry = facts[name]
        build_time = f"{entry['build_seconds']:.0f} s" if entry.get("build_seconds") else "–"
        compilers = ", ".join(entry["compilers"]) or "none"
        user = f"{entry['config_user']} / {entry['runs_as']}"
        print(f"| {name} | {entry['size_mb']} MB | {build_time} | {entry['pip_check']} | {compilers} | {user} |")
    if "base" in facts:
        print(f"| base {facts['base']['image']} | {facts['base']['size_mb']} MB | | | | |")
    print()
    print("| trainer, breast-cancer-logistic.yaml (60 steps) | start → first DP step (median) | runs | start → exit |")
    print("|---|---|---|---|")
    for mode, entry in startup.items():
        runs = ", ".join(f"{value:.2f}" for value in entry["first_step_s"])
        print(f"| {mode} | {entry['first_step_median_s']:.2f} s | {runs} | {entry['exit_median_s']:.2f} s |")
    print(f"\n`podman run --rm` of `python3 -c pass` in the trainer image (median): {overhead:.2f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"images": facts, "startup": startup, "podman_run_python_pass_s": overhead}
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    failures = [name for name in images if not facts[name]["pip_check"].startswith("No broken requirements")]
    failures += [name for name in images if facts[name]["compilers"] or facts[name]["runs_as"] != UID]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
