"""`dptrain federate` end to end on this machine (issue 13): real Flower processes with TLS, SuperNode authentication
and Flower's SecAgg+, the outputs a user gets (the global model, the federation report, one privacy report per site),
and a site refused for its consent while the others go on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.federation import (
    dataset_manifest,
    federation_manifest,
    free_port,
    independent_epsilon,
    journal_entries,
    put_hospital_data,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_dptrain_federate_with_tls_node_authentication_and_secure_aggregation(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    sites = [
        {"name": name, "namespace": name, "datasetRef": {"name": "cohort"}}
        for name in ("hospital-a", "hospital-b", "hospital-c")
    ]
    job = federation_manifest("local", sites=sites, port=free_port(), rounds=1, local_steps=4)
    job["metadata"]["namespace"] = "coordinator"
    job["spec"]["secureAggregation"] = {"numShares": 3, "reconstructionThreshold": 2}
    documents: list[dict[str, object]] = [job]
    for name, allow in (("hospital-a", True), ("hospital-b", True), ("hospital-c", False)):
        dataset = dataset_manifest(
            path=put_hospital_data(tmp_path, name),
            num_examples=2000,
            budget=8.0,
            allow=[("coordinator", "local")] if allow else [],
        )
        dataset["metadata"]["namespace"] = name
        documents.append(dataset)
    manifest = tmp_path / "federation.yaml"  # file paths resolve against its folder
    manifest.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    output = tmp_path / "out"
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "dptrain"),
                "federate",
                str(manifest),
                "--output",
                str(output),
                "--secure",
            ],
            capture_output=True,
            text=True,
            timeout=500,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"dptrain federate did not finish in 500 s\n{_flower_logs(output)}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:] + _flower_logs(output)
    assert "FederationNotAllowed" in result.stderr  # hospital-c gave no consent: reported, left out
    report = json.loads((output / "federation-report.json").read_text())
    assert report["state"] == "succeeded"
    assert report["secureAggregation"]["numShares"] == 3
    assert report["rounds"] == {"completed": 1, "total": 1}
    assert set(report["sites"]) >= {"hospital-a", "hospital-b"}
    assert (output / "global-model.pt").exists()
    assert (output / "pki" / "tls.crt").exists()
    log = (output / "coordinator" / "flower" / "superlink.log").read_text()
    assert "--insecure" not in log
    for name in ("hospital-a", "hospital-b"):
        site = output / "sites" / name
        privacy = json.loads((site / "privacy-report.json").read_text())
        entries = journal_entries(site / "privacy-journal.jsonl")
        reference = independent_epsilon(entries, 1e-5)
        epsilon = privacy["guarantee"]["epsilon"]
        assert reference <= epsilon + 1e-9 <= reference * 1.001 + 1e-4
        assert epsilon <= 3.0
        assert privacy["federation"]["roundsTrained"] == [1]
        assert (site / "global-model.pt").exists()
    assert not (output / "sites" / "hospital-c").exists()


def _flower_logs(output: Path) -> str:
    """The tail of every Flower process's log (SuperLink, SuperNodes) and the coordinator's status, to see why."""
    parts = [
        f"--- {path.relative_to(output)}\n{path.read_text(errors='replace')[-2000:]}" for path in output.rglob("*.log")
    ]
    status = output / "coordinator" / "status.json"
    if status.exists():
        parts.append(f"--- coordinator/status.json\n{status.read_text()[-2000:]}")
    return "\n".join(parts)
