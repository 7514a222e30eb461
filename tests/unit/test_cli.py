"""The dptrain CLI: exit codes, outputs, signals, and resuming after kill -9."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dptrain.cli import main
from dptrain.journal import JOURNAL_NAME, PrivacyJournal
from dptrain.report import CURVES_NAME, REPORT_NAME
from dptrain_accounting import MechanismSegment, compute_epsilon
from dptrain_api import ExitCode, Mechanism, RunOutcome, TerminationMessage

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPTRAIN_CPU_LIMIT", "1")
    for name in (
        "DPTRAIN_RESERVED_MECHANISM",
        "DPTRAIN_TERMINATION_MESSAGE_PATH",
        "DPTRAIN_JOB_NAME",
        "DPTRAIN_ATTEMPT",
        "DPTRAIN_METRICS_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)


def _job(name: str = "cli-job", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"builtin": "breast-cancer"},
        "model": {"architecture": "logistic"},
        "privacy": {"targetEpsilon": 8.0, "delta": 1e-5, "noiseMultiplier": 2.0},
        "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.5, "seed": 3},
        "checkpoint": {"everySteps": 4},
    }
    spec.update(overrides)
    return {"apiVersion": "dptrain.io/v1alpha1", "kind": "DPTrainingJob", "metadata": {"name": name}, "spec": spec}


def _write(path: Path, *documents: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(documents))
    return path


def _run(tmp_path: Path, manifest: Path, *extra: str) -> tuple[int, Path, Path]:
    output = tmp_path / "out"
    termination = tmp_path / "termination-log"
    code = main(
        [
            "run",
            str(manifest),
            "--output",
            str(output),
            "--quiet",
            "--termination-message-path",
            str(termination),
            *extra,
        ]
    )
    return code, output, termination


def test_run_writes_model_report_curves_and_termination_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output, termination = _run(tmp_path, _write(tmp_path / "job.yaml", _job()))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    message = json.loads(termination.read_text())
    assert len(termination.read_bytes()) <= 4096
    assert message["status"] == "Succeeded"
    journal = PrivacyJournal(output / JOURNAL_NAME)
    assert message["epsilon"] == journal.epsilon(1e-5, "pld") <= 8.0
    assert message["chargedSteps"] == message["plannedSteps"] == message["stepsRun"] == journal.charged_steps
    assert message["journalEntries"] == len(journal.entries)
    assert message["segments"] == [{"noiseMultiplier": 2.0, "sampleRate": 64 / 456, "steps": journal.charged_steps}]
    assert message["evalMetric"] == "accuracy"
    assert "auc" in message["evalMetrics"]
    report = json.loads((output / REPORT_NAME).read_text())
    assert report["guarantee"]["epsilon"] == message["epsilon"]
    assert report["guarantee"]["withinTarget"] is True
    assert set(report["guarantee"]["epsilonAtOtherDeltas"]) == {"1e-06", "1e-07"}
    assert report["guarantee"]["epsilonAtOtherDeltas"]["1e-07"] > message["epsilon"]
    assert report["accountant"]["name"] == "pld"
    assert report["accountant"]["discretization"]["pessimistic"]
    assert report["mechanism"]["noiseMultiplier"] == 2.0
    assert "Poisson" in report["mechanism"]["sampling"]
    assert report["dataset"]["declaredTrainingExamples"] == 456  # public: from the declared size
    assert report["guarantee"]["epsilon"] == max(
        report["guarantee"]["epsilonTrainingPartition"], report["guarantee"]["epsilonHoldoutPartition"]
    )
    assert "add or remove one record" in report["guarantee"]["neighbouringRelation"]
    released = " ".join(item["what"] for item in report["released"])
    assert "held-out accuracy" in released
    assert "training loss" not in released
    assert "breast-cancer" in report["dataset"]["countSource"]
    assert len(report["journal"]["entries"]) == len(journal.entries)
    assert any("timing" in item for item in report["notCovered"])
    assert "ChaCha20" in report["randomness"]
    assert {"torch", "opacus", "dp-accounting"} <= set(report["software"])
    assert (output / CURVES_NAME).read_bytes().startswith(b"\x89PNG")
    torch.load(output / "model.pt", weights_only=True)
    assert "ε spent" in captured.out
    assert "clipping" in captured.out


def test_bad_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _job()
    del broken["spec"]["privacy"]
    code, _, termination = _run(tmp_path, _write(tmp_path / "job.yaml", broken))
    err = capsys.readouterr().err
    assert code == 2
    assert "privacy" in err
    assert "Traceback" not in err
    assert json.loads(termination.read_text())["status"] == "Failed"
    (tmp_path / "garbage.yaml").write_text("{not: [valid")
    assert _run(tmp_path, tmp_path / "garbage.yaml")[0] == 2
    assert main(["run", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    assert main(["frobnicate"]) == 2


def test_missing_private_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _write(tmp_path / "job.yaml", _job(dataset={"datasetRef": {"name": "wards"}}))
    assert _run(tmp_path, manifest)[0] == 2
    assert "no PrivateDataset" in capsys.readouterr().err


def _private_dataset(num_examples: int) -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "PrivateDataset",
        "metadata": {"name": "wards"},
        "spec": {
            "source": {
                "file": {
                    "claimName": "ward-data",
                    "path": "wards.csv",
                    "labelColumn": "died",
                    "features": [{"name": "age", "min": 0, "max": 120}, {"name": "bp", "min": 40, "max": 250}],
                }
            },
            "numExamples": num_examples,
            "budget": {"epsilon": 10},
        },
    }


def test_bad_data_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "wards.csv").write_text("age,heart_rate,died\n30,100,0\n")  # no `bp` column: the file's schema
    job = _job(dataset={"datasetRef": {"name": "wards"}}, training={"epochs": 1, "batchSize": 8})
    manifest = _write(tmp_path / "job.yaml", job, _private_dataset(num_examples=60))
    code, _, termination = _run(tmp_path, manifest)
    err = capsys.readouterr().err
    assert code == 3
    assert "lacks column(s) ['bp']" in err
    assert "Traceback" not in err
    assert json.loads(termination.read_text())["reason"] == "DataError"


def test_a_true_count_other_than_the_declared_one_trains_and_says_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The true number of records is private: never checked against numExamples, never reported."""
    rows = "\n".join(f"{30 + i},{100 + i},{i % 2}" for i in range(50))
    (tmp_path / "wards.csv").write_text("age,bp,died\n" + rows + "\n")
    job = _job(dataset={"datasetRef": {"name": "wards"}}, training={"epochs": 1, "batchSize": 8})
    manifest = _write(tmp_path / "job.yaml", job, _private_dataset(num_examples=60))  # declares 60, file has 50
    code, output, termination = _run(tmp_path, manifest)
    assert code == 0, capsys.readouterr().err
    text = termination.read_text() + (output / REPORT_NAME).read_text()
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z?", "<time>", text)  # timestamps may contain :10, :40, :50
    assert not re.search(r"\b(50|40|10)\b", text)  # no count of records (training or held-out)


def test_file_dataset_trains_relative_to_the_manifest_or_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "claim"
    data_dir.mkdir()
    rows = "\n".join(f"{30 + i % 60},{100 + (i * 7) % 90},{int(i % 60 > 30)}" for i in range(200))
    (data_dir / "wards.csv").write_text("age,bp,died\n" + rows + "\n")
    job = _job(
        dataset={"datasetRef": {"name": "wards"}},
        privacy={"targetEpsilon": 8.0, "delta": 1e-4, "noiseMultiplier": 2.0},
        training={"epochs": 1, "batchSize": 16},
    )
    manifest = _write(tmp_path / "job.yaml", job, _private_dataset(num_examples=200))
    code, _, termination = _run(tmp_path, manifest, "--data-dir", str(data_dir))
    assert code == 0
    message = json.loads(termination.read_text())
    assert message["sampleRate"] == 16 / 160  # from the declared size, 200 records with 40 held out
    assert message["evalMetric"] == "auc"


_HOLDOUT = {"noiseMultiplier": 10.0, "sampleRate": 1.0, "steps": 4}


def test_reserved_mechanism_mismatch_exits_2_and_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "DPTRAIN_RESERVED_MECHANISM",
        json.dumps({"train": {"noiseMultiplier": 2.0, "sampleRate": 0.2, "steps": 50}, "holdout": _HOLDOUT}),
    )
    code, output, termination = _run(tmp_path, _write(tmp_path / "job.yaml", _job()))
    assert code == 2
    assert "reserved q" in capsys.readouterr().err
    assert not (output / JOURNAL_NAME).exists()  # nothing journaled, nothing charged
    message = json.loads(termination.read_text())
    assert message["status"] == "Failed"
    assert message["reason"] == "PlanMismatchError"
    assert message["chargedSteps"] == 0  # a first attempt without a journal has charged nothing
    assert message["epsilon"] == 0.0
    monkeypatch.setenv("DPTRAIN_ATTEMPT", "2")  # on a retry a missing journal proves nothing
    assert _run(tmp_path, tmp_path / "job.yaml")[0] == 2
    message = json.loads(termination.read_text())
    assert "chargedSteps" not in message
    assert "epsilon" not in message


def test_reserved_mechanism_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reserved = {"train": {"noiseMultiplier": 2.5, "sampleRate": 64 / 456, "steps": 100}, "holdout": _HOLDOUT}
    monkeypatch.setenv("DPTRAIN_RESERVED_MECHANISM", json.dumps(reserved))
    code, output, termination = _run(tmp_path, _write(tmp_path / "job.yaml", _job()))
    assert code == 0
    entries = PrivacyJournal(output / JOURNAL_NAME).entries
    assert {e["noiseMultiplier"] for e in entries if e["partition"] == "train"} == {2.5}
    assert {e["noiseMultiplier"] for e in entries if e["partition"] == "holdout"} == {10.0}
    assert json.loads(termination.read_text())["noiseMultiplier"] == 2.5


def test_another_jobs_output_dir_exits_5_without_borrowing_its_epsilon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, _write(tmp_path / "one.yaml", _job("job-one")))[0] == 0
    code, output, termination = _run(tmp_path, _write(tmp_path / "two.yaml", _job("job-two")))
    assert code == 5
    assert "holds a different job; use a new --output" in capsys.readouterr().err
    message = json.loads(termination.read_text())
    assert message["reason"] == "CheckpointError"
    assert "epsilon" not in message  # the journal there is job-one's, not ours
    assert PrivacyJournal(output / JOURNAL_NAME).attempts == 1


def test_manifest_from_env_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_MANIFEST", json.dumps(_job("from-env")))
    termination = tmp_path / "t1"
    args = ["run", "--from-env", "JOB_MANIFEST", "--quiet", "--termination-message-path", str(termination)]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert json.loads(termination.read_text())["status"] == "Succeeded"
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(yaml.safe_dump(_job("from-stdin"))))
    assert main(["run", "-", "--quiet", "--output", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "model.pt").exists()
    assert main(["run", "--from-env", "NOT_SET_ANYWHERE", "--quiet"]) == 2


def test_default_output_dir_is_runs_job_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "job.yaml", _job("named-run"))
    assert main(["run", "job.yaml", "--quiet"]) == 0
    assert (tmp_path / "runs" / "named-run" / "model.pt").exists()


def test_epsilon_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000", "--delta", "1e-5"])
        == 0
    )
    expected = compute_epsilon([MechanismSegment(1.0, 0.01, 1000)], delta=1e-5)
    assert float(capsys.readouterr().out) == pytest.approx(expected, rel=1e-5)
    argv = ["epsilon", "--dataset-size", "1000", "--batch-size", "10", "--epochs", "10", "--delta", "1e-5"]
    assert main([*argv, "--noise-multiplier", "1.0", "--accountant", "rdp", "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["steps"] == 1000
    assert output["sampleRate"] == 0.01
    assert output["accountant"] == "rdp"
    assert output["epsilon"] == compute_epsilon([MechanismSegment(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp")
    assert main([*argv, "--target-epsilon", "2.0", "--json"]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["epsilon"] <= 2.0
    assert main(["epsilon", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"]) == 2  # neither σ nor target
    assert main(["epsilon", "--noise-multiplier", "1", "--delta", "1e-5"]) == 2  # neither q/T nor N/B/E
    assert (
        main(
            [
                "epsilon",
                "--sample-rate",
                "0.01",
                "--steps",
                "9",
                "--noise-multiplier",
                "1",
                "--delta",
                "1e-5",
                "--accountant",
                "gdp",
            ]
        )
        == 2
    )  # never GDP


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _write(tmp_path / "job.yaml", _job(privacy={"targetEpsilon": 3.0, "delta": 1e-5}))
    assert main(["plan", str(manifest), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["plannedEpsilon"] <= 3.0
    assert plan["sampleRate"] == 64 / 456
    assert plan["steps"] == 8
    assert plan["examples"] == 569
    assert main(["plan", str(manifest)]) == 0
    assert "planned ε" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_termination_message_is_cut_to_4096_bytes() -> None:
    message = TerminationMessage(
        status=RunOutcome.FAILED,
        exit_code=ExitCode.INVALID_DATA,
        epsilon=1.5,
        charged_steps=120,
        journal_entries=5000,
        segments=[Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=i) for i in range(500)],
        error="x" * 10000,
    )
    text = message.to_text()
    assert len(text.encode()) <= 4096
    parsed = TerminationMessage.parse(text)
    assert parsed is not None
    assert parsed.epsilon == 1.5
    assert parsed.charged_steps == 120
    assert parsed.status == RunOutcome.FAILED
    assert parsed.journal_entries == 5000
    assert parsed.segments == []  # dropped first
    assert parsed.error is not None
    assert parsed.error.startswith("xxx")
    assert TerminationMessage.parse('{"version": 99, "status": "Failed", "exitCode": 1}') is None
    assert TerminationMessage.parse("not json") is None


# --- subprocess tests: signals and kill -9 ----------------------------------------------------------------


def _slow_manifest(tmp_path: Path) -> Path:
    job = _job(
        "resume-job",
        privacy={"targetEpsilon": 3.0, "delta": 1e-5},
        training={"epochs": 10, "batchSize": 32, "learningRate": 0.5, "seed": 5},
        checkpoint={"everySteps": 5},
    )
    return _write(tmp_path / "job.yaml", job)


def _command(manifest: Path, output: Path, termination: Path) -> list[str]:
    return [sys.executable, "-m", "dptrain.cli", "run", str(manifest), "--output", str(output), "--quiet",
            "--termination-message-path", str(termination)]  # fmt: skip


def _environment_for_child() -> dict[str, str]:
    return {**os.environ, "DPTRAIN_CPU_LIMIT": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_charges(journal_path: Path, process: subprocess.Popen[str], steps: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early with {process.returncode}: {process.communicate()}")
        try:
            charged = PrivacyJournal(journal_path).charged_steps
        except Exception:
            charged = 0
        if charged >= steps:
            return charged
        time.sleep(0.02)
    raise AssertionError("the trainer did not charge enough steps in time")


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path: Path) -> None:
    manifest = _slow_manifest(tmp_path)
    env = _environment_for_child()

    clean_output, clean_termination = tmp_path / "clean", tmp_path / "clean-termination"
    clean = subprocess.run(_command(manifest, clean_output, clean_termination), env=env, capture_output=True, text=True,
                           timeout=300, check=False)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    uninterrupted = json.loads(clean_termination.read_text())

    output, termination = tmp_path / "out", tmp_path / "termination"
    process = subprocess.Popen(_command(manifest, output, termination), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_charges(output / JOURNAL_NAME, process, 15)
    time.sleep(random.uniform(0.0, 1.0))  # a random moment, usually mid-chunk
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    charged_at_kill = PrivacyJournal(output / JOURNAL_NAME).charged_steps

    resumed = subprocess.run(_command(manifest, output, termination), env=env, capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr
    step = int(resumed.stderr.split("resumed from step ")[1].split()[0])
    assert 0 <= step <= charged_at_kill
    final = json.loads(termination.read_text())
    journal = PrivacyJournal(output / JOURNAL_NAME)
    plan_steps = uninterrupted["plannedSteps"]
    assert journal.charged_steps <= plan_steps
    assert final["chargedSteps"] == journal.charged_steps
    assert final["epsilon"] == journal.epsilon(1e-5, "pld")
    assert final["epsilon"] >= uninterrupted["epsilon"]
    assert final["epsilon"] <= 3.0
    assert final["attempts"] == 2
    assert final["stepsRun"] <= plan_steps
    assert final["stepsRun"] == step + (journal.charged_steps - charged_at_kill)
    torch.load(output / "model.pt", weights_only=True)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(tmp_path: Path) -> None:
    manifest = _slow_manifest(tmp_path)
    output, termination = tmp_path / "out", tmp_path / "termination"
    env = _environment_for_child()
    process = subprocess.Popen(_command(manifest, output, termination), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_charges(output / JOURNAL_NAME, process, 10)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by a signal" in stderr
    assert "Traceback" not in stderr
    message = json.loads(termination.read_text())
    assert message["status"] == "Interrupted"
    assert message["exitCode"] == 143
    journal = PrivacyJournal(output / JOURNAL_NAME)
    assert message["epsilon"] == journal.epsilon(1e-5, "pld")
    assert message["chargedSteps"] == journal.charged_steps
    stopped_at = message["stepsRun"]

    resumed = subprocess.run(_command(manifest, output, termination), env=env, capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped_at}" in resumed.stderr
    final = json.loads(termination.read_text())
    assert final["status"] == "Succeeded"
    assert final["epsilon"] <= 3.0
    assert final["chargedSteps"] == final["plannedSteps"]


def test_only_dptrains_own_error_text_leaves_the_pod() -> None:
    """A crash inside a library may quote data: the termination message (the job's status) gets its type only."""
    from dptrain.errors import DataError
    from dptrain.report import public_error

    schema = "data file x.csv lacks column(s) ['age']"
    assert public_error(DataError(schema)) == schema
    leaked = public_error(RuntimeError("tensor([4711.0, 12.3]) is not finite"))
    assert "4711" not in leaked
    assert "RuntimeError" in leaked
