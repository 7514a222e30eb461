"""Reports of a federation: each site's ``privacy-report.json`` (the engine's report of what that site's journal
charged, with the federation's part added) and the coordinator's ``federation-report.json``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from dptrain.events import TrainingResult
from dptrain.federated.config import ServerConfig, SiteConfig, site_training_job
from dptrain.federated.site import SiteState
from dptrain.journal import JOURNAL_NAME, PrivacyJournal, atomic_write
from dptrain.plan import TrainingPlan
from dptrain.report import ReportWriter, format_up

__all__ = ["FEDERATION_REPORT_NAME", "write_federation_report", "write_site_report"]

FEDERATION_REPORT_NAME: Final = "federation-report.json"


def write_site_report(config: SiteConfig, plan: TrainingPlan, *, output_dir: Path | None = None) -> Path:
    """The site's privacy-report.json: ε composed from ITS journal (every round charged, crashed ones included)."""
    workdir = config.workdir
    journal = PrivacyJournal(workdir / JOURNAL_NAME)
    status = SiteState.read(workdir)
    epsilon = journal.epsilon(plan.delta, plan.accountant)
    out = output_dir or workdir
    out.mkdir(parents=True, exist_ok=True)
    result = TrainingResult(
        plan=plan,
        steps_run=journal.charged_steps,
        epsilon=epsilon,
        journal=journal.entries,
        eval_metrics={},
        history=[],
        clipping_mode=status.clipping_mode or "see the SuperNode log",
        elapsed_seconds=0.0,
        attempts=max(journal.attempts, 1),
        model_path=workdir / "global-model.pt",
        charged_steps=journal.charged_steps,
        charged_releases=journal.charged_releases,
        dataset=config.dataset.metadata.name or "",
    )
    writer = ReportWriter(output_dir=out, termination_path=None, job=site_training_job(config.site, config.dataset))
    path = writer.write_privacy_report(result)
    report: dict[str, Any] = json.loads(path.read_text())
    spec = config.site.spec
    report["federation"] = {
        "federation": spec.federation.to_wire(),
        "site": spec.site_name,
        "fingerprint": config.fingerprint,
        "rounds": spec.training.rounds,
        "localStepsPerRound": spec.training.local_steps,
        "roundsTrained": status.rounds,
        "state": status.state,
        "declaredSize": config.declared_size,
    }
    report["released"] = [
        {
            "what": "this site's model after its local DP-SGD steps, once per round it trained (sent to the "
            "coordinator's SuperLink), and the global model it received (kept: global-model.pt)",
            "protection": f"DP-SGD on this site's training partition: σ={plan.noise_multiplier}, q={plan.sample_rate}, "
            f"{journal.charged_steps} step(s) charged of the {plan.steps} planned (every round charged before it ran)",
        },
        {
            "what": "Gaussian-noised held-out sums (count, correct, clipped loss, score histograms) of the GLOBAL "
            "model, summed by the coordinator over the sites into the global model's DP metric",
            "protection": f"Gaussian mechanism on this site's holdout partition, σ={plan.holdout_noise_multiplier} "
            f"times the sums' L2 sensitivity, {journal.charged_releases} release(s) charged",
        },
        {
            "what": "ε, δ, σ, q, planned and charged steps and releases, rounds trained, the declared size",
            "protection": "public: functions of the public plan and of how many rounds ran (never of the data)",
        },
    ]
    report["guarantee"]["statement"] = (
        f"Everything this site sent to the federation (its model updates in every round, its held-out releases) is "
        f"({format_up(epsilon)}, {plan.delta:g})-differentially private with respect to adding or removing one record "
        "of this site's dataset; ε composes everything this site's privacy journal charged, including rounds that "
        "crashed. Its dataset's PrivacyLedger composes this with every other charge on the same records."
    )
    atomic_write(path, (json.dumps(report, indent=2, allow_nan=False, default=str) + "\n").encode())
    return path


def write_federation_report(config: ServerConfig, status: dict[str, Any], *, path: Path) -> Path:
    """federation-report.json: what the coordinator saw (public numbers and DP releases only)."""
    federation = config.federation
    spec = federation.spec
    report = {
        "schemaVersion": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "federation": {"name": federation.metadata.name, "namespace": federation.metadata.namespace},
        "fingerprint": config.fingerprint,
        "state": status.get("state"),
        "rounds": {"completed": status.get("completed_round"), "total": spec.training.rounds},
        "minSites": spec.min_sites,
        "strategy": spec.strategy,
        "secureAggregation": spec.secure_aggregation.to_wire() if spec.secure_aggregation else None,
        "weights": "FedAvg weights are the PUBLIC declared sizes: sites[].declaredSize, else the numExamples each "
        "site's PrivateDataset declares; never a count of data",
        "sites": status.get("sites", {}),
        "globalMetric": status.get("global_metric") or None,
        "globalMetricHistory": status.get("metric_history", []),
        "roundSeconds": status.get("round_seconds", []),
        "whatTheCoordinatorSees": [
            "each site's model after its local DP-SGD steps (a DP-SGD output of that site's records; with secure "
            "aggregation only their sum)",
            "the Gaussian-noised held-out sums each site releases about a global model (a DP release)",
            "public numbers each site reports: ε charged, steps and releases charged, its plan, its declared size",
            "timing and which sites answered (not DP: a site's round time depends on its batch sizes)",
        ],
        "perSiteGuarantee": "each site's own privacy-report.json (and its dataset's PrivacyLedger) is the record of "
        "its guarantee: sample-level (ε, δ)-DP for adding or removing one of ITS records, over all rounds",
        "error": status.get("error"),
    }
    atomic_write(path, (json.dumps(report, indent=2, allow_nan=False, default=str) + "\n").encode())
    return path
