"""Run every benchmark script in this folder and print their tables (``make bench``).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--json-dir DIR]

Each benchmark runs in its own process (one thread: OMP_NUM_THREADS=1), in the order of BENCHMARKS;
its stdout (the table) is printed, its JSON written to ``--json-dir`` (default runs/bench). A failing
benchmark is reported and the others still run; the exit code is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, extra arguments for a full run, extra arguments for --quick)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "step_time": ("step_time.py", [], ["--rounds", "3", "--target-seconds", "0.05", "--no-memory"]),
    "utility": ("utility.py", [], ["--seeds", "0", "--epsilons", "3"]),
    "epsilon_tightness": ("epsilon_tightness.py", [], []),
    "operator_scale": ("operator_scale.py", [], ["--latency-jobs", "5", "--jobs", "50"]),
    "audit": ("audit.py", [], ["--seeds", "0", "--examples", "breast-cancer-logistic"]),
    "federated": ("federated.py", [], ["--epsilons", "3"]),
    "patients": ("patients.py", [], ["--seeds", "0", "--epsilons", "3", "--rounds", "3"]),
    "noise": ("noise.py", [], ["--rounds", "3", "--models", "mlp", "logistic"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds/seeds/jobs (a smoke run, not numbers)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--json-dir", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    args.json_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = []
    for name in args.only:
        script, full, quick = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        command += ["--json", str(args.json_dir / f"{name}.json")]
        print(f"\n## {name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env=env, check=False)
        print(f"({name}: exit {proc.returncode}, {time.monotonic() - started:.0f} s)", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
