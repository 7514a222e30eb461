"""`dptrain audit`: a lower bound on ε with canaries, one run on stand-in data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.cli.manifest import load_job_manifest
from dptrain_api import (
    DPTrainingJob,
    ExitCode,
)

if TYPE_CHECKING:
    from dptrain.audit import AuditSettings


def audit_settings(job: DPTrainingJob, args: argparse.Namespace | None = None) -> AuditSettings:
    """The job's ``spec.audit`` (defaults when unset), with any flag of ``dptrain audit`` given in ``args`` on top."""
    from dptrain.audit import AuditSettings

    spec = job.spec.audit
    values: dict[str, Any] = {}
    if spec is not None:
        values = {"canaries": spec.canaries, "kind": spec.kind, "confidence": spec.confidence}
    if args is not None:
        flags = {
            "canaries": args.canaries,
            "kind": args.kind,
            "confidence": args.confidence,
            "data": args.data,
            "seed": args.seed,
            "processes": args.processes,
        }
        values.update({key: value for key, value in flags.items() if value is not None})
        values["private"] = not args.non_private
    return AuditSettings(**values)


def cmd_audit(args: argparse.Namespace) -> int:
    from dptrain.audit import audit_report, run_audit, verdict, write_audit_report
    from dptrain.plan import make_plan, reserved_from_env

    loaded = load_job_manifest(
        args.manifest, from_env=args.from_env, data_dir=Path(args.data_dir) if args.data_dir else None
    )
    job = loaded.job
    settings = audit_settings(job, args)
    output = Path(args.output) if args.output else Path("runs") / f"{job.metadata.name or 'job'}-audit"
    plan = make_plan(job, dataset=loaded.dataset, reserved=reserved_from_env())
    if not args.json:
        kinds = " and ".join(settings.kinds)
        print(
            f"dptrain: auditing {job.metadata.name or 'job'}: {settings.canaries} {kinds} canaries per kind, "
            f"{plan.steps} steps{'' if settings.private else ' with noise and clipping OFF'}",
            file=sys.stderr,
        )
    result = run_audit(job, dataset=loaded.dataset, settings=settings, plan=plan, base_dir=loaded.base_dir)
    path = write_audit_report(result, output, namespace=job.metadata.namespace)
    if args.json:
        print(json.dumps(audit_report(result, namespace=job.metadata.namespace), allow_nan=False, ensure_ascii=False))
    else:
        best = result.best
        guesses = f"{best.correct} of {best.guesses} guesses right ({best.rule})" if best else "no informative guesses"
        print(f"{verdict(result)}\n{guesses}; {result.wall_seconds:.1f} s; report: {path}")
    return int(ExitCode.AUDIT_CONTRADICTED) if result.contradicted else 0
