"""Benchmark (issue 13): utility of federated DP-SGD at ε = 1, 3, 8 against (a) each site alone with DP, (c) all data
pooled with DP (the upper bound), and the wall time of a round.

    .venv/bin/python benchmarks/federated.py [--epsilons 1 3 8] [--seeds 0] [--json out.json]   # ~11 min

The sites are the three 'hospitals' of examples/federated/flchain-hospitals.yaml (the built-in flchain cohort split
by age band). Every site keeps its own holdout (the keyed per-record split of its PrivateDataset); the TEST SET is the
union of the three holdouts, on which every model's EXACT ROC AUC is computed here (the data are public, so a
benchmark may look; in production only the DP releases leave a site).

* (a) **alone**: each hospital trains a DPTrainingJob on its own records, through the engine `dptrain run` uses, with
  the federation's per-site plan (same q, same rounds × localSteps steps, hence the same σ at the same ε).
* (b) **federation**: `dptrain federate` — real Flower processes (SuperLink, three SuperNodes, the ServerApp), FedAvg
  on public declared sizes, each site charged in its own journal; the global model after the last round.
* (c) **pooled**: one DPTrainingJob on the union of the three training partitions (no test record), batch 3×, the
  same number of steps, at the same ε: what a single data holder with all records could reach under DP.

Each (ε, seed) reports the AUC; the federation also its wall time per round (mean over rounds) and in total.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from dptrain.data import PreparedData, holdout_mask, load_data
from dptrain.engine import train
from dptrain.models import build_model
from dptrain.plan import make_plan
from dptrain_api import DPTrainingJob, PrivateDataset, parse_resource, source_identity
from dptrain_api.identity import holdout_key

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "examples" / "federated" / "flchain-hospitals.yaml"
EPSILONS = (1.0, 3.0, 8.0)


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def _federation(epsilon: float, seed: int, training: dict[str, Any] | None = None) -> dict[str, Any]:
    job = copy.deepcopy(next(doc for doc in _documents() if doc["kind"] == "DPFederatedJob"))
    job["spec"]["privacy"]["targetEpsilon"] = epsilon
    job["spec"]["training"].update({**(training or {}), "seed": seed})
    return job


def _datasets() -> dict[str, PrivateDataset]:
    found = {}
    for document in _documents():
        if document["kind"] == "PrivateDataset":
            dataset = parse_resource(document)
            assert isinstance(dataset, PrivateDataset)
            found[document["metadata"]["namespace"]] = dataset
    return found


def _split(dataset: PrivateDataset) -> tuple[PreparedData, torch.Tensor]:
    """The site's records and which of them its PrivateDataset holds out (the keyed per-record split)."""
    assert dataset.metadata.namespace is not None
    data = load_data_of(dataset)
    key = holdout_key(source_identity(dataset.metadata.namespace, dataset.spec.source))
    return data, holdout_mask(data, fraction=dataset.spec.holdout_fraction, key=key)


def load_data_of(dataset: PrivateDataset) -> PreparedData:
    from dptrain_api import DatasetSpec, LocalObjectReference

    spec = DatasetSpec(dataset_ref=LocalObjectReference(name=dataset.metadata.name or "cohort"))
    return load_data(spec, private_dataset=dataset, base_dir=MANIFEST.parent)


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for dataset in _datasets().values():
        data, held = _split(dataset)
        features.append(data.features[held])
        labels.append(data.labels[held])
    return torch.cat(features), torch.cat(labels)


def auc(state: dict[str, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], job_model: Any) -> float:
    from sklearn.metrics import roc_auc_score

    model, _ = build_model(job_model, input_shape=(6,), num_classes=2)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        scores = torch.softmax(model(test[0]), dim=1)[:, 1]
    return float(roc_auc_score(test[1].numpy(), scores.numpy()))


def _job(
    name: str, dataset: PrivateDataset, federation: dict[str, Any], *, batch: int, steps_per_epoch_size: int
) -> DPTrainingJob:
    spec = federation["spec"]
    training = spec["training"]
    steps = training["rounds"] * training["localSteps"]
    epochs = steps * batch / steps_per_epoch_size
    document = {
        "apiVersion": "dptrain.io/v1alpha1",
        "kind": "DPTrainingJob",
        "metadata": {"name": name, "namespace": dataset.metadata.namespace},
        "spec": {
            "dataset": {"datasetRef": {"name": dataset.metadata.name}},
            "model": spec["model"],
            "privacy": spec["privacy"],
            "training": {
                "epochs": epochs,
                "batchSize": batch,
                "learningRate": training["learningRate"],
                "momentum": training.get("momentum", 0.0),
                "evalReleases": 0,
                "seed": training["seed"],
            },
            "checkpoint": {"everySteps": 100000},
        },
    }
    job = parse_resource(document)
    assert isinstance(job, DPTrainingJob)
    return job


def run_alone(federation: dict[str, Any], test: Any) -> dict[str, float]:
    """(a): each hospital on its own records, with its per-site plan (same q and steps as in the federation)."""
    from dptrain_accounting import training_set_size

    results = {}
    for namespace, dataset in _datasets().items():
        assert dataset.spec.num_examples is not None
        train_size = training_set_size(dataset.spec.num_examples, dataset.spec.holdout_fraction)
        batch = federation["spec"]["training"]["batchSize"]
        job = _job(f"alone-{namespace}", dataset, federation, batch=batch, steps_per_epoch_size=train_size)
        plan = make_plan(job, dataset=dataset)
        with tempfile.TemporaryDirectory(prefix="dptrain-fed-bench-") as workdir:
            result = train(
                job, load_data_of(dataset), plan, workdir=Path(workdir), dataset=dataset, base_dir=MANIFEST.parent
            )
            state = torch.load(result.model_path, weights_only=True)
        results[namespace] = auc(state, test, job.spec.model)
    return results


def run_pooled(federation: dict[str, Any], test: Any, workdir: Path) -> float:
    """(c): one data holder with every site's TRAINING records (never a test record), at the same ε."""
    import pandas as pd

    frames = []
    for dataset in _datasets().values():
        assert dataset.spec.source.file is not None
        frame = pd.read_csv(MANIFEST.parent / dataset.spec.source.file.path)
        data, held = _split(dataset)
        assert len(frame) == len(held)  # the example files have no unusable record: rows and records align
        frames.append(frame[~held.numpy()])
    pooled = pd.concat(frames)
    path = workdir / "pooled.csv"
    pooled.to_csv(path, index=False)
    first = next(iter(_datasets().values()))
    declared = sum(int(dataset.spec.num_examples or 0) for dataset in _datasets().values())
    document = first.to_wire()
    document["metadata"] = {"name": "pooled", "namespace": "pooled"}
    document["spec"]["source"]["file"]["path"] = path.name
    document["spec"]["numExamples"] = int(declared * (1 - first.spec.holdout_fraction))
    document["spec"]["holdoutFraction"] = 0.0
    dataset = parse_resource(document)
    assert isinstance(dataset, PrivateDataset)
    batch = 3 * federation["spec"]["training"]["batchSize"]
    job = _job("pooled", dataset, federation, batch=batch, steps_per_epoch_size=document["spec"]["numExamples"])
    plan = make_plan(job, dataset=dataset)
    data = load_data(job.spec.dataset, private_dataset=dataset, base_dir=workdir)
    with tempfile.TemporaryDirectory(prefix="dptrain-fed-bench-") as run_dir:
        result = train(job, data, plan, workdir=Path(run_dir), dataset=dataset, base_dir=workdir)
        state = torch.load(result.model_path, weights_only=True)
    return auc(state, test, job.spec.model)


def run_federation(federation: dict[str, Any], test: Any, workdir: Path) -> dict[str, Any]:
    """(b): `dptrain federate` with real Flower processes."""
    from dptrain.federated.local import run_local

    manifest = workdir / "federation.yaml"
    documents = [federation, *[doc for doc in _documents() if doc["kind"] == "PrivateDataset"]]
    for document in documents[1:]:  # file paths are relative to the manifest (the schema refuses absolute ones)
        path = document["spec"]["source"]["file"]["path"]
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MANIFEST.parent / path, workdir / path)
    manifest.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    output = workdir / "out"
    started = time.monotonic()
    result = run_local(manifest, output)
    wall = time.monotonic() - started
    if result.exit_code != 0 or result.status is None:
        raise RuntimeError(f"the federation failed: {result}")
    state = torch.load(output / "global-model.pt", weights_only=True)
    from dptrain_api import ModelSpec

    rounds = result.status.round_seconds
    delta = float(federation["spec"]["privacy"]["delta"])
    accounting = {}
    for site in sorted((output / "sites").iterdir()):
        reported = json.loads((site / "privacy-report.json").read_text())["guarantee"]["epsilon"]
        accounting[site.name] = {"reported": reported, "dpAccounting": dp_accounting_epsilon(site, delta)}
    return {
        "auc": auc(state, test, ModelSpec.model_validate(federation["spec"]["model"])),
        "roundSeconds": statistics.fmean(rounds) if rounds else None,
        "rounds": rounds,
        "wallSeconds": wall,
        "epsilon": {name: site.epsilon for name, site in result.status.sites.items()},
        "dpMetric": result.status.global_metric,
        "accounting": accounting,
    }


def dp_accounting_epsilon(site: Path, delta: float) -> float:
    """ε of what a site's journal charged, composed by Google's dp_accounting directly (PLD, interval 1e-4), not by
    dptrain's accounting: per partition the Poisson-subsampled Gaussian steps, the two partitions in parallel."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    from dptrain.journal import JOURNAL_NAME

    lines = [json.loads(line) for line in (site / JOURNAL_NAME).read_text().splitlines() if line.strip()]
    intents = [line for line in lines if line.get("type") == "intent"]
    epsilons = [0.0]
    for partition in ("train", "holdout"):
        events = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    entry["sampleRate"], dp_accounting.GaussianDpEvent(entry["noiseMultiplier"])
                ),
                entry["steps"],
            )
            for entry in intents
            if entry.get("partition", "train") == partition
        ]
        if events:
            accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
            accountant.compose(dp_accounting.ComposedDpEvent(events))
            epsilons.append(accountant.get_epsilon(delta))
    return max(epsilons)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    # One seed by default: a federation of 5 rounds takes ~3.5 min on 2 shared cores, so 3 ε × 2 seeds took ~21 min.
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-federation", action="store_true", help="(a) and (c) only (no Flower)")
    parser.add_argument("--training", type=json.loads, default=None, help="JSON merged into spec.training (tuning)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    test = test_set()
    rows = []
    for epsilon in args.epsilons:
        for seed in args.seeds:
            federation = _federation(epsilon, seed, args.training)
            with tempfile.TemporaryDirectory(prefix="dptrain-fed-bench-") as tmp:
                row: dict[str, Any] = {"epsilon": epsilon, "seed": seed}
                row["alone"] = run_alone(federation, test)
                row["pooled"] = run_pooled(federation, test, Path(tmp))
                if not args.skip_federation:
                    row["federation"] = run_federation(federation, test, Path(tmp))
            rows.append(row)
            print(f"# ε={epsilon:g} seed={seed}: {json.dumps(row, default=str)[:400]}", file=sys.stderr, flush=True)
    print(f"test set: {len(test[1])} held-out records (the union of the three hospitals' holdouts); exact ROC AUC")
    print()
    print("| ε | (a) alone: hospital-a | hospital-b | hospital-c | (b) federation | (c) pooled | round (s) |")
    print("|---|---|---|---|---|---|---|")
    for epsilon in args.epsilons:
        cells = [row for row in rows if row["epsilon"] == epsilon]

        def cell(values: list[float]) -> str:
            if len(values) == 1:
                return f"{values[0]:.3f}"
            return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"

        alone = [cell([row["alone"][site] for row in cells]) for site in ("hospital-a", "hospital-b", "hospital-c")]
        if args.skip_federation:
            federated, seconds = "–", "–"
        else:
            federated = cell([row["federation"]["auc"] for row in cells])
            seconds = f"{statistics.fmean(row['federation']['roundSeconds'] for row in cells):.1f}"
        pooled = cell([row["pooled"] for row in cells])
        print(f"| {epsilon:g} | {' | '.join(alone)} | {federated} | {pooled} | {seconds} |")
    if not args.skip_federation:
        print()
        print("Each site's ε (its privacy report, composed from its journal) vs dp_accounting PLD on the same journal:")
        print()
        print("| ε target | seed | site | reported ε | dp_accounting ε | reported ÷ dp_accounting |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            for site, numbers in row["federation"]["accounting"].items():
                ratio = numbers["reported"] / numbers["dpAccounting"]
                print(
                    f"| {row['epsilon']:g} | {row['seed']} | {site} | {numbers['reported']:.4f} | "
                    f"{numbers['dpAccounting']:.4f} | {ratio:.5f} |"
                )
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
