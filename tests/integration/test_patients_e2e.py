"""End to end: the patient-level example (examples/flchain-visits-patient.yaml, a row per visit) through the real
operator, the live API server and a real `dptrain run` pod: the unit is shown, planned and charged per patient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import Cluster
from tests.support.e2e import apply, diagnose, get, phase_is, wait_for
from tests.support.federation import independent_epsilon, journal_entries
from tests.support.node import FakeNode
from tests.support.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_patient_example_trains_and_charges_per_patient(
    cluster: Cluster, namespace: str, node: FakeNode, operator: OperatorProcess
) -> None:
    claim = node.pvc_dir(namespace, "cohort-data") / "data"
    claim.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLES / "data" / "flchain-visits.csv", claim / "flchain-visits.csv")
    dataset, job = yaml.safe_load_all((EXAMPLES / "flchain-visits-patient.yaml").read_text())
    job["spec"]["training"]["epochs"] = 1  # a short run: the mechanism is what is checked
    apply(cluster, namespace, dataset, job)
    name = job["metadata"]["name"]
    finished = wait_for(
        phase_is(cluster, namespace, name, "Succeeded", "Failed"),
        timeout=240,
        what="the patient-level job",
        diagnose=diagnose(cluster, namespace, node, operator),
    )
    assert finished["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, node, operator)()
    privacy = finished["status"]["privacy"]
    assert privacy["sampleRate"] == pytest.approx(256 / 5220)  # batch / training PATIENTS (6524 less 20 %)
    report = json.loads((node.pvc_dir(namespace, f"{name}-checkpoint") / "privacy-report.json").read_text())
    assert report["guarantee"]["privacyUnit"] == "individual (patient_id, ≤4 records)"
    assert "add or remove one individual" in report["guarantee"]["neighbouringRelation"]
    journal = journal_entries(node.pvc_dir(namespace, f"{name}-checkpoint") / "privacy-journal.jsonl")
    reference = independent_epsilon(journal, 1e-5)
    assert reference <= privacy["epsilonSpent"] <= reference * 1.001 + 1e-4
    pds = wait_for(
        lambda: (
            (found := get(cluster, namespace, "pds", "flchain-visits")).get("status", {}).get("epsilonSpent") and found
        ),
        timeout=30,
        what="ε spent on the dataset",
    )
    assert pds["status"]["privacyUnit"] == "patient_id (≤4 records)"
    assert pds["status"]["epsilonSpent"] >= reference - 1e-6
    table = cluster.kubectl("get", "pds", "flchain-visits", "-n", namespace).stdout
    assert "UNIT" in table
    assert "patient_id" in table
