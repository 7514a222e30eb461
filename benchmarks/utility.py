"""Benchmark (c): utility of dptrain's DP models (accuracy; ROC AUC for flchain) at ε = 1, 3, 8 and non-private.

    .venv/bin/python benchmarks/utility.py [--seeds 0 1 2] [--configs NAME ...] [--json out.json]

Every DP number goes through the trainer's real code path, the one ``dptrain run`` takes: a
DPTrainingJob parsed from a manifest (examples/*.yaml, with ``privacy.targetEpsilon`` and
``training.seed`` replaced, plus a config's overrides), ``dptrain.data.load_data``,
``dptrain.plan.make_plan`` (PLD calibration of σ), ``dptrain.engine.train`` in a temporary workdir
(Poisson sampling, clipping, noise, journal). The metric is the engine's own held-out evaluation
(the job's ``evalFraction`` = 0.2 split, seeded by ``training.seed``; noise is fresh every run).

Non-private: a plain PyTorch loop on the SAME split (``train_eval_split`` with the same seed) and the
same model (``build_model``, same seed), SGD lr 0.05 momentum 0.9 (the field notes' recipe), shuffled
mini-batches of 32, 100 epochs (DP
learning rates such as 4.0 are scaled for clipped, noised sums and diverge without clipping; the DP
recipes' few large-batch epochs under-fit logistic regression without noise).

``--configs`` picks rows of CONFIGS; ``--list`` shows them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dptrain.data import load_data, train_eval_split
from dptrain.engine import evaluate, train
from dptrain.models import build_model
from dptrain.plan import make_plan
from dptrain_api import DPTrainingJob, parse_resource

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EPSILONS = (1.0, 3.0, 8.0)
NONPRIVATE_LR, NONPRIVATE_MOMENTUM, NONPRIVATE_BATCH, NONPRIVATE_EPOCHS = 0.05, 0.9, 32, 100

# name -> (example manifest, overrides merged into spec, field-notes baseline at ε=3 or None)
CONFIGS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    # the shipped examples, unchanged
    "flchain-mlp": ("flchain-mlp.yaml", {}, None),
    "breast-cancer-logistic": ("breast-cancer-logistic.yaml", {}, 0.965),
    "digits-cnn": ("digits-cnn.yaml", {}, 0.881),
    # the field notes' digits MLP(64) baseline architecture, with the examples' DP recipe
    "digits-mlp64": (
        "digits-cnn.yaml",
        {"model": {"architecture": "mlp", "hiddenSizes": [64], "activation": "tanh", "channels": None}},
        0.942,
    ),
    # tuned at ε = 3 on seeds 100-102 (benchmarks/utility_tuning.py), reported on seeds 0-2
    "breast-cancer-logistic-tuned": (
        "breast-cancer-logistic.yaml",
        {"privacy": {"maxGradNorm": 0.1}, "training": {"learningRate": 40.0, "epochs": 60}},
        0.965,
    ),
    "digits-mlp128-tuned": (
        "digits-cnn.yaml",
        {
            "model": {"architecture": "mlp", "hiddenSizes": [128], "activation": "tanh", "channels": None},
            "training": {"epochs": 60, "batchSize": 512, "momentum": 0.5},
        },
        0.942,
    ),
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def make_job(config: str, *, epsilon: float, seed: int, extra: dict[str, Any] | None = None) -> DPTrainingJob:
    manifest, overrides, _ = CONFIGS[config]
    document = yaml.safe_load((EXAMPLES / manifest).read_text())
    spec = _merge(document["spec"], overrides)
    # One checkpoint chunk per run: the cadence does not change the training maths (same σ, q, T, same
    # Poisson batches), it only saves the per-chunk PLD ε evaluations (0.3-0.5 s each).
    spec = _merge(
        spec,
        {"privacy": {"targetEpsilon": epsilon}, "training": {"seed": seed}, "checkpoint": {"everySteps": 100000}},
    )
    if extra:
        spec = _merge(spec, extra)
    document["spec"] = spec
    job = parse_resource(document, source=f"{manifest}+{config}")
    assert isinstance(job, DPTrainingJob)
    return job


def run_private(job: DPTrainingJob) -> dict[str, Any]:
    data = load_data(job.spec.dataset)
    started = time.monotonic()
    plan = make_plan(job, num_examples=data.num_examples)
    with tempfile.TemporaryDirectory(prefix="dptrain-utility-") as workdir:
        result = train(job, data, plan, workdir=Path(workdir))
    return {
        "metric": data.eval_metric,
        "value": float(result.eval_metrics[data.eval_metric]),
        "epsilon": result.epsilon,
        "sigma": plan.noise_multiplier,
        "steps": plan.steps,
        "sample_rate": plan.sample_rate,
        "clipping_mode": result.clipping_mode,
        "seconds": time.monotonic() - started,
    }


def run_nonprivate(job: DPTrainingJob) -> dict[str, Any]:
    data = load_data(job.spec.dataset)
    spec = job.spec
    seed = int(spec.training.seed or 0)
    train_set, eval_set = train_eval_split(data, eval_fraction=spec.training.eval_fraction, seed=seed)
    torch.manual_seed(seed)
    model, _ = build_model(spec.model, input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=NONPRIVATE_LR, momentum=NONPRIVATE_MOMENTUM)
    criterion = nn.CrossEntropyLoss()
    features, labels = train_set.tensors
    n = len(labels)
    batch = min(NONPRIVATE_BATCH, n)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for _ in range(NONPRIVATE_EPOCHS):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            index = order[start : start + batch]
            loss = criterion(model(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    metrics = evaluate(model, eval_set, num_classes=data.num_classes, device=torch.device("cpu"))
    return {"metric": data.eval_metric, "value": metrics[data.eval_metric], "seconds": time.monotonic() - started}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--set", type=str, default=None, help="extra spec overrides as JSON (for tuning)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for name, (manifest, overrides, baseline) in CONFIGS.items():
            print(f"{name}: {manifest} {json.dumps(overrides)} baseline@ε3={baseline}")
        return 0
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    extra = json.loads(args.set) if args.set else None

    rows = []
    for config in args.configs:
        cells: dict[str, Any] = {}
        for epsilon in [*args.epsilons, None]:
            runs = []
            for seed in args.seeds:
                if epsilon is None:
                    runs.append(run_nonprivate(make_job(config, epsilon=3.0, seed=seed, extra=extra)))
                else:
                    runs.append(run_private(make_job(config, epsilon=epsilon, seed=seed, extra=extra)))
            mean, std = _mean_std([r["value"] for r in runs])
            key = "nonprivate" if epsilon is None else f"eps{epsilon:g}"
            cells[key] = {"mean": mean, "std": std, "runs": runs}
            print(f"# {config} {key}: {mean:.3f} ± {std:.3f}", file=sys.stderr, flush=True)
        rows.append(
            {
                "config": config,
                "metric": cells["nonprivate"]["runs"][0]["metric"],
                "cells": cells,
                "baseline_eps3": CONFIGS[config][2],
            }
        )

    keys = [f"eps{e:g}" for e in args.epsilons] + ["nonprivate"]
    print("| config | metric | " + " | ".join(f"ε={e:g}" for e in args.epsilons) + " | non-private | baseline ε=3 |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for row in rows:
        cells_text = " | ".join(f"{row['cells'][k]['mean']:.3f} ± {row['cells'][k]['std']:.3f}" for k in keys)
        baseline = row["baseline_eps3"]
        print(f"| {row['config']} | {row['metric']} | {cells_text} | {baseline if baseline else '–'} |")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "overrides": extra, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
