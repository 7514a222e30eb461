"""Helpers of the federation tests: manifests, site data on fake claims, and an independent accountant for journals."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.cluster import REPO

HOSPITAL_DATA = REPO / "examples" / "federated" / "data"
FEATURES = [
    {"name": "age", "min": 50, "max": 101},
    {"name": "sex", "min": 0, "max": 1},
    {"name": "kappa", "min": 0, "max": 20},
    {"name": "lambda", "min": 0, "max": 26},
    {"name": "creatinine", "min": 0.4, "max": 10},
    {"name": "mgus", "min": 0, "max": 1},
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def put_hospital_data(claim_dir: Path, hospital: str) -> str:
    """Copy a hospital's CSV (examples/federated/data) onto a fake claim; its path inside the claim."""
    target = claim_dir / "data" / f"{hospital}.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HOSPITAL_DATA / f"{hospital}.csv", target)
    return f"data/{hospital}.csv"


def dataset_manifest(
    *,
    path: str,
    num_examples: int,
    budget: float,
    allow: Sequence[tuple[str, str]] = (),
    name: str = "cohort",
    claim: str = "cohort",
) -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "PrivateDataset",
        "metadata": {"name": name},
        "spec": {
            "source": {
                "file": {
                    "claimName": claim,
                    "path": path,
                    "labelColumn": "death",
                    "numClasses": 2,
                    "features": FEATURES,
                }
            },
            "numExamples": num_examples,
            "budget": {"epsilon": budget, "delta": 1e-5},
            "allowFederations": [{"namespace": namespace, "name": federation} for namespace, federation in allow],
        },
    }


def federation_manifest(
    name: str,
    *,
    sites: list[dict[str, Any]],
    port: int,
    rounds: int = 2,
    local_steps: int = 5,
    min_sites: int = 2,
    superlink: dict[str, Any] | None = None,
    round_timeout: float = 120.0,
    target_epsilon: float = 3.0,
    backoff_limit: int = 3,
) -> dict[str, Any]:
    return {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPFederatedJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"inputShape": [6], "numClasses": 2},
            "model": {"architecture": "logistic"},
            "privacy": {"targetEpsilon": target_epsilon, "delta": 1e-5},
            "training": {
                "rounds": rounds,
                "localSteps": local_steps,
                "batchSize": 64,
                "learningRate": 0.5,
                "evalReleases": 2,
                "roundTimeoutSeconds": round_timeout,
                "seed": 3,
            },
            "sites": sites,
            "minSites": min_sites,
            "superlink": {"port": port, **(superlink or {"insecure": True, "nodeAuthentication": False})},
            "resources": {"cpu": "1"},
            "siteResources": {"cpu": "1"},
            "runPolicy": {"backoffLimit": backoff_limit},
        },
    }


def journal_entries(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("type") == "intent"]


def independent_epsilon(entries: Sequence[dict[str, Any]], delta: float) -> float:
    """ε of a journal's charges by Google's dp_accounting directly (PLD, composed here without dptrain_accounting):
    each partition's Poisson-subsampled Gaussian steps composed, the two partitions in parallel (max)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    epsilons = [0.0]
    for partition in ("train", "holdout"):
        events = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    entry["sampleRate"], dp_accounting.GaussianDpEvent(entry["noiseMultiplier"])
                ),
                entry["steps"],
            )
            for entry in entries
            if entry.get("partition", "train") == partition
        ]
        if not events:
            continue
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        accountant.compose(dp_accounting.ComposedDpEvent(events))
        epsilons.append(accountant.get_epsilon(delta))
    return max(epsilons)


def charged(entries: Sequence[dict[str, Any]], partition: str = "train") -> int:
    return sum(int(entry["steps"]) for entry in entries if entry.get("partition", "train") == partition)
