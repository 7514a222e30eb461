"""The command line: one sub-command per module of this package (federate/federation come from dptrain.federated)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from dptrain.cli.audit import cmd_audit
from dptrain.cli.plan import cmd_epsilon, cmd_plan
from dptrain.cli.run import cmd_run
from dptrain_api import (
    PodEnv,
)

if TYPE_CHECKING:
    pass


def _add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "manifest",
        nargs="?",
        metavar="MANIFEST",
        help="YAML/JSON file with the DPTrainingJob (and the PrivateDataset it names); - reads stdin",
    )
    parser.add_argument("--from-env", metavar="VAR", help="read the manifest from environment variable VAR instead")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder that file dataset paths are relative to (default: the manifest's folder)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dptrain", description="Differentially private training (DP-SGD, Opacus).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="train a DPTrainingJob (resumes from --output's checkpoint)")
    _add_manifest_arguments(run)
    run.add_argument("--output", metavar="DIR", help="checkpoint and output folder (default: runs/<job name>)")
    run.add_argument("--metrics-port", type=int, default=0, metavar="N", help="serve Prometheus metrics (0: off)")
    run.add_argument(
        "--metrics-address",
        default=os.environ.get(PodEnv.METRICS_ADDRESS) or "0.0.0.0",
        metavar="ADDR",
        help="address to serve metrics on (default: $DPTRAIN_METRICS_ADDRESS, else 0.0.0.0)",
    )
    run.add_argument(
        "--termination-message-path",
        metavar="P",
        help="where to write the termination message "
        "(default: $DPTRAIN_TERMINATION_MESSAGE_PATH, or /dev/termination-log in a pod)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar: plain lines at checkpoints only")
    run.add_argument(
        "--metrics-linger",
        type=float,
        default=30.0,
        metavar="S",
        help="after a privacy audit (spec.audit), keep serving metrics this long so they are scraped (default 30)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N data-parallel processes on this machine (torch.distributed: gloo on CPU, one GPU each "
        "with CUDA); in a pod the operator's PET_* environment says how many",
    )
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser("plan", help="print the privacy plan (q, steps, σ, planned ε) without training")
    _add_manifest_arguments(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument(
        "--records-per-patient",
        type=int,
        metavar="K",
        help="for a record-level plan: what it means for a patient with K records (group privacy)",
    )
    plan.set_defaults(func=cmd_plan)

    audit = commands.add_parser(
        "audit",
        help="measure a lower bound on ε with canaries (one run on stand-in data, nothing charged)",
        description="Train the job's DP-SGD pipeline once with canaries on public (built-in datasets) or synthetic "
        "(file datasets) stand-in data and write audit-report.json: a lower bound on ε next to the claimed ε. "
        "Exit code 8 when the bound contradicts the claim. Flags override the job's spec.audit.",
    )
    _add_manifest_arguments(audit)
    audit.add_argument("--output", metavar="DIR", help="folder for audit-report.json (default: runs/<job name>-audit)")
    audit.add_argument("--canaries", type=int, metavar="M", help="canaries of each kind (default 1000)")
    audit.add_argument(
        "--kind", choices=["gradient", "input", "poisoned", "both", "all"], help="canary kind (default both)"
    )
    audit.add_argument(
        "--processes", type=int, metavar="N", help="run the DP-SGD steps through the distributed path on N processes"
    )
    audit.add_argument("--confidence", type=float, metavar="C", help="confidence of the bound (default 0.95)")
    audit.add_argument(
        "--data",
        choices=["auto", "public", "synthetic"],
        help="stand-in data: the public built-in data, or synthetic records shaped like the dataset (auto: public for "
        "built-in datasets, synthetic for files; a PrivateDataset's file is never read)",
    )
    audit.add_argument(
        "--non-private", action="store_true", help="switch noise and clipping off: how much the audit can detect"
    )
    audit.add_argument("--seed", type=int, metavar="N", help="seed of the canaries (the DP noise is always fresh)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=cmd_audit)

    epsilon = commands.add_parser("epsilon", help="ε of a DP-SGD run, or the σ that meets a target ε")
    epsilon.add_argument("--sample-rate", type=float, metavar="Q")
    epsilon.add_argument("--steps", type=int, metavar="T")
    epsilon.add_argument("--dataset-size", type=int, metavar="N", help="with --batch-size and --epochs, instead of Q/T")
    epsilon.add_argument("--batch-size", type=int, metavar="B")
    epsilon.add_argument("--epochs", type=float, metavar="E")
    epsilon.add_argument("--noise-multiplier", type=float, metavar="S")
    epsilon.add_argument("--target-epsilon", type=float, metavar="E", help="calibrate σ for this ε instead")
    epsilon.add_argument("--delta", type=float, required=True, metavar="D")
    epsilon.add_argument("--accountant", default="pld", choices=["pld", "prv", "rdp"])
    epsilon.add_argument("--json", action="store_true", help="machine-readable output")
    epsilon.set_defaults(func=cmd_epsilon)

    from dptrain.federated.cli import add_commands  # federate / federation (Flower: the `federated` extra)

    add_commands(commands)
    return parser
