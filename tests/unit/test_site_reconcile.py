"""A federation site's reconciler (DPFederatedSite) as a state machine, against an in-memory API: consent, the
reservation of its whole plan, SuperNode attempts and restarts, the coordinator's stop, a replaced journal claim, a
look-alike pod, and deletion. Its ledger entry, never its status, decides what it is charged."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest

from dptrain_api import (
    DPFederatedJob,
    ExitCode,
    LedgerEntry,
    PrivacyLedgerStatus,
    RunOutcome,
    TerminationMessage,
    ledger_name,
    parse_federation_resource,
    source_identity,
)
from dptrain_api.dataset import DatasetSource
from dptrain_operator.context import OperatorContext
from dptrain_operator.handlers.datasets import reconcile_dataset
from dptrain_operator.handlers.sites import SiteState, delete_site, reconcile_site_and_write
from dptrain_operator.render import TRAINER_FINALIZER
from dptrain_operator.render.federation import site_claim_name, site_manifest, supernode_pod_name
from tests.support.fakekube import FakeKube, fake_context

NS = "hospital-a"
LOG = logging.getLogger("test-site-reconcile")
LEDGER = ledger_name(source_identity(NS, DatasetSource(builtin="breast-cancer")))
FEDERATION: dict[str, Any] = {
    "apiVersion": "dptrain.io/v1alpha1",
    "kind": "DPFederatedJob",
    "metadata": {"name": "hospitals", "namespace": "coordinator", "uid": "5d3c7a40-6b1f-4a0e-9c6c-2f1f7a0b9e11"},
    "spec": {
        "data": {"inputShape": [30], "numClasses": 2},
        "privacy": {"targetEpsilon": 2.0, "delta": 1e-5},
        "training": {"rounds": 3, "localSteps": 4, "batchSize": 64},
        "minSites": 1,
        "sites": [{"name": "hospital-a", "namespace": NS, "datasetRef": {"name": "cohort"}, "publicKey": "k"}],
        "superlink": {"tlsSecretName": "superlink-tls"},
    },
}


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def ctx(kube: FakeKube) -> OperatorContext:
    return fake_context(kube)


def _add_dataset(kube: FakeKube, ctx: OperatorContext, *, epsilon: float = 10.0, consent: bool = True) -> None:
    spec: dict[str, Any] = {"source": {"builtin": "breast-cancer"}, "budget": {"epsilon": epsilon, "delta": 1e-5}}
    if consent:
        spec["allowFederations"] = [{"namespace": "coordinator", "name": "hospitals"}]
    metadata = {"name": "cohort", "namespace": NS}
    body = kube.put({"apiVersion": "dptrain.io/v1alpha1", "kind": "PrivateDataset", "metadata": metadata, "spec": spec})
    reconcile_dataset(body, ctx)


def _add_site(kube: FakeKube, ctx: OperatorContext) -> str:
    job = parse_federation_resource(FEDERATION)
    assert isinstance(job, DPFederatedJob)
    manifest = site_manifest(job, job.spec.sites[0], settings=ctx.settings)
    return str(kube.put(manifest)["metadata"]["name"])


def _reconcile(kube: FakeKube, ctx: OperatorContext, name: str) -> SiteState:
    site = kube.get_site(NS, name)
    assert site is not None
    state = reconcile_site_and_write(ctx, NS, name, site["metadata"]["uid"], LOG)
    assert state is not None
    return state


def _status(kube: FakeKube, name: str) -> dict[str, Any]:
    site = kube.get_site(NS, name)
    assert site is not None
    return dict(site.get("status") or {})


def _failed(kube: FakeKube, name: str) -> dict[str, Any]:
    return next(c for c in _status(kube, name)["conditions"] if c["type"] == "Failed")


def _entry(kube: FakeKube) -> LedgerEntry:
    raw = kube.get_ledger(LEDGER)
    assert raw is not None
    [entry] = PrivacyLedgerStatus.model_validate(raw.get("status") or {}).entries
    return entry


def _end(kube: FakeKube, pod: str, code: int, report: TerminationMessage | None = None) -> None:
    terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
    if report is not None:
        terminated["message"] = report.to_text()
    kube.set_pod_status(NS, pod, {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [{"name": "supernode", "state": {"terminated": terminated}}],
    })  # fmt: skip


def _report(charged: int, *, code: int = 0) -> TerminationMessage:
    outcome = RunOutcome.SUCCEEDED if code == 0 else RunOutcome.FAILED
    return TerminationMessage(status=outcome, exit_code=code, epsilon=0.9, charged_steps=charged, charged_releases=3)


def _admitted_site(kube: FakeKube, ctx: OperatorContext) -> str:
    _add_dataset(kube, ctx)
    name = _add_site(kube, ctx)
    _reconcile(kube, ctx, name)
    return name


def test_a_site_without_the_datasets_consent_is_refused_and_reserves_nothing(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    _add_dataset(kube, ctx, consent=False)
    name = _add_site(kube, ctx)
    state = _reconcile(kube, ctx, name)
    assert state.phase == "Failed"
    assert _failed(kube, name)["reason"] == "FederationNotAllowed"
    assert "spec.allowFederations" in _failed(kube, name)["message"]
    raw = kube.get_ledger(LEDGER)
    assert raw is not None
    assert not (raw.get("status") or {}).get("entries")
    assert kube.pods(NS) == []


def test_a_site_reserves_its_whole_plan_and_starts_one_supernode_with_the_finalizer(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    name = _admitted_site(kube, ctx)
    entry = _entry(kube)
    assert (entry.state, entry.kind, entry.federation) == ("Reserved", "DPFederatedSite", "coordinator/hospitals")
    assert entry.train is not None
    assert entry.train.steps == 3 * 4
    [pod] = kube.pods(NS)
    assert pod["metadata"]["name"] == supernode_pod_name(name, 1)
    assert TRAINER_FINALIZER in pod["metadata"]["finalizers"]
    assert kube.get_claim(NS, site_claim_name(name)) is not None
    status = _status(kube, name)
    assert (status["phase"], status["privacy"]["plannedSteps"], status["ledgerName"]) == ("Pending", 12, LEDGER)


def test_a_site_over_its_datasets_budget_is_refused(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx, epsilon=0.5)
    name = _add_site(kube, ctx)
    _reconcile(kube, ctx, name)
    assert _entry(kube).state == "Refused"
    assert (_status(kube, name)["phase"], _failed(kube, name)["reason"]) == ("Failed", "BudgetExceeded")
    assert "budget 0.5" in _failed(kube, name)["message"]
    assert kube.pods(NS) == []


def test_a_failed_supernode_restarts_and_the_site_commits_what_its_journal_charged(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    name = _admitted_site(kube, ctx)
    _end(kube, supernode_pod_name(name, 1), 1, _report(4, code=1))
    _reconcile(kube, ctx, name)
    entry = _entry(kube)
    assert (entry.pods, entry.failed_pods, entry.observed_steps) == (2, 1, 4)
    assert supernode_pod_name(name, 2) in [pod["metadata"]["name"] for pod in kube.pods(NS)]
    # The settled pod's finalizer goes once its end is recorded.
    _reconcile(kube, ctx, name)
    first = kube.get_pod(NS, supernode_pod_name(name, 1))
    assert first is not None
    assert TRAINER_FINALIZER not in first["metadata"].get("finalizers", [])
    _end(kube, supernode_pod_name(name, 2), 0, _report(12))
    state = _reconcile(kube, ctx, name)
    entry = _entry(kube)
    assert (state.phase, entry.state, entry.outcome) == ("Succeeded", "Committed", "Succeeded")
    assert entry.train is not None
    assert entry.train.steps == 12
    assert _status(kube, name)["globalModel"].endswith(":global-model.pt")


def test_a_supernode_failing_past_the_backoff_limit_fails_the_site_charged_as_reported(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    name = _admitted_site(kube, ctx)
    site = kube.objects[("DPFederatedSite", NS, name)]
    site["spec"]["backoffLimit"] = 0
    _end(kube, supernode_pod_name(name, 1), 1, _report(5, code=1))
    _reconcile(kube, ctx, name)
    entry = _entry(kube)
    assert (entry.state, entry.outcome) == ("Committed", "BackoffLimitExceeded")
    assert entry.train is not None
    assert entry.train.steps == 5
    assert _status(kube, name)["phase"] == "Failed"


def test_a_permanent_supernode_exit_is_not_retried(kube: FakeKube, ctx: OperatorContext) -> None:
    name = _admitted_site(kube, ctx)
    code = int(ExitCode.FEDERATION_ABORTED)
    _end(kube, supernode_pod_name(name, 1), code, _report(8, code=code))
    _reconcile(kube, ctx, name)
    assert (_entry(kube).outcome, _entry(kube).pods) == ("FederationAborted", 1)
    assert _failed(kube, name)["reason"] == "FederationAborted"


def test_the_coordinators_stop_waits_for_the_supernode_then_commits_what_it_charged(
    kube: FakeKube, ctx: OperatorContext
) -> None:
    name = _admitted_site(kube, ctx)
    kube.patch_site_spec(NS, name, {"stop": True})
    _reconcile(kube, ctx, name)
    pod = kube.get_pod(NS, supernode_pod_name(name, 1))
    assert pod is not None
    assert pod["metadata"].get("deletionTimestamp")
    assert _entry(kube).state == "Reserved"  # nothing is committed before its journal's word is in
    _end(kube, supernode_pod_name(name, 1), int(ExitCode.TERMINATED), _report(7, code=int(ExitCode.TERMINATED)))
    state = _reconcile(kube, ctx, name)
    entry = _entry(kube)
    assert (state.phase, entry.state, entry.outcome) == ("Failed", "Committed", "SiteStopped")
    assert entry.train is not None
    assert entry.train.steps == 7
    assert kube.get_pod(NS, supernode_pod_name(name, 1)) is None  # its finalizer went: the pod is gone


def test_a_supernode_that_finished_before_the_stop_arrived_succeeds(kube: FakeKube, ctx: OperatorContext) -> None:
    name = _admitted_site(kube, ctx)
    _end(kube, supernode_pod_name(name, 1), 0, _report(12))
    kube.patch_site_spec(NS, name, {"stop": True})
    state = _reconcile(kube, ctx, name)
    assert (state.phase, _entry(kube).outcome) == ("Succeeded", "Succeeded")


def test_a_replaced_journal_claim_fails_the_site_charged_in_full(kube: FakeKube, ctx: OperatorContext) -> None:
    name = _admitted_site(kube, ctx)
    pod = supernode_pod_name(name, 1)
    kube.set_pod_status(NS, pod, {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]})
    claim = kube.get_claim(NS, site_claim_name(name))
    assert claim is not None
    kube.delete_claim(NS, site_claim_name(name))
    kube.put({**claim, "metadata": {**claim["metadata"], "uid": "another"}})  # re-created: empty
    _reconcile(kube, ctx, name)
    _end(kube, pod, int(ExitCode.TERMINATED), _report(3, code=int(ExitCode.TERMINATED)))
    state = _reconcile(kube, ctx, name)
    entry = _entry(kube)
    assert (state.phase, entry.outcome) == ("Failed", "CheckpointLost")
    assert entry.train is not None
    assert entry.train.steps == 12


def test_a_look_alike_supernode_pod_fails_the_site_and_charges_nothing(kube: FakeKube, ctx: OperatorContext) -> None:
    _add_dataset(kube, ctx)
    name = _add_site(kube, ctx)
    metadata = {"name": supernode_pod_name(name, 1), "namespace": NS}
    kube.put({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {"containers": []}})
    state = _reconcile(kube, ctx, name)
    entry = _entry(kube)
    assert (state.phase, entry.state, entry.outcome) == ("Failed", "Committed", "ChildNameTaken")
    assert entry.train is not None
    assert entry.train.steps == 0
    assert "not created for this site" in _failed(kube, name)["message"]


def test_deleting_a_site_waits_for_its_supernode_then_commits_its_charge(kube: FakeKube, ctx: OperatorContext) -> None:
    name = _admitted_site(kube, ctx)
    pod = supernode_pod_name(name, 1)
    kube.set_pod_status(NS, pod, {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]})
    body = kube.get_site(NS, name)
    assert body is not None
    with pytest.raises(kopf.TemporaryError):
        delete_site(body, ctx, LOG)
    assert _entry(kube).state == "Reserved"
    _end(kube, pod, int(ExitCode.TERMINATED), _report(6, code=int(ExitCode.TERMINATED)))
    delete_site(body, ctx, LOG)
    entry = _entry(kube)
    assert (entry.state, entry.outcome) == ("Committed", "Deleted")
    assert entry.train is not None
    assert entry.train.steps == 6
    assert kube.pods(NS) == []
    assert kube.get_claim(NS, site_claim_name(name)) is None
