"""``audit-report.json``: ε̂ next to the claimed ε, every guessing rule's outcome, and what the audit shows."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from dptrain.audit.bound import GuessCount
from dptrain.audit.pipeline import AuditResult
from dptrain.journal import atomic_write
from dptrain.report import format_up

__all__ = ["AUDIT_REPORT_NAME", "PROVES", "audit_report", "verdict", "write_audit_report"]

AUDIT_REPORT_NAME: Final = "audit-report.json"

PROVES: Final = (
    "With the stated confidence over the canaries' coin flips, the audited pipeline is NOT (ε, δ)-DP for any ε below "
    "epsilonLowerBound. If that is above the claimed ε, the claim is wrong for this pipeline (a bug in the code or "
    "in the analysis)."
)
DOES_NOT_PROVE: Final = (
    "A lower bound at or below the claimed ε does not show the claim is right, nor that it is tight: the audit sees "
    "only what its canaries and guesses can reveal (one run, m canaries: it can never exceed about ln(m)), it runs on "
    "stand-in data rather than the job's records, and it tests the DP-SGD steps (sampling, noise, steps and, with "
    "input canaries, clipping), not the held-out releases, data loading or anything outside the pipeline."
)
_METHOD: Final = {
    "paper": "Steinke, Nasr & Jagielski, Privacy auditing with one (1) training run, NeurIPS 2023",
    "theorem": "5.2: P[W ≥ v] ≤ f(v) + 2mδ·max_{1≤i≤v} (f(v−i) − f(v))/i, f(k) = P[Binomial(r, e^ε/(1+e^ε)) ≥ k]",
    "lowerBound": "the largest ε whose bound is at most 1 − confidence (an (ε₀, δ)-DP pipeline is (ε, δ)-DP for "
    "every ε ≥ ε₀)",
    "inclusion": "each canary is included independently with probability 1/2",
    "multipleTesting": "every guessing rule is tested at (1 − confidence) / rules (Bonferroni), so keeping the best "
    "rule does not inflate the confidence",
    "gradientCanaries": "white box: canary j contributes C·e_j on a probe coordinate noised by the job's own DP "
    "optimizer; score = the sum of the released noisy coordinate over all steps",
    "inputCanaries": "black box: records with uniform random features and labels, trained through the job's "
    "clipping; score = minus their loss under the final model",
}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def verdict(result: AuditResult) -> str:
    """One line for people: ε̂ next to ε, and what it means."""
    bound = f"ε̂ = {result.epsilon_lower_bound:.3f}"
    confidence = f"{result.settings.confidence:.0%} confidence"
    if not result.settings.private:
        return f"{bound} with noise and clipping switched off ({confidence}): what this audit can detect at most"
    claim = f"ε = {format_up(result.claimed_epsilon)}"
    if result.contradicted:
        return f"{bound} > {claim} ({confidence}): the pipeline is NOT as private as claimed"
    return f"{bound} ≤ {claim} ({confidence}): the audit does not contradict the claim"


def _rule(count: GuessCount, bound: float) -> dict[str, Any]:
    return {"rule": count.rule, "guesses": count.guesses, "correct": count.correct, "epsilonLowerBound": bound}


def audit_report(result: AuditResult, *, namespace: str | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (camelCase keys)."""
    plan, best = result.plan, result.best
    return {
        "schemaVersion": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "job": {"name": result.job_name, "namespace": namespace},
        "epsilonLowerBound": result.epsilon_lower_bound,
        "epsilon": _finite(result.claimed_epsilon),
        "delta": plan.delta,
        "confidence": result.settings.confidence,
        "contradicted": result.contradicted,
        "verdict": verdict(result),
        "claim": {
            "epsilon": _finite(result.claimed_epsilon),
            "what": "ε of the job's DP-SGD steps (its training partition) at δ, by its accountant: what the job "
            "claims for any one training record",
            "plannedEpsilon": plan.planned_epsilon,
            "targetEpsilon": plan.target_epsilon,
            "accountant": plan.accountant,
        },
        "numCanaries": sum(kind.canaries for kind in result.kinds),
        "numGuesses": best.guesses if best else 0,
        "numCorrect": best.correct if best else 0,
        "bestRule": best.rule if best else None,
        "rules": result.rules,
        "canaries": [
            {
                "kind": kind.kind,
                "canaries": kind.canaries,
                "included": kind.included,
                "rules": [_rule(count, bound) for count, bound in zip(kind.counts, kind.bounds, strict=True)],
            }
            for kind in result.kinds
        ],
        "pipeline": {
            "private": result.settings.private,
            "noiseMultiplier": result.noise_multiplier,
            "maxGradNorm": result.max_grad_norm,
            "sampleRate": plan.sample_rate,
            "steps": plan.steps,
            "noisySteps": result.noisy_steps,
            "expectedBatchSize": plan.batch_size,
            "physicalBatchSize": plan.physical_batch_size,
            "clippingMode": result.clipping_mode,
        },
        "data": {"source": result.data_source, "description": result.stand_in, "records": result.records},
        "charged": "nothing: no privacy journal, no ledger (the audit never reads a private record)",
        "method": _METHOD,
        "proves": PROVES,
        "doesNotProve": DOES_NOT_PROVE,
        "wallSeconds": result.wall_seconds,
    }


def write_audit_report(result: AuditResult, output_dir: Path, *, namespace: str | None = None) -> Path:
    """Write ``output_dir/audit-report.json`` atomically (creating the folder); returns its path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / AUDIT_REPORT_NAME
    text = json.dumps(audit_report(result, namespace=namespace), indent=2, allow_nan=False, ensure_ascii=False)
    atomic_write(path, (text + "\n").encode())
    return path
