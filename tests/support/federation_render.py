"""Sample federation pods as the operator renders them (for the chart's monitoring and network policy tests)."""

from __future__ import annotations

from typing import Any

from dptrain_api import (
    DPFederatedJob,
    PrivateDataset,
    ReservedMechanisms,
    parse_federation_resource,
)
from dptrain_operator.render.federation import coordinator_pod, site_resource, supernode_pod
from dptrain_operator.settings import Settings

JOB: dict[str, Any] = {
    "apiVersion": "dptrain.io/v1alpha1",
    "kind": "DPFederatedJob",
    "metadata": {"name": "hospitals", "namespace": "coordinator", "uid": "5d3c7a40-6b1f-4a0e-9c6c-2f1f7a0b9e11"},
    "spec": {
        "data": {"inputShape": [6], "numClasses": 2},
        "privacy": {"targetEpsilon": 3},
        "sites": [
            {"name": "hospital-a", "namespace": "hospital-a", "datasetRef": {"name": "cohort"}, "publicKey": "k"},
            {"name": "hospital-b", "namespace": "hospital-b", "datasetRef": {"name": "cohort"}, "publicKey": "k"},
        ],
        "superlink": {"tlsSecretName": "superlink-tls"},
    },
}
DATASET: dict[str, Any] = {
    "apiVersion": "dptrain.io/v1alpha1",
    "kind": "PrivateDataset",
    "metadata": {"name": "cohort", "namespace": "hospital-a", "uid": "8a1e2c1f-0d3a-4c55-8f1e-6b1d2a3c4e5f"},
    "spec": {
        "source": {
            "file": {
                "claimName": "cohort",
                "path": "a.csv",
                "labelColumn": "y",
                "features": [{"name": "x", "min": 0, "max": 1}],
            }
        },
        "numExamples": 1000,
        "budget": {"epsilon": 8},
        "allowFederations": [{"namespace": "coordinator", "name": "hospitals"}],
    },
}


def sample_federation_pods(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(coordinator pod, SuperNode pod) of a sample federation with TLS and SuperNode authentication."""
    job = parse_federation_resource(JOB)
    assert isinstance(job, DPFederatedJob)
    dataset = parse_federation_resource(DATASET)
    assert isinstance(dataset, PrivateDataset)
    site = site_resource(job, job.spec.sites[0], settings=settings)
    site.metadata.uid = "1f2e3d4c-5b6a-4798-8a9b-0c1d2e3f4a5b"
    reserved = ReservedMechanisms.model_validate({"train": {"noiseMultiplier": 1.0, "sampleRate": 0.08, "steps": 100}})
    coordinator = coordinator_pod(job, number=1, expected_sites=["hospital-a", "hospital-b"], settings=settings)
    supernode = supernode_pod(
        site,
        dataset=dataset,
        number=1,
        attempt=1,
        reserved=reserved,
        identity="hospital-a/file/cohort/a.csv",
        settings=settings,
    )
    return coordinator, supernode
