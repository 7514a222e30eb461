"""Benchmark: the one-run privacy audit's ε̂ next to the claimed ε, for the shipped examples at ε = 1, 3, 8,
for the same pipelines with noise and clipping off, and for a broken pipeline (σ/10 while σ is claimed).

    .venv/bin/python benchmarks/audit.py [--examples NAME ...] [--epsilons 1 3 8] [--seeds 0 1 2]
                                         [--canaries 1000] [--json out.json]

Every row goes through ``dptrain.audit.run_audit``, i.e. ``dptrain audit``'s code path: the example's
DPTrainingJob (``privacy.targetEpsilon`` replaced), its plan (PLD calibration of σ), the job's model,
optimizer, clipping mode, σ, q and steps, ``--canaries`` gradient-space and input-space canaries each, on
the public built-in data. Each seed is one audit (fresh canaries, coins and DP noise); the table shows the
mean ε̂ over seeds, the largest, and the mean wall time of one audit (plan, training, guesses, bound).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from dptrain.audit import AuditResult, AuditSettings, run_audit
from dptrain.audit import pipeline as audit_pipeline
from dptrain.cli import load_job_manifest
from dptrain_api import DPTrainingJob

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ("breast-cancer-logistic", "flchain-mlp", "digits-cnn")
EPSILONS = (1.0, 3.0, 8.0)


def _job(example: str, epsilon: float) -> DPTrainingJob:
    job = load_job_manifest(str(ROOT / "examples" / f"{example}.yaml")).job
    job = job.model_copy(deep=True)
    job.spec.privacy.target_epsilon = epsilon
    return job


def _broken_noise() -> Any:
    """Swap in a pipeline whose optimizer adds σ/10 (the plan and the claim keep σ); returns the undo."""
    honest = audit_pipeline.make_job_private

    def broken(job: DPTrainingJob, plan: Any, model: Any, **kwargs: Any) -> Any:
        return honest(job, plan, model, **{**kwargs, "noise_multiplier": plan.noise_multiplier / 10})

    audit_pipeline.make_job_private = broken  # type: ignore[assignment]
    return lambda: setattr(audit_pipeline, "make_job_private", honest)


def _row(example: str, setting: str, epsilon: float, results: list[AuditResult]) -> dict[str, Any]:
    def kind(result: AuditResult, name: str) -> float:
        bounds = [max(k.bounds, default=0.0) for k in result.kinds if k.kind == name]
        return bounds[0] if bounds else 0.0

    bounds = [r.epsilon_lower_bound for r in results]
    best = max(results, key=lambda r: r.epsilon_lower_bound)
    return {
        "example": example,
        "setting": setting,
        "targetEpsilon": epsilon,
        "claimedEpsilon": results[0].claimed_epsilon if setting != "non-private" else None,
        "sigma": results[0].noise_multiplier,
        "steps": results[0].plan.steps,
        "sampleRate": results[0].plan.sample_rate,
        "clippingMode": results[0].clipping_mode,
        "epsilonLowerBound": bounds,
        "mean": statistics.fmean(bounds),
        "max": max(bounds),
        "gradientMax": max(kind(r, "gradient") for r in results),
        "inputMax": max(kind(r, "input") for r in results),
        "bestGuesses": f"{best.best.correct}/{best.best.guesses}" if best.best else "-",
        "contradicted": sum(r.contradicted for r in results),
        "wallSeconds": statistics.fmean(r.wall_seconds for r in results),
    }


def _audits(job: DPTrainingJob, seeds: list[int], canaries: int, *, private: bool) -> list[AuditResult]:
    settings = [AuditSettings(canaries=canaries, kind="both", private=private, seed=seed) for seed in seeds]
    return [run_audit(job, settings=s) for s in settings]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    rows = []
    for example in args.examples:
        for epsilon in args.epsilons:
            job = _job(example, epsilon)
            rows.append(_row(example, "DP", epsilon, _audits(job, args.seeds, args.canaries, private=True)))
        job = _job(example, 3.0)
        rows.append(_row(example, "non-private", 3.0, _audits(job, args.seeds, args.canaries, private=False)))
        undo = _broken_noise()
        try:
            rows.append(_row(example, "broken: σ/10", 3.0, _audits(job, args.seeds, args.canaries, private=True)))
        finally:
            undo()
    print(
        f"\n{args.canaries} canaries of each kind, seeds {args.seeds}, 95 % confidence, δ = 1e-5\n\n"
        "| example | pipeline | claimed ε | σ | ε̂ mean | ε̂ max | gradient ε̂ max | input ε̂ max | best v/r | "
        "contradicted | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for row in rows:
        claimed = f"{row['claimedEpsilon']:.3f}" if row["claimedEpsilon"] is not None else "– (none)"
        print(
            f"| {row['example']} | {row['setting']} | {claimed} | {row['sigma']:.3g} | {row['mean']:.2f} | "
            f"{row['max']:.2f} | {row['gradientMax']:.2f} | {row['inputMax']:.2f} | {row['bestGuesses']} | "
            f"{row['contradicted']}/{len(args.seeds)} | {row['wallSeconds']:.1f} |"
        )
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
