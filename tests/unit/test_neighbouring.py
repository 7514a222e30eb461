"""The auditor's test: train on D and on D plus one record; everything the job emits that is not a DP release
(or timing, which the report lists as not covered) must be identical.

D + outlier: one extra valid record at the edge of the feature bounds. D + unusable: one extra record with a
non-numeric value, which is skipped; only the pod log (steward-only, listed as not covered) may say so.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dptrain.journal import JOURNAL_NAME
from dptrain.report import REPORT_NAME

pytestmark = pytest.mark.slow

# The report's DP releases, and the fields that are timing or wall-clock time.
_DP_OR_TIMING = re.compile(
    r"^(\.created|\.evaluation\.metrics\..*|\.journal\.entries\[\d+\]\.time|\.runtime\.elapsedSecondsThisAttempt)$"
)
_DP_TERMINATION_FIELDS = {"evalMetrics", "holdoutLoss", "evalValue"}
# Console values that are DP releases or timing, masked before comparing.
_CONSOLE_MASKS = [
    (re.compile(r"holdout loss [0-9.]+"), "holdout loss <dp>"),
    (re.compile(r"\b(auc|accuracy) [0-9.]+"), r"\1 <dp>"),
    (re.compile(r"[0-9.]+ \(released with DP\)"), "<dp> (released with DP)"),
    (re.compile(r"│ time +│ [^│]*│"), "│ time │ <timing> │"),
]


@dataclass(frozen=True)
class Emitted:
    """Everything one run emits, with DP releases and timing masked."""

    exit_code: int
    termination: dict[str, Any]
    report: dict[str, Any]
    journal: list[dict[str, Any]]
    stdout: str
    stderr: list[str]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _mask_console(text: str) -> str:
    for pattern, replacement in _CONSOLE_MASKS:
        text = pattern.sub(replacement, text)
    return text


def _run(folder: Path, records: list[str]) -> Emitted:
    folder.mkdir()
    (folder / "wards.csv").write_text("age,bp,died\n" + "\n".join(records) + "\n")
    job = {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"name": "audit"},
        "spec": {
            "dataset": {"datasetRef": {"name": "wards"}},
            "model": {"architecture": "logistic"},
            "privacy": {"targetEpsilon": 4.0, "delta": 1e-4},
            "training": {"epochs": 2, "batchSize": 32, "learningRate": 0.5, "seed": 1, "evalReleases": 2},
            "checkpoint": {"everySteps": 5},
        },
    }
    features = [{"name": "age", "min": 0, "max": 120}, {"name": "bp", "min": 40, "max": 250}]
    dataset = {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "PrivateDataset",
        "metadata": {"name": "wards"},
        "spec": {
            "source": {"file": {"claimName": "c", "path": "wards.csv", "labelColumn": "died", "features": features}},
            "numExamples": 300,
            "budget": {"epsilon": 10, "delta": 1e-4},
        },
    }
    (folder / "job.yaml").write_text(yaml.safe_dump_all([job, dataset]))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DPTRAIN_")}
    environment["DPTRAIN_CPU_LIMIT"] = "1"
    command = [sys.executable, "-m", "dptrain.cli", "run", "job.yaml", "--output", "out", "--quiet"]
    command += ["--termination-message-path", "termination-log"]
    done = subprocess.run(
        command, check=False, cwd=folder, env=environment, capture_output=True, text=True, timeout=300
    )
    termination = json.loads((folder / "termination-log").read_text())
    report = json.loads((folder / "out" / REPORT_NAME).read_text())
    journal = [json.loads(line) for line in (folder / "out" / JOURNAL_NAME).read_text().splitlines()]
    return Emitted(
        exit_code=done.returncode,
        termination={k: v for k, v in termination.items() if k not in _DP_TERMINATION_FIELDS},
        report={k: v for k, v in _flatten(report).items() if not _DP_OR_TIMING.match(k)},
        journal=[{k: v for k, v in entry.items() if k not in ("time", "created")} for entry in journal],
        stdout=_mask_console(done.stdout),
        stderr=_mask_console(done.stderr).splitlines(),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Emitted]:
    generator = random.Random(1)
    records = [
        f"{generator.randint(20, 90)},{generator.randint(60, 200)},{generator.randint(0, 1)}" for _ in range(300)
    ]
    root = tmp_path_factory.mktemp("neighbours")
    return {
        "D": _run(root / "d", records),
        "D+outlier": _run(root / "outlier", [*records, "120,250,1"]),
        "D+unusable": _run(root / "unusable", [*records, "n/a,250,1"]),
    }


@pytest.mark.parametrize("neighbour", ["D+outlier", "D+unusable"])
def test_a_neighbouring_dataset_changes_nothing_but_the_dp_releases(runs: dict[str, Emitted], neighbour: str) -> None:
    original, other = runs["D"], runs[neighbour]
    assert original.exit_code == other.exit_code == 0, other.stderr
    assert original.termination == other.termination
    assert original.report == other.report
    assert original.journal == other.journal
    assert original.stdout == other.stdout
    # The pod log may say a record was skipped (the report lists the log as not covered); nothing else differs.
    extra = [line for line in other.stderr if line not in original.stderr]
    assert all("skipped" in line for line in extra), extra
    assert [line for line in original.stderr if line not in other.stderr] == []


def test_the_masked_fields_really_are_the_dp_releases(runs: dict[str, Emitted]) -> None:
    """The masks hide only DP numbers: the released values are present, and the unmasked rest is not empty."""
    original = runs["D"]
    assert original.termination["epsilon"] <= 4.0
    assert original.report[".guarantee.epsilon"] == original.termination["epsilon"]
    assert "<dp> (released with DP)" in original.stdout
    assert "ε spent" in original.stdout
    assert len(original.journal) > 2
