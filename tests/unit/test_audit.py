"""The privacy audit through the job's own pipeline: it has power (noise and clipping off), it does not contradict
the real settings, it catches a pipeline that adds a tenth of the claimed noise, and it never touches private data
or any ledger. Canaries: 1000 per kind (as in CI); each run takes a few seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dptrain import cli
from dptrain.audit import AUDIT_REPORT_NAME, AuditSettings, run_audit
from dptrain.audit import pipeline as audit_pipeline
from dptrain.audit.canaries import GradientProbe
from dptrain.dpsgd import make_private_training
from dptrain.errors import AuditError
from dptrain.models import build_model
from dptrain.plan import make_plan
from dptrain_api import AuditSpec, DPTrainingJob, ExitCode

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPTRAIN_CPU_LIMIT", "1")


def _example(name: str) -> cli.LoadedManifest:
    return cli.load_job_manifest(str(EXAMPLES / f"{name}.yaml"))


def _tenth_of_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberately broken pipeline: the optimizer adds σ/10 while the plan (and the claim) keep σ."""
    honest = audit_pipeline.make_job_private

    def broken(job: DPTrainingJob, plan: Any, model: Any, **kwargs: Any) -> Any:
        return honest(job, plan, model, **{**kwargs, "noise_multiplier": plan.noise_multiplier / 10})

    monkeypatch.setattr(audit_pipeline, "make_job_private", broken)


def test_without_noise_and_clipping_the_audit_finds_a_large_epsilon() -> None:
    loaded = _example("breast-cancer-logistic")
    result = run_audit(loaded.job, settings=AuditSettings(canaries=1000, kind="both", private=False, seed=1))
    assert result.noise_multiplier == 0.0
    assert result.max_grad_norm == audit_pipeline.NON_PRIVATE_CLIP
    assert result.best is not None
    assert result.best.correct == result.best.guesses == 1000  # every gradient canary guessed right
    assert result.epsilon_lower_bound > 4.5  # about the most 1000 canaries can show at 95 % (14 rules)
    assert (
        result.epsilon_lower_bound
        > run_audit(loaded.job, settings=AuditSettings(canaries=50, seed=1)).plan.target_epsilon
    )
    assert not result.contradicted  # nothing is claimed without noise


@pytest.mark.parametrize("example", ["breast-cancer-logistic", "digits-cnn"])
def test_with_the_jobs_real_settings_the_audit_does_not_contradict_the_claim(example: str) -> None:
    loaded = _example(example)
    result = run_audit(loaded.job, dataset=loaded.dataset, settings=AuditSettings(canaries=1000, kind="both", seed=2))
    assert result.clipping_mode == {"breast-cancer-logistic": "bookkeeping", "digits-cnn": "bookkeeping"}[example]
    assert result.noise_multiplier == result.plan.noise_multiplier
    assert result.noisy_steps == result.plan.steps
    assert 0.0 <= result.epsilon_lower_bound <= result.claimed_epsilon <= result.plan.target_epsilon
    assert not result.contradicted
    assert [kind.kind for kind in result.kinds] == ["gradient", "input"]
    assert all(kind.canaries == 1000 and 400 < kind.included < 600 for kind in result.kinds)


def test_a_pipeline_adding_a_tenth_of_the_claimed_noise_is_caught(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tenth_of_the_noise(monkeypatch)
    code = cli.main(
        [
            "audit",
            str(EXAMPLES / "breast-cancer-logistic.yaml"),
            "--output",
            str(tmp_path),
            "--canaries",
            "1000",
            "--kind",
            "gradient",
            "--seed",
            "3",
        ]
    )
    report = json.loads((tmp_path / AUDIT_REPORT_NAME).read_text())
    assert code == ExitCode.AUDIT_CONTRADICTED
    claimed_sigma = make_plan(_example("breast-cancer-logistic").job).noise_multiplier
    assert report["pipeline"]["noiseMultiplier"] == pytest.approx(claimed_sigma / 10)
    assert report["contradicted"] is True
    assert report["epsilonLowerBound"] > report["epsilon"] == pytest.approx(3.0, abs=0.01)
    assert "NOT as private as claimed" in capsys.readouterr().out


def test_the_cli_writes_only_its_report_and_charges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    manifest = EXAMPLES / "breast-cancer-logistic.yaml"
    code = cli.main(["audit", str(manifest), "--output", str(output), "--canaries", "200", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [AUDIT_REPORT_NAME]  # no journal, no checkpoint
    report = json.loads((output / AUDIT_REPORT_NAME).read_text())
    assert printed["epsilonLowerBound"] == report["epsilonLowerBound"]
    assert report["numCanaries"] == 400
    assert 0 <= report["numCorrect"] <= report["numGuesses"] <= 200
    assert report["epsilon"] == pytest.approx(3.0, abs=0.01)
    assert report["delta"] == 1e-5
    assert report["confidence"] == 0.95
    assert report["rules"] == 14
    assert report["data"]["source"] == "public"
    assert sum(len(kind["rules"]) for kind in report["canaries"]) == report["rules"]


def test_a_private_datasets_file_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the audit read the PrivateDataset's file")

    monkeypatch.setattr("dptrain.data.load_file", forbidden)
    monkeypatch.setattr("dptrain.data._read_columns", forbidden)
    loaded = _example("csv-private-dataset")
    with pytest.raises(AuditError, match="never trains on them") as caught:
        run_audit(loaded.job, dataset=loaded.dataset, settings=AuditSettings(canaries=50, data="public"))
    assert caught.value.exit_code == ExitCode.INVALID_CONFIGURATION
    result = run_audit(loaded.job, dataset=loaded.dataset, settings=AuditSettings(canaries=100, kind="gradient"))
    assert result.data_source == "synthetic"
    assert result.records == result.plan.train_size  # the declared (public) size, never the file's
    assert not result.contradicted


def test_settings_come_from_spec_audit_and_flags_override() -> None:
    job = _example("breast-cancer-logistic").job
    assert cli.audit_settings(job) == AuditSettings()
    audited = job.model_copy(deep=True)
    audited.spec.audit = AuditSpec(canaries=300, kind="input")
    assert cli.audit_settings(audited) == AuditSettings(canaries=300, kind="input")
    args = cli.build_parser().parse_args(["audit", "x.yaml", "--kind", "gradient", "--non-private", "--seed", "4"])
    assert cli.audit_settings(audited, args) == AuditSettings(canaries=300, kind="gradient", private=False, seed=4)
    for bad in ({"canaries": 1}, {"kind": "both-ways"}, {"confidence": 1.0}):
        with pytest.raises(AuditError):
            AuditSettings(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_the_probe_is_noised_by_the_optimizer_itself(mode: str) -> None:
    """Every clipping mode's own noise draw noises the probe: N(0, σ²C²) per step, plus C per sampled canary."""
    sigma, clip, steps, size = 2.0, 0.5, 60, 400
    job = _example("breast-cancer-logistic").job
    model, _ = build_model(job.spec.model, input_shape=(30,), num_classes=2)
    private = make_private_training(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=8,
        physical_batch_size=4,
        noise_generator=torch.Generator().manual_seed(0),
        secure_noise=False,
        clipping_mode=mode,
    )
    probe = GradientProbe(private.optimizer, size=size, device=torch.device("cpu"))
    features, labels = torch.rand(8, 30), torch.randint(0, 2, (8,))
    for _ in range(steps):
        probe.sample(torch.tensor([0, 0, 1]) if _ % 2 == 0 else torch.tensor([], dtype=torch.int64))
        private.step(features, labels)  # two micro-batches: the probe is noised once, at the last
    assert probe.noisy_steps == private.steps_taken == steps
    noise = probe.scores[2:]
    assert float(noise.std()) == pytest.approx(sigma * clip * math.sqrt(steps), rel=0.1)
    assert abs(float(noise.mean())) < 4 * sigma * clip * math.sqrt(steps / (size - 2))
    assert float(probe.scores[1]) == pytest.approx(clip * steps / 2, abs=5 * sigma * clip * math.sqrt(steps))


def _audited_job(tmp_path: Path) -> Path:
    job = {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"name": "audited"},
        "spec": {
            "dataset": {"builtin": "breast-cancer"},
            "model": {"architecture": "logistic"},
            "privacy": {"targetEpsilon": 8.0, "noiseMultiplier": 2.0},
            "training": {"epochs": 1, "batchSize": 64, "seed": 3},
            "checkpoint": {"everySteps": 4},
            "audit": {"canaries": 200, "kind": "gradient"},
        },
    }
    manifest = tmp_path / "job.yaml"
    manifest.write_text(json.dumps(job))
    return manifest


def _run(tmp_path: Path, manifest: Path) -> tuple[int, dict[str, Any]]:
    termination = tmp_path / "termination-log"
    code = cli.main(
        [
            "run",
            str(manifest),
            "--output",
            str(tmp_path / "out"),
            "--quiet",
            "--termination-message-path",
            str(termination),
        ]
    )
    return code, json.loads(termination.read_text())


def test_dptrain_run_audits_after_training_when_the_job_asks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dptrain.journal import JOURNAL_NAME, PrivacyJournal

    for name in ("DPTRAIN_RESERVED_MECHANISM", "DPTRAIN_ATTEMPT", "DPTRAIN_TERMINATION_MESSAGE_PATH"):
        monkeypatch.delenv(name, raising=False)
    code, message = _run(tmp_path, _audited_job(tmp_path))
    assert code == 0
    report = json.loads((tmp_path / "out" / AUDIT_REPORT_NAME).read_text())
    assert message["auditEpsilonLowerBound"] == report["epsilonLowerBound"]
    assert message["auditEpsilon"] == report["epsilon"] <= message["epsilon"]
    assert message["auditConfidence"] == 0.95
    assert report["numCanaries"] == 200
    journal = PrivacyJournal(tmp_path / "out" / JOURNAL_NAME)
    assert journal.charged_steps == message["plannedSteps"]  # the audit charged nothing
    assert message["epsilon"] == journal.epsilon(1e-5, "pld")


def test_a_failed_audit_never_fails_the_trained_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DPTRAIN_RESERVED_MECHANISM", "DPTRAIN_ATTEMPT", "DPTRAIN_TERMINATION_MESSAGE_PATH"):
        monkeypatch.delenv(name, raising=False)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("audit bug")

    monkeypatch.setattr("dptrain.audit.run_audit", broken)
    code, message = _run(tmp_path, _audited_job(tmp_path))
    assert code == 0
    assert message["status"] == "Succeeded"
    assert "auditEpsilonLowerBound" not in message
    assert not (tmp_path / "out" / AUDIT_REPORT_NAME).exists()


def test_the_exporter_serves_the_audit_only_once_one_ran() -> None:
    from dptrain.metrics import PrometheusExporter

    exporter = PrometheusExporter(labels={"job": "j", "namespace": "n"})

    def value(name: str) -> float | None:
        sample: float | None = exporter.registry.get_sample_value(name, {"job": "j", "namespace": "n"})
        return sample

    assert value("dptrain_audit_epsilon_lower_bound") is None
    exporter.on_audit(epsilon_lower_bound=0.7, epsilon=2.9)
    assert value("dptrain_audit_epsilon_lower_bound") == 0.7
    assert value("dptrain_audit_epsilon") == 2.9


def test_the_distributed_path_is_audited_and_keeps_its_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """processes=2: the DP-SGD steps run on two gloo ranks (keyed shards, all-reduced clipped sums, noise once on
    rank 0). Honest: no contradiction; with a tenth of the noise on that path, caught."""
    loaded = _example("breast-cancer-logistic")
    settings = AuditSettings(canaries=1000, kind="gradient", seed=4, processes=2)
    honest = run_audit(loaded.job, settings=settings)
    assert honest.noisy_steps == honest.plan.steps
    assert 0.0 <= honest.epsilon_lower_bound <= honest.claimed_epsilon
    _tenth_of_the_noise(monkeypatch)
    broken = run_audit(loaded.job, settings=settings)
    assert broken.contradicted


def test_poisoned_records_cannot_dominate() -> None:
    """Adversarial records (corners of the feature box, the label the initial model finds least likely: the largest
    loss and gradient a record can bring) are clipped like any other: their audit stays below the claim. (Like input
    canaries, this kind has little power on small models: it is a check, not a strong attack.)"""
    from dptrain.audit.canaries import poisoned_canaries
    from dptrain.models import build_model

    loaded = _example("breast-cancer-logistic")
    result = run_audit(loaded.job, settings=AuditSettings(canaries=500, kind="poisoned", seed=5))
    assert [kind.kind for kind in result.kinds] == ["poisoned"]
    assert 0.0 <= result.epsilon_lower_bound <= result.claimed_epsilon
    assert not result.contradicted
    model, _ = build_model(loaded.job.spec.model, input_shape=(30,), num_classes=2)
    features, labels = poisoned_canaries(50, model=model, input_shape=(30,), rng=np.random.default_rng(0))
    assert set(features.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        assert torch.equal(labels, model(features).argmin(dim=1))  # the least likely class: the worst loss
