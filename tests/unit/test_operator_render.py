"""The operator's pure builders: trainer pods and claims are valid Kubernetes objects (checked against the real
schemas of a recent Kubernetes), locked down as documented, and named without collisions."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dptrain_api import DPTrainingJob, Mechanism, PrivateDataset, ReservedMechanisms, load_documents, parse_resource
from dptrain_operator.render import (
    ATTEMPT_LABEL,
    JOB_UID_LABEL,
    TRAINER_FINALIZER,
    PodContract,
    checkpoint_claim,
    checkpoint_claim_name,
    gang_network_policy,
    gang_service,
    job_manifest,
    pod_name,
    trainer_pod,
)
from dptrain_operator.render.pod import CONTAINER_HARDENING, pod_hardening
from dptrain_operator.settings import Settings
from tests.support.federation_render import sample_federation_pods
from tests.support.manifests import base_manifest

KUBERNETES_VERSION = "1.36.0"
RESERVED = ReservedMechanisms(
    train=Mechanism(noise_multiplier=1.1, sample_rate=0.14, steps=100),
    holdout=Mechanism(noise_multiplier=3.0, sample_rate=1.0, steps=4),
)


def _contract(number: int = 1, attempt: int = 1) -> PodContract:
    return PodContract(pod_number=number, attempt=attempt, reserved=RESERVED, identity="hospital/builtin/digits")


def _job(**spec: Any) -> DPTrainingJob:
    document = base_manifest("job")
    document["metadata"].update(namespace="hospital", uid="0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10")
    document["spec"].update(spec)
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    return job


def _dataset() -> PrivateDataset:
    document = base_manifest("dataset")
    document["metadata"]["namespace"] = "hospital"
    dataset = parse_resource(document)
    assert isinstance(dataset, PrivateDataset)
    return dataset


def _validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(json.loads(json.dumps(manifest)), KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"resources": {"cpu": "2", "memory": "4Gi", "gpus": 1, "nodeSelector": {"pool": "gpu"}}},
        {
            "resources": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "research",
            }
        },
        {"checkpoint": {"volume": "emptyDir"}, "image": "registry.example/dptrain:dev"},
    ],
)
def test_trainer_pod_is_valid_kubernetes(spec: dict[str, Any]) -> None:
    pod = trainer_pod(_job(**spec), dataset=None, contract=_contract(2, 2), settings=Settings())
    _validate(pod)


def test_children_are_valid_and_owned() -> None:
    job, dataset = _job(dataset={"datasetRef": {"name": "base-dataset"}}), _dataset()
    gang = _job(dataset={"datasetRef": {"name": "base-dataset"}}, distributed={"workers": 2})
    follower = PodContract(pod_number=1, attempt=1, reserved=RESERVED, identity="hospital/x", worker=1)
    for manifest in (
        checkpoint_claim(job),
        trainer_pod(job, dataset=dataset, contract=_contract(), settings=Settings()),
        trainer_pod(gang, dataset=dataset, contract=_contract(), settings=Settings()),
        trainer_pod(gang, dataset=dataset, contract=follower, settings=Settings()),
        gang_service(gang),
        gang_network_policy(gang),
    ):
        _validate(manifest)
        owner = manifest["metadata"]["ownerReferences"][0]
        assert owner == {
            "apiVersion": "dptrain.io/v1alpha1",
            "kind": "DPTrainingJob",
            "name": "base-job",
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert manifest["metadata"]["labels"][JOB_UID_LABEL] == job.metadata.uid


def test_a_gang_policy_admits_only_the_jobs_own_pods() -> None:
    policy = gang_network_policy(_job(distributed={"workers": 2}))["spec"]
    own = {"matchLabels": {JOB_UID_LABEL: "0b9f6a1e-2f7c-4a53-9b07-4d2d1b5f7a10"}}
    assert policy["podSelector"] == own
    assert policy["ingress"] == [{"from": [{"podSelector": own}]}]
    assert policy["egress"] == [{"to": [{"podSelector": own}]}]


def test_trainer_pod_security_posture() -> None:
    pod = trainer_pod(_job(), dataset=None, contract=_contract(), settings=Settings())
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    writable = {mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")}
    assert writable == {"/tmp", "/var/lib/dptrain/checkpoint"}


def _every_workload_pod(settings: Settings) -> dict[str, dict[str, Any]]:
    gang = _job(distributed={"workers": 3})
    coordinator, supernode = sample_federation_pods(settings)
    return {
        "trainer": trainer_pod(_job(), dataset=_dataset(), contract=_contract(), settings=settings),
        "gang follower": trainer_pod(gang, dataset=None, contract=_contract_of_worker(2), settings=settings),
        "coordinator": coordinator,
        "supernode": supernode,
    }


def _contract_of_worker(worker: int) -> PodContract:
    return PodContract(pod_number=1, attempt=1, reserved=RESERVED, identity="hospital/builtin/digits", worker=worker)


@pytest.mark.parametrize("user", [65532, 1000])
def test_every_workload_pod_carries_the_same_hardening(user: int) -> None:
    """One builder (render/pod.py): trainer ranks, the coordinator and SuperNodes are locked down alike."""
    settings = Settings(trainer_run_as_user=user, trainer_service_account="dptrain-trainer")
    for role, pod in _every_workload_pod(settings).items():
        spec = pod["spec"]
        assert {key: spec[key] for key in pod_hardening(settings)} == pod_hardening(settings), role
        (container,) = spec["containers"]
        assert container["securityContext"] == CONTAINER_HARDENING, role
        assert container["terminationMessagePolicy"] == "File", role
        assert container["resources"]["requests"] == container["resources"]["limits"], role
        assert not [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/"], role
        _validate(pod)


def test_trainer_pod_environment_and_resources() -> None:
    pod = trainer_pod(
        _job(resources={"cpu": "3", "gpus": 2}), dataset=None, contract=_contract(4, 3), settings=Settings()
    )
    container = pod["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["DPTRAIN_METRICS_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert ReservedMechanisms.model_validate_json(env["DPTRAIN_RESERVED_MECHANISM"]["value"]) == RESERVED
    assert env["DPTRAIN_ATTEMPT"]["value"] == "3"  # from the ledger: earlier pods whose trainer ran, plus one
    assert env["DPTRAIN_DATASET_IDENTITY"]["value"] == "hospital/builtin/digits"
    assert container["command"][2:4] == ["--from-env", "DPTRAIN_JOB_MANIFEST"]
    assert container["terminationMessagePolicy"] == "File"  # never the log: it is the steward's
    assert pod["metadata"]["finalizers"] == [TRAINER_FINALIZER]
    assert container["resources"]["limits"] == {"cpu": "3", "memory": "2Gi", "nvidia.com/gpu": "2"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["command"][:2] == ["dptrain", "run"]
    assert pod["metadata"]["labels"][ATTEMPT_LABEL] == "4"
    assert pod["metadata"]["name"] == "base-job-attempt-4"


def test_no_gpu_limit_without_gpus() -> None:
    pod = trainer_pod(_job(), dataset=None, contract=_contract(), settings=Settings())
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"]


def test_dataset_claim_is_mounted_read_only() -> None:
    job, dataset = _job(dataset={"datasetRef": {"name": "base-dataset"}}), _dataset()
    pod = trainer_pod(job, dataset=dataset, contract=_contract(), settings=Settings())
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "cohort-data", "readOnly": True}
    mounts = {mount["name"]: mount for mount in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"]["readOnly"] is True


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in pod["spec"]["containers"][0]["env"]}


def test_a_gang_follower_dials_the_leaders_dns_name_not_an_address_known_later() -> None:
    """Every pod of a gang can be created at once (Kueue admits pod groups whole): no follower waits for an IP."""
    gang = _job(distributed={"workers": 3})
    leader = trainer_pod(gang, dataset=None, contract=_contract_of_worker(0), settings=Settings())
    follower = trainer_pod(gang, dataset=None, contract=_contract_of_worker(2), settings=Settings())
    service = gang_service(gang)["metadata"]["name"]
    assert _env(follower)["PET_MASTER_ADDR"] == f"worker-0.{service}.hospital.svc"
    assert (leader["spec"]["hostname"], leader["spec"]["subdomain"]) == ("worker-0", service)
    assert _env(leader)["PET_MASTER_ADDR"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_a_queued_gang_is_one_kueue_pod_group_per_attempt() -> None:
    document = base_manifest("job")
    document["metadata"].update(namespace="hospital", uid="u-1", labels={"kueue.x-k8s.io/queue-name": "ward-queue"})
    document["spec"]["distributed"] = {"workers": 3}
    gang = parse_resource(document)
    assert isinstance(gang, DPTrainingJob)
    pods = [trainer_pod(gang, dataset=None, contract=_contract_of_worker(w), settings=Settings()) for w in range(3)]
    groups = {pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for pod in pods}
    assert len(groups) == 1
    assert all(pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "3" for pod in pods)
    assert all(pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ward-queue" for pod in pods)
    assert pods[0]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"  # the leader keeps its own
    retry = trainer_pod(gang, dataset=None, contract=_contract(2), settings=Settings())
    assert retry["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] not in groups  # a new attempt, a new group
    single = trainer_pod(_job(), dataset=None, contract=_contract(), settings=Settings())
    assert "kueue.x-k8s.io/pod-group-name" not in single["metadata"]["labels"]


def test_kueue_labels_pass_through() -> None:
    document = base_manifest("job")
    document["metadata"].update(uid="u-1", namespace="ns", labels={"kueue.x-k8s.io/queue-name": "research"})
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    pod = trainer_pod(job, dataset=None, contract=_contract(), settings=Settings())
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"


def test_the_job_manifest_round_trips_through_the_api_models() -> None:
    job, dataset = _job(dataset={"datasetRef": {"name": "base-dataset"}}), _dataset()
    text = job_manifest(job, dataset)
    documents = load_documents(text)
    assert [parse_resource(document).kind for document in documents] == ["DPTrainingJob", "PrivateDataset"]
    assert parse_resource(documents[0]).spec == job.spec  # type: ignore[union-attr]
    assert "status" not in yaml.safe_load_all(text).__next__()


def test_child_names_never_collide_and_fit_a_dns_label() -> None:
    long_a, long_b = "a" * 70 + "-one", "a" * 70 + "-two"  # the same first 63 characters
    for name in (pod_name(long_a, 2), pod_name(long_b, 2), checkpoint_claim_name(long_a)):
        assert len(name) <= 63 or name.endswith("checkpoint")
    assert pod_name(long_a, 2) != pod_name(long_b, 2)
    assert pod_name(long_a, 2).endswith("-attempt-2")
    assert pod_name(long_a, 2) == pod_name(long_a, 2)  # deterministic
    assert pod_name("short", 3) == "short-attempt-3"
    assert checkpoint_claim_name("short") == "short-checkpoint"


def test_settings_from_environment() -> None:
    settings = Settings.from_env(
        {"DPTRAIN_NAMESPACES": "a, b", "DPTRAIN_SCRAPE_INTERVAL": "2.5", "DPTRAIN_TRAINER_IMAGE": "img:1"}
    )
    assert settings.namespaces == ("a", "b")
    assert settings.scrape_interval == 2.5
    assert settings.trainer_image == "img:1"
    with pytest.raises(ValueError, match="DPTRAIN_METRICS_PORT"):
        Settings.from_env({"DPTRAIN_METRICS_PORT": "eighty"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DPTRAIN_SCRAPE_INTERVAL", "0"), ("DPTRAIN_LIVENESS_PORT", "70000"), ("DPTRAIN_GANG_NETWORK_POLICY", "maybe")],
)
def test_settings_out_of_range_are_refused_with_the_variables_name(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{variable}='{value}'"):
        Settings.from_env({variable: value})


def test_settings_read_booleans_as_the_chart_writes_them() -> None:
    assert Settings.from_env({"DPTRAIN_GANG_NETWORK_POLICY": "true"}).gang_network_policy is True
    assert Settings.from_env({"DPTRAIN_GANG_NETWORK_POLICY": "false"}).gang_network_policy is False
    assert Settings.from_env({"DPTRAIN_NAMESPACES": ""}).namespaces == ()
