"""The manifest corpus shared by the unit tests (pydantic) and the integration tests (API server)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@dataclass(frozen=True)
class BadCase:
    name: str
    document: dict[str, Any]
    field: str


def base_manifest(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MANIFESTS / f"valid-{kind}.yaml").read_text())
    return loaded


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch semantics (RFC 7386): nested dicts merge, null deletes, anything else replaces."""
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def bad_cases() -> list[BadCase]:
    cases = []
    for entry in yaml.safe_load((MANIFESTS / "bad-manifests.yaml").read_text()):
        document = deep_merge(base_manifest(entry.get("base", "job")), entry["patch"])
        document["metadata"]["name"] = entry["name"]
        cases.append(BadCase(entry["name"], document, entry["field"]))
    return cases


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every document of every manifest in examples/, named file[index]."""
    documents = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((f"{path.name}[{index}]", document))
    return documents


def sample_trainer_pod(job: Any, settings: Any) -> dict[str, Any]:
    """The first trainer pod the operator renders for ``job`` (a DPTrainingJob) with ``settings``."""
    from dptrain_api import Mechanism, ReservedMechanisms
    from dptrain_operator.render import PodContract, trainer_pod

    reserved = ReservedMechanisms(train=Mechanism(noise_multiplier=1.1, sample_rate=0.1, steps=10))
    contract = PodContract(pod_number=1, attempt=1, reserved=reserved, identity="ml/builtin/digits")
    pod: dict[str, Any] = trainer_pod(job, dataset=None, contract=contract, settings=settings)
    return pod
