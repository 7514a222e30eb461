"""Federated training without a cluster (issue 13): the API's rules, the site plan, a site's rounds on dptrain's engine
(journal, replay, refusals, DP releases), the ServerApp's weighting by public sizes, and the rendered pods."""

from __future__ import annotations

import copy
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dptrain.errors import PlanMismatchError, PrivacyBudgetError
from dptrain_accounting import MechanismSegment, compute_epsilon, plan_fixed_steps, plan_mechanism
from dptrain_api import (
    DPFederatedJob,
    FederationReference,
    ManifestError,
    PrivateDataset,
    SuperLinkConnection,
    dataset_allows,
    federation_fingerprint,
    parse_federation_resource,
    site_object,
)
from dptrain_api.federation import federation_reference_of
from tests.support.federation import dataset_manifest, federation_manifest, independent_epsilon, put_hospital_data

pytest.importorskip("flwr", reason="federated training needs the trainer's `federated` extra (Flower)")


def _job(**changes: Any) -> dict[str, Any]:
    sites = [
        {"name": "hospital-a", "namespace": "hospital-a", "datasetRef": {"name": "cohort"}},
        {"name": "hospital-b", "namespace": "hospital-b", "datasetRef": {"name": "cohort"}},
    ]
    document = federation_manifest("hospitals", sites=sites, port=9092)
    document["metadata"]["namespace"] = "coordinator"
    document["spec"].update(changes)
    return document


def _federation(**changes: Any) -> DPFederatedJob:
    job = parse_federation_resource(_job(**changes))
    assert isinstance(job, DPFederatedJob)
    return job


# --- the API ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"superlink": {"port": 9092}}, "tlsSecretName"),  # secure by default: TLS unless insecure
        ({"superlink": {"insecure": True}}, "SuperNode authentication needs TLS"),
        ({"superlink": {"tlsSecretName": "tls"}}, "publicKey"),  # node authentication needs every site's key
        ({"minSites": 3}, "minSites"),
        ({"sites": [{"name": "a", "namespace": "a"}]}, "datasetRef"),
        (
            {
                "sites": [
                    {"name": "a", "namespace": "a", "datasetRef": {"name": "d"}},
                    {"name": "a", "namespace": "b", "datasetRef": {"name": "d"}},
                ],
                "minSites": 1,
            },
            "unique",
        ),
        ({"secureAggregation": {"numShares": 5}}, "numShares"),
        ({"secureAggregation": {}}, "numShares"),  # the default 3 shares need 3 sites (Flower: more than 2)
        ({"secureAggregation": {"numShares": 2, "reconstructionThreshold": 2}}, "numShares"),
    ],
)
def test_a_bad_federation_is_refused_naming_the_field(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_federation_resource(_job(**patch))


def test_a_site_object_carries_the_agreed_settings_and_its_fingerprint_matches() -> None:
    job = _federation()
    reference = federation_reference_of(job)
    assert reference == FederationReference(name="hospitals", namespace="coordinator")
    connection = SuperLinkConnection(address="127.0.0.1:9092", insecure=True)
    site = site_object(job, job.spec.sites[0], superlink=connection)
    assert site.metadata.namespace == "hospital-a"
    assert site.spec.site_name == "hospital-a"
    assert federation_fingerprint(site.spec.federation, site.spec) == federation_fingerprint(reference, job.spec)
    # any change of what sites agree on changes the fingerprint; the round timeout does not
    other = copy.deepcopy(job)
    other.spec.training.round_timeout_seconds = 5.0
    assert federation_fingerprint(reference, other.spec) == federation_fingerprint(reference, job.spec)
    other.spec.privacy.target_epsilon = 8.0
    assert federation_fingerprint(reference, other.spec) != federation_fingerprint(reference, job.spec)
    external = FederationReference(name="hospitals", namespace="elsewhere")
    assert federation_fingerprint(external, job.spec) != federation_fingerprint(reference, job.spec)


def test_consent_names_the_federation_exactly() -> None:
    dataset = parse_federation_resource(
        dataset_manifest(path="a.csv", num_examples=1000, budget=8, allow=[("coordinator", "hospitals")])
    )
    assert isinstance(dataset, PrivateDataset)
    assert dataset_allows(dataset, FederationReference(name="hospitals", namespace="coordinator"))
    assert not dataset_allows(dataset, FederationReference(name="hospitals", namespace="other"))
    assert not dataset_allows(dataset, FederationReference(name="other", namespace="coordinator"))


# --- the site's plan ---------------------------------------------------------------------------------------------


def test_a_site_plans_exactly_rounds_times_local_steps_within_its_target() -> None:
    plan = plan_fixed_steps(
        num_examples=2300, eval_fraction=0.2, batch_size=64, steps=30, target_epsilon=3.0, delta=1e-5, eval_releases=2
    )
    assert plan.steps == 30
    assert plan.sample_rate == 64 / 1840
    assert plan.epsilon <= 3.0
    assert plan.train_epsilon == pytest.approx(3.0, abs=0.01)  # the smallest σ that meets the target
    assert plan.releases == 2
    # the same mechanism plan_mechanism makes when the epochs give those steps
    by_epochs = plan_mechanism(
        num_examples=2300, eval_fraction=0.2, batch_size=64, epochs=30 * 64 / 1840, target_epsilon=3.0, delta=1e-5
    )
    assert (by_epochs.steps, by_epochs.noise_multiplier) == (30, plan.noise_multiplier)


# --- a site's rounds on dptrain's engine (no Flower) --------------------------------------------------------------


def _site_config(tmp_path: Path, **training: Any) -> Any:
    from dptrain.federated.config import SiteConfig

    job = _federation(training={**_job()["spec"]["training"], **training})
    path = put_hospital_data(tmp_path / "data", "hospital-b")
    document = dataset_manifest(path=path, num_examples=2300, budget=8.0, allow=[("coordinator", "hospitals")])
    document["metadata"]["namespace"] = "hospital-b"
    dataset = parse_federation_resource(document)
    assert isinstance(dataset, PrivateDataset)
    site = site_object(job, job.spec.sites[1], superlink=SuperLinkConnection(address="127.0.0.1:1", insecure=True))
    site.metadata.uid = "site-uid"
    return job, SiteConfig(site=site, dataset=dataset, workdir=tmp_path / "site", data_dir=tmp_path / "data")


def _global_state(job: DPFederatedJob) -> dict[str, torch.Tensor]:
    from dptrain.federated.config import ServerConfig
    from dptrain.federated.server_app import initial_state

    return initial_state(ServerConfig(federation=job, out_dir=Path("unused")))


def test_a_site_charges_each_round_before_it_runs_and_never_more_than_its_plan(tmp_path: Path) -> None:
    from dptrain.federated.site import SiteRuntime, initialise_journal, site_plan
    from dptrain.journal import PrivacyJournal

    job, config = _site_config(tmp_path, rounds=2, localSteps=3, evalReleases=1)
    initialise_journal(config, expect_journal=False)
    site = SiteRuntime(config)
    fingerprint = config.fingerprint
    state = _global_state(job)
    # another coordinator's settings: refused, nothing charged
    with pytest.raises(PlanMismatchError, match="differ"):
        site.train_round(round_number=1, global_state=state, release=False, fingerprint="0" * 64)
    journal = PrivacyJournal(config.workdir / "privacy-journal.jsonl")
    assert journal.charged_steps == 0
    first = site.train_round(round_number=1, global_state=state, release=False, fingerprint=fingerprint)
    assert first.sums is None
    assert first.state is not None
    assert not torch.equal(first.state["1.weight"], state["1.weight"])  # DP-SGD moved the model
    assert first.metrics["charged-steps"] == 3
    assert first.metrics["charged-releases"] == 0
    # the same round from the same global model again (a resumed coordinator): the saved update, no new charge
    again = site.train_round(round_number=1, global_state=state, release=False, fingerprint=fingerprint)
    assert again.replayed
    assert torch.equal(again.state["1.weight"], first.state["1.weight"])
    assert PrivacyJournal(config.workdir / "privacy-journal.jsonl").charged_steps == 3
    # round 2 on the aggregated model, with the DP release of its held-out sums (charged to the holdout first)
    second = site.train_round(round_number=2, global_state=first.state, release=True, fingerprint=fingerprint)
    assert second.sums is not None
    assert second.metrics["charged-steps"] == 6
    assert second.metrics["charged-releases"] == 1
    # the plan is spent: a third round is refused whatever the coordinator asks
    with pytest.raises(PrivacyBudgetError, match="planned DP-SGD steps are charged"):
        site.train_round(round_number=3, global_state=second.state, release=True, fingerprint=fingerprint)
    # the final model: kept, and no release left to charge
    final = site.finish(round_number=2, global_state=second.state, release=True, fingerprint=fingerprint)
    assert final.sums is None
    assert (config.workdir / "global-model.pt").exists()
    journal = PrivacyJournal(config.workdir / "privacy-journal.jsonl")
    assert (journal.charged_steps, journal.charged_releases) == (6, 1)
    plan = site_plan(config)
    # ε of the journal: a valid bound within the target, equal to an independent dp_accounting composition
    spent = journal.epsilon(plan.delta, plan.accountant)
    reference = independent_epsilon(journal.entries, plan.delta)
    assert reference <= spent <= reference * 1.001 + 1e-4
    assert spent <= plan.target_epsilon


def test_a_restarted_site_without_its_journal_fails_closed(tmp_path: Path) -> None:
    from dptrain.errors import JournalLostError
    from dptrain.federated.site import initialise_journal

    _, config = _site_config(tmp_path)
    with pytest.raises(JournalLostError):
        initialise_journal(config, expect_journal=True)


def test_a_site_refuses_a_plan_other_than_the_reserved_one(tmp_path: Path) -> None:
    from dptrain.federated.site import site_plan
    from dptrain_api import ReservedMechanisms

    _, config = _site_config(tmp_path, rounds=2, localSteps=3)
    plan = site_plan(config)
    config.reserved = ReservedMechanisms.model_validate(
        {"train": {"noiseMultiplier": plan.noise_multiplier, "sampleRate": plan.sample_rate, "steps": 5}}
    )
    with pytest.raises(PlanMismatchError, match="reserved"):
        site_plan(config)


def test_a_site_whose_records_are_visits_plans_and_trains_per_patient(tmp_path: Path) -> None:
    """A site's units are its patients: q = batch / its training patients, and the round trains on whole patients."""
    from dptrain.federated.site import SiteRuntime, initialise_journal, site_plan
    from dptrain_api import PrivacyUnit

    job, config = _site_config(tmp_path, rounds=2, localSteps=3)
    path = config.data_dir / "data" / "hospital-b.csv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([f"patient,{header}", *(f"P{i // 3},{row}" for i, row in enumerate(rows))]) + "\n")
    unit = PrivacyUnit(column="patient", max_records_per_unit=4)
    spec = config.dataset.spec.model_copy(update={"privacy_unit": unit, "num_units": 777})
    config.dataset = config.dataset.model_copy(update={"spec": spec})
    plan = site_plan(config)
    assert plan.sample_rate == pytest.approx(64 / 622)  # 777 patients declared, 20 % held out
    assert plan.unit == "individual (patient, ≤4 records)"
    initialise_journal(config, expect_journal=False)
    result = SiteRuntime(config).train_round(
        round_number=1, global_state=_global_state(job), release=True, fingerprint=config.fingerprint
    )
    assert result.metrics["charged-steps"] == 3
    assert result.sums is not None
    assert float(result.sums[0]) < 400  # the release counts patients (~155 held out), not their ~466 rows


def _crafted_global_model(job: DPFederatedJob) -> dict[str, torch.Tensor]:
    """Finite weights whose logit overflows float32 only for a record at the kappa, lambda and creatinine caps (the
    hospital's records sum to at most 2.6 of those 3 scaled features: 3.2e38 stays finite, 3.6e38 does not)."""
    state = _global_state(job)
    weight = torch.zeros_like(state["1.weight"])
    weight[0, 2:5] = 1e38  # kappa, lambda, creatinine
    return {"1.weight": weight, "1.bias": torch.tensor([0.6e38, 0.0])}


SITE_NEIGHBOURS = {
    "unmatched-quote": b'70,1,"1.5,1.2,1.0,0,1\n',
    "latin-1-byte": b"70,1,1.5,1.2,1.0\xe9,0,1\n",
    "extra-field": b"70,1,1.5,1.2,1.0,0,1,9\n",
    "overflowing-record": b"70,1,20,26,10,0,1\n",
    # 51 distinct ones (ages 50-100): some are sure to be sampled in 8 steps at q ≈ 0.035, some to be held out
    "overflowing-records": b"".join(f"{age},1,20,26,10,0,1\n".encode() for age in range(50, 101)),
}


def _site_round(tmp_path: Path, extra: bytes | None, *, crafted: bool) -> tuple[dict[str, float], bool]:
    """One round at a site whose file has ``extra`` appended: its public numbers, and whether the update is finite."""
    from dptrain.federated.site import SiteRuntime, initialise_journal

    job, config = _site_config(tmp_path, rounds=2, localSteps=8, evalReleases=1)
    if extra is not None:
        with (config.data_dir / "data" / "hospital-b.csv").open("ab") as handle:
            handle.write(extra)
    initialise_journal(config, expect_journal=False)
    state = _crafted_global_model(job) if crafted else _global_state(job)
    result = SiteRuntime(config).train_round(
        round_number=1, global_state=state, release=True, fingerprint=config.fingerprint
    )
    assert result.state is not None
    assert result.sums is not None
    finite = all(bool(torch.isfinite(value).all()) for value in result.state.values())
    return result.metrics, finite and bool(torch.isfinite(result.sums).all())


@pytest.mark.parametrize("neighbour", sorted(SITE_NEIGHBOURS))
def test_a_site_reply_is_the_same_with_one_more_line_but_for_its_dp_outputs(tmp_path: Path, neighbour: str) -> None:
    crafted = neighbour.startswith("overflowing")
    base, base_finite = _site_round(tmp_path / "d", None, crafted=crafted)
    other, other_finite = _site_round(tmp_path / "d1", SITE_NEIGHBOURS[neighbour], crafted=crafted)
    assert other == base  # charged steps and releases, ε, the plan, the declared size, steps run
    assert base_finite
    assert other_finite  # the update and the DP release stay finite: nothing reveals the record


def test_a_non_finite_global_model_is_refused_before_anything_is_charged(tmp_path: Path) -> None:
    from dptrain.errors import IncomingModelError
    from dptrain.federated.protocol import REFUSALS, SiteRefusal
    from dptrain.federated.site import SiteRuntime, initialise_journal
    from dptrain.journal import PrivacyJournal

    job, config = _site_config(tmp_path, rounds=2, localSteps=3)
    initialise_journal(config, expect_journal=False)
    site = SiteRuntime(config)
    poisoned = _global_state(job)
    poisoned["1.weight"][0, 0] = float("nan")
    with pytest.raises(IncomingModelError, match="non-finite") as caught:
        site.train_round(round_number=1, global_state=poisoned, release=True, fingerprint=config.fingerprint)
    assert PrivacyJournal(config.workdir / "privacy-journal.jsonl").charged_steps == 0
    assert PrivacyJournal(config.workdir / "privacy-journal.jsonl").charged_releases == 0
    told = site.refusal(caught.value, "train")  # what the ClientApp raises, and Flower sends on
    assert isinstance(told, SiteRefusal)
    assert str(told) == f"GlobalModelRefused: {REFUSALS['GlobalModelRefused']}"
    assert "1.weight" not in str(told)


def test_a_site_error_reaches_the_coordinator_as_a_fixed_sentence(tmp_path: Path) -> None:
    from dptrain.federated.protocol import REFUSALS, refusal

    secret = ValueError("patient 4711 has lactate 12.3")
    assert str(refusal(secret)) == f"SiteError: {REFUSALS['SiteError']}"
    assert str(refusal(PrivacyBudgetError("…"))).startswith("BudgetSpent: ")


def test_under_secagg_a_site_weights_its_update_by_its_own_size_and_refuses_another(tmp_path: Path) -> None:
    """The weight attack: a coordinator weights one site 2²⁰ inside the masked sum to read it off."""
    import json

    from dptrain.federated.secagg import WEIGHTS, SecAggSiteClient
    from dptrain.federated.site import SiteRuntime

    _, config = _site_config(tmp_path)
    client = SecAggSiteClient.__new__(SecAggSiteClient)  # without a Flower Context
    client.site = SiteRuntime(config)
    own = config.declared_size
    assert client._own_weight({WEIGHTS: json.dumps({config.name: own})}) == own
    assert client._own_weight({WEIGHTS: "{}"}) == own  # no entry: its own size
    with pytest.raises(PlanMismatchError, match="weights this site"):
        client._own_weight({WEIGHTS: json.dumps({config.name: 2**20})})


# --- the ServerApp's rules ---------------------------------------------------------------------------------------


def test_release_rounds_are_spread_and_end_at_the_final_model() -> None:
    from dptrain.federated.protocol import release_after_round

    assert release_after_round(5, 2) == {3, 5}
    assert release_after_round(3, 5) == {1, 2, 3}
    assert release_after_round(4, 0) == frozenset()


def test_a_reply_counts_for_the_site_its_key_authenticates() -> None:
    from dptrain.federated.protocol import identify

    known = {"a": 1, "b": 2}
    assert identify(registered="a", reported="a", known=known, require_registered=True).site == "a"
    assert identify(registered="a", reported="b", known=known, require_registered=True).site is None
    assert identify(registered=None, reported="a", known=known, require_registered=True).site is None
    assert identify(registered=None, reported="b", known=known, require_registered=False).site == "b"
    assert identify(registered=None, reported="z", known=known, require_registered=False).site is None


def _reply(node: int, site: str, weight: float, value: float, declared: int) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.full((2,), value)}),
            "metrics": MetricRecord(
                {"dptrain-weight": weight, "declared-size": float(declared), "epsilon": 1.0, "charged-steps": 5.0}
            ),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return Message(content=content, metadata=metadata)


def test_fedavg_weights_sites_by_public_declared_sizes_only(tmp_path: Path) -> None:
    from dptrain.federated.config import ServerConfig
    from dptrain.federated.server_app import FederationStatus, PublicWeightFedAvg, RoundFailedError

    document = _job()
    document["spec"]["sites"][0]["declaredSize"] = 3000  # the coordinator's own table wins for hospital-a
    job = parse_federation_resource(document)
    assert isinstance(job, DPFederatedJob)
    config = ServerConfig(federation=job, out_dir=tmp_path)
    strategy = PublicWeightFedAvg(
        config=config, status=FederationStatus(), min_train_nodes=2, weighted_by_key="dptrain-weight"
    )
    replies = [
        _reply(1, "hospital-a", weight=1e9, value=1.0, declared=10),  # claims a huge weight: ignored
        _reply(2, "hospital-b", weight=1e9, value=4.0, declared=1000),  # its public declared size counts
        _reply(3, "hospital-b", weight=1.0, value=100.0, declared=1000),  # a second reply for hospital-b: dropped
        _reply(4, "intruder", weight=1.0, value=100.0, declared=1000),  # not a site of the federation: dropped
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    expected = (3000 * 1.0 + 1000 * 4.0) / 4000
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), expected))
    assert strategy.status.sites["hospital-a"].weight == 3000
    assert strategy.status.sites["hospital-b"].weight == 1000
    with pytest.raises(RoundFailedError, match="minSites"):
        strategy.aggregate_train(2, replies[:1])


def test_the_global_metric_is_the_sum_of_the_sites_dp_releases(tmp_path: Path) -> None:
    from dptrain.evaluation import metrics_from_sums
    from dptrain.federated.config import ServerConfig
    from dptrain.federated.server_app import FederationStatus, PublicWeightFedAvg

    strategy = PublicWeightFedAvg(
        config=ServerConfig(federation=_federation(), out_dir=tmp_path), status=FederationStatus()
    )
    first = [100.0, 80.0, 30.0, *([1.0] * 20)]
    second = [50.0, 30.0, 20.0, *([2.0] * 20)]
    strategy.record_metric(3, [first, second])
    expected = metrics_from_sums(torch.tensor(first) + torch.tensor(second), num_classes=2)
    assert strategy.status.global_metric["round"] == 3
    assert strategy.status.global_metric["sites"] == 2
    assert math.isclose(strategy.status.global_metric["accuracy"], expected["accuracy"])
    assert math.isclose(strategy.status.global_metric["accuracy"], 110 / 150)


# --- the operator's rendering ------------------------------------------------------------------------------------


def test_federation_pods_are_locked_down_and_valid_kubernetes() -> None:
    import kubernetes_validate

    from dptrain_operator.render import TRAINER_FINALIZER
    from dptrain_operator.settings import Settings
    from tests.support.federation_render import sample_federation_pods

    coordinator, supernode = sample_federation_pods(Settings())
    for pod in (coordinator, supernode):
        kubernetes_validate.validate(pod, "1.30.0", strict=True)
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # the SuperNode reads the data: read-only claim, its charge recorded before it goes, TLS CA and its own key
    assert supernode["metadata"]["finalizers"] == [TRAINER_FINALIZER]
    mounts = {mount["name"]: mount for mount in supernode["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"]["readOnly"] is True
    command = supernode["spec"]["containers"][0]["command"]
    assert "--ca" in command
    assert "--auth-key" in command
    assert command[command.index("--runtime-host") + 1] == "127.0.0.1"  # the Runtime API stays inside the pod
    env = {item["name"]: item.get("value") for item in supernode["spec"]["containers"][0]["env"]}
    assert "DPTRAIN_RESERVED_MECHANISM" in env
    assert env["DPTRAIN_DATASET_IDENTITY"] == "hospital-a/file/cohort/a.csv"
    # the coordinator: the SuperLink's TLS Secret, no data, no finalizer
    assert "finalizers" not in coordinator["metadata"]
    coordinator_command = coordinator["spec"]["containers"][0]["command"]
    assert coordinator_command[:3] == ["dptrain", "federation", "server"]
    assert "--tls-dir" in coordinator_command
    assert not any(
        volume.get("persistentVolumeClaim", {}).get("claimName") == "cohort"
        for volume in coordinator["spec"]["volumes"]
    )


def test_reference_epsilon_helper_matches_the_accountant() -> None:
    entries = [
        {"partition": "train", "noiseMultiplier": 1.1, "sampleRate": 0.05, "steps": 20},
        {"partition": "train", "noiseMultiplier": 1.1, "sampleRate": 0.05, "steps": 10},
        {"partition": "holdout", "noiseMultiplier": 3.0, "sampleRate": 1.0, "steps": 2},
    ]
    ours = max(
        compute_epsilon([MechanismSegment(1.1, 0.05, 30)], delta=1e-5),
        compute_epsilon([MechanismSegment(3.0, 1.0, 2)], delta=1e-5),
    )
    assert independent_epsilon(entries, 1e-5) <= ours <= independent_epsilon(entries, 1e-5) * 1.001 + 1e-4


def test_a_sigterm_while_the_federation_command_imports_is_kept_for_a_clean_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pod stopped at start-up must still report (nothing charged), not die before its handlers exist."""
    code = (
        "import sys; sys.argv = ['dptrain', 'federation', 'site']; import dptrain, os, signal; "
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL); "  # importing the library changes nothing
        "from dptrain import _entry; _entry.keep_early_signals(sys.argv[1:]); "  # the console script's first step
        "os.kill(os.getpid(), signal.SIGTERM); print(_entry.EARLY_SIGNALS)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", f"[{int(signal.SIGTERM)}]"]
    # ... and the federation command's own handler turns it into a stop
    from dptrain import _entry
    from dptrain.federated.cli import _signals

    monkeypatch.setattr(_entry, "EARLY_SIGNALS", [int(signal.SIGTERM)])
    stop = threading.Event()
    with _signals(stop) as received:
        assert stop.is_set()
        assert received == [int(signal.SIGTERM)]


def test_a_restarted_flower_process_sees_only_its_own_log(tmp_path: Path) -> None:
    """The site supervisor restarts a SuperNode that could not join yet by reading what *this* start logged: the
    log file is shared across restarts, and a SuperNode's SuperExec child goes on logging after the join failure."""
    from dptrain.federated.flower import FlowerProcess

    log = tmp_path / "supernode.log"
    first = FlowerProcess("first", ["sh", "-c", "echo 'Failed to activate SuperNode'"], env={}, log_path=log)
    first.process.wait(timeout=30)
    first.stop()
    second = FlowerProcess("second", ["sh", "-c", "echo joined; echo still running"], env={}, log_path=log)
    second.process.wait(timeout=30)
    second.stop()
    assert "Failed to activate SuperNode" in first.log_of_this_start()
    assert second.log_of_this_start() == "joined\nstill running\n"
    assert "Failed to activate SuperNode" in second.log_tail()  # the file holds both


class _Grid:
    """The one Grid call wait_for_min_sites makes: the connected nodes, one more every ``grow`` calls."""

    def __init__(self, connected: int, *, grow: int = 0) -> None:
        self.connected, self.grow, self.calls = connected, grow, 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        if self.grow and self.calls % self.grow == 0:
            self.connected += 1
        return list(range(self.connected))


def test_a_federation_that_cannot_gather_min_sites_fails_instead_of_waiting_forever() -> None:
    """Flower's sampling waits for minSites without a bound; a site that crashed for good must end the federation
    with a reason (RoundFailedError: the operator's FederationFailed), not hang it."""
    from dptrain.federated.server_app import RoundFailedError, wait_for_min_sites

    wait_for_min_sites(_Grid(2), 2, timeout=0.0, what="round 1")  # enough: returns at once
    growing = _Grid(1, grow=3)
    wait_for_min_sites(growing, 2, timeout=5.0, what="round 1", poll=0.01)  # a restarted site rejoins in time
    assert growing.connected == 2
    with pytest.raises(
        RoundFailedError, match=r"round 3: 1 site\(s\) connected after waiting 0s, fewer than minSites=2"
    ):
        wait_for_min_sites(_Grid(1), 2, timeout=0.05, what="round 3", poll=0.01)
