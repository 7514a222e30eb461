"""`dptrain plan` (the privacy plan without training) and `dptrain epsilon` (ε of a run, or σ for a target ε)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.cli.manifest import load_job_manifest
from dptrain.errors import ConfigurationError
from dptrain.report import format_up

if TYPE_CHECKING:
    pass


def cmd_plan(args: argparse.Namespace) -> int:
    from dptrain.plan import make_plan, reserved_from_env
    from dptrain_api import declared_num_examples

    loaded = load_job_manifest(
        args.manifest, from_env=args.from_env, data_dir=Path(args.data_dir) if args.data_dir else None
    )
    num_examples = declared_num_examples(loaded.job, loaded.dataset)
    plan = make_plan(loaded.job, dataset=loaded.dataset, reserved=reserved_from_env())
    group = _group_privacy(plan, args.records_per_patient)
    if args.json:
        print(json.dumps({**plan.to_dict(), "epochs": plan.epochs, "examples": num_examples, "perPatient": group}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan for {loaded.job.metadata.name or 'job'}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("privacy unit", plan.unit)
    counted = "individuals" if plan.unit_records else "examples"
    table.add_row(f"{counted} (declared)", f"{num_examples} ({plan.train_size} train, {plan.eval_size} held out)")
    table.add_row("q (sample rate)", f"{plan.sample_rate:.6g} (batch {plan.batch_size})")
    table.add_row("steps", f"{plan.steps} ({plan.epochs:.3g} epochs)")
    source = "reserved" if plan.reserved else ("fixed" if loaded.job.spec.privacy.noise_multiplier else "calibrated")
    table.add_row("σ (noise multiplier)", f"{format_up(plan.noise_multiplier, 6)} ({source})")
    table.add_row(
        "planned ε", f"{format_up(plan.planned_epsilon, 5)} at δ={plan.delta:g} (target {plan.target_epsilon:g})"
    )
    if plan.releases:
        table.add_row(
            "held-out releases", f"{plan.releases}, σ={format_up(plan.holdout_noise_multiplier or 0, 6)} (calibrated)"
        )
    table.add_row("accountant", plan.accountant)
    table.add_row("clipping norm C", f"{plan.max_grad_norm:g}")
    if group is not None:
        table.add_row(
            f"per patient ({group['records']:.0f} records)",
            f"ε ≤ {format_up(group['epsilon'], 4)}, δ ≤ {group['delta']:.3g} (group privacy from the record-level "
            "guarantee; declare a privacyUnit to protect the patient at ε)",
        )
    Console().print(table)
    return 0


def _group_privacy(plan: Any, records: int | None) -> dict[str, float] | None:
    """What a record-level (ε, δ) means for an individual with ``records`` records, by group privacy:
    (kε, k·e^{(k-1)ε}·δ), a valid, usually loose bound. None for unit-level plans (their ε is already per
    individual) or without K."""
    if records is None or plan.unit_records:
        return None
    if records < 1:
        raise ConfigurationError("--records-per-patient must be at least 1")
    epsilon = plan.planned_epsilon
    return {
        "records": float(records),
        "epsilon": records * epsilon,
        "delta": min(1.0, records * math.exp((records - 1) * epsilon) * plan.delta),
    }


def cmd_epsilon(args: argparse.Namespace) -> int:
    from dptrain_accounting import (
        AccountingError,
        MechanismSegment,
        calibrate_noise_multiplier,
        compute_epsilon,
        plan_steps,
    )

    if args.sample_rate is not None and args.steps is not None:
        sample_rate, steps = float(args.sample_rate), int(args.steps)
    elif None not in (args.dataset_size, args.batch_size, args.epochs):
        try:
            sample_rate, steps = plan_steps(
                dataset_size=args.dataset_size, batch_size=args.batch_size, epochs=args.epochs
            )
        except ValueError as error:
            raise ConfigurationError(str(error)) from None
    else:
        raise ConfigurationError("give --sample-rate and --steps, or --dataset-size, --batch-size and --epochs")
    try:
        if args.target_epsilon is not None:
            sigma = calibrate_noise_multiplier(
                target_epsilon=args.target_epsilon,
                delta=args.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=args.accountant,
            )
            epsilon = compute_epsilon(
                [MechanismSegment(sigma, sample_rate, steps)], delta=args.delta, accountant=args.accountant
            )
            output: dict[str, Any] = {"noiseMultiplier": sigma, "epsilon": epsilon}
            text = format_up(sigma, 6)
        else:
            if args.noise_multiplier is None:
                raise ConfigurationError("give --noise-multiplier (to compute ε) or --target-epsilon (to calibrate σ)")
            sigma = float(args.noise_multiplier)
            epsilon = compute_epsilon(
                [MechanismSegment(sigma, sample_rate, steps)], delta=args.delta, accountant=args.accountant
            )
            output = {"epsilon": epsilon, "noiseMultiplier": sigma}
            text = format_up(epsilon, 6)
    except (AccountingError, ValueError) as error:
        raise ConfigurationError(str(error)) from None
    output.update({"sampleRate": sample_rate, "steps": steps, "delta": args.delta, "accountant": args.accountant})
    print(json.dumps(output) if args.json else text)
    return 0
