"""The auditor's test: train on D and on D plus one record; everything the job emits that is not a DP release
(or timing, which the report lists as not covered) must be identical.

D + outlier: one extra valid record at the edge of the feature bounds. D + unusable: one extra record with a
non-numeric value, which is skipped; only the pod log (steward-only, listed as not covered) may say so. Then one
line of each kind that a whole-file CSV parser lets change how the OTHER lines are read (issue 19): an unmatched
quote, a quote that closes on a later line, a Latin-1 byte in a free-text column, an extra field on the first data
line. Last, crafted pretrained weights that overflow the logit of exactly one record: with and without it.
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


def _run(folder: Path, records: list[str | bytes], *, pretrained: Path | None = None, units: bool = False) -> Emitted:
    """One ``dptrain run``; ``units``: the records start with a patient id and the dataset's unit is the patient."""
    folder.mkdir()
    lines = [record if isinstance(record, bytes) else record.encode() for record in records]
    header = b"patient,age,bp,notes,died\n" if units else b"age,bp,notes,died\n"
    (folder / "wards.csv").write_bytes(header + b"".join(line + b"\n" for line in lines))
    job = {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"name": "audit"},
        "spec": {
            "dataset": {"datasetRef": {"name": "wards"}},
            "model": {"architecture": "logistic", **({"pretrainedWeights": str(pretrained)} if pretrained else {})},
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
            **({"privacyUnit": {"column": "patient", "maxRecordsPerUnit": 4}, "numUnits": 100} if units else {}),
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


def _records() -> list[str]:
    generator = random.Random(1)
    notes = ["stable", '"seen by ""Dr. A"", then discharged"', "", '"transferred, ward 3"']
    return [
        f"{generator.randint(20, 90)},{generator.randint(60, 200)},{generator.choice(notes)},{generator.randint(0, 1)}"
        for _ in range(300)
    ]


def _crafted_weights(folder: Path) -> Path:
    """Finite weights for the logistic model on (age, bp) scaled to [0, 1]: the logit overflows float32 (inf) only
    for a record at both upper bounds; every record of D stays below (age ≤ 90, bp ≤ 200)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "crafted.pt"
    state = {
        "1.weight": torch.tensor([[1.0e38, 1.0e38], [0.0, 0.0]]),
        "1.bias": torch.tensor([1.5e38, 0.0]),
    }
    torch.save(state, path)
    return path


MALFORMED: dict[str, tuple[int, bytes]] = {
    "D+unmatched-quote": (150, b'70,140,"never closed,1'),
    "D+quote-closing-later": (40, b'70,140,"the note goes on'),  # a quoted note of D closes it, lines later
    "D+latin-1-free-text": (150, b"70,140,caf\xe9 au lait,1"),
    "D+extra-field-on-the-first-line": (0, b"70,140,stable,1,surplus"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Emitted]:
    records: list[str | bytes] = [*_records()]
    root = tmp_path_factory.mktemp("neighbours")
    emitted = {
        "D": _run(root / "d", records),
        "D+outlier": _run(root / "outlier", [*records, "120,250,,1"]),
        "D+unusable": _run(root / "unusable", [*records, "n/a,250,,1"]),
    }
    for name, (position, line) in MALFORMED.items():
        emitted[name] = _run(root / name, [*records[:position], line, *records[position:]])
    patients = [f"P{index // 3:03d},{record}" for index, record in enumerate(records)]  # 100 patients, 3 rows each
    many_rows = [f"P999,{20 + visit},{60 + visit},,1" for visit in range(8)]  # one more patient: 8 rows (k = 4)
    emitted["patients D"] = _run(root / "patients", patients, units=True)
    emitted["patients D+one with 8 rows"] = _run(root / "patients+1", [*patients, *many_rows], units=True)
    crafted = _crafted_weights(root / "weights")
    emitted["D, crafted weights"] = _run(root / "crafted", records, pretrained=crafted)
    emitted["D+overflowing, crafted weights"] = _run(root / "overflow", [*records, "120,250,,1"], pretrained=crafted)
    return emitted


@pytest.mark.parametrize(
    ("base", "neighbour"),
    [
        ("D", "D+outlier"),
        ("D", "D+unusable"),
        *(("D", name) for name in MALFORMED),
        ("D, crafted weights", "D+overflowing, crafted weights"),
        ("patients D", "patients D+one with 8 rows"),
    ],
)
def test_a_neighbouring_dataset_changes_nothing_but_the_dp_releases(
    runs: dict[str, Emitted], base: str, neighbour: str
) -> None:
    original, other = runs[base], runs[neighbour]
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


def test_the_crafted_weights_overflow_exactly_the_extra_record(tmp_path: Path) -> None:
    import torch

    from dptrain.models import build_model
    from dptrain_api.job import ModelSpec

    spec = ModelSpec(architecture="logistic", pretrained_weights=str(_crafted_weights(tmp_path)))
    model, _ = build_model(spec, input_shape=(2,), num_classes=2)
    scaled = [[(int(r.split(",")[0]) - 0) / 120, (int(r.split(",")[1]) - 40) / 210] for r in _records()]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor(scaled))).all()  # every record of D
        assert not torch.isfinite(model(torch.tensor([[1.0, 1.0]]))).all()  # the one at both bounds


def test_the_patient_run_states_the_patient_relation(runs: dict[str, Emitted]) -> None:
    report = runs["patients D"].report
    assert report[".guarantee.privacyUnit"] == "individual (patient, ≤4 records)"
    assert "add or remove one individual" in report[".guarantee.neighbouringRelation"]
    assert report[".dataset.declaredTrainingExamples"] == 80  # individuals: 100 declared, 20 % held out


def test_the_patient_runs_epsilon_is_dp_accountings_for_unit_level_q(runs: dict[str, Emitted]) -> None:
    """The oracle: Google's dp_accounting on (q = batch / training individuals, σ, T) as the journal charged them."""
    from tests.support.federation import independent_epsilon

    emitted = runs["patients D"]
    intents = [entry for entry in emitted.journal if entry.get("type") == "intent"]
    train = [entry for entry in intents if entry.get("partition", "train") == "train"]
    assert {entry["sampleRate"] for entry in train} == {32 / 80}  # batchSize 32 over 80 training individuals
    reference = independent_epsilon(intents, 1e-4)
    assert reference <= emitted.termination["epsilon"] <= reference * 1.001 + 1e-4
