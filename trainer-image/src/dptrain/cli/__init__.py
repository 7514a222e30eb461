"""``dptrain``: train a DPTrainingJob locally or in a trainer pod, plan one, or compute ε / σ.

Exit codes: 0 success, 1 unexpected crash, 2 bad manifest or configuration, 3 bad data, 4 bad model,
5 unusable checkpoint/journal, 6 privacy budget refused, 7 journal lost, 8 (`dptrain audit`) the audit's lower bound
contradicts the claimed ε, 128+N stopped by signal N (143 = SIGTERM).

``dptrain run`` is distributed when the pod's ``PET_NNODES`` × ``PET_NPROC_PER_NODE`` or ``--nproc N`` exceeds 1:
it then launches this node's processes with torch.distributed.run's launcher (:mod:`dptrain.distributed`),
each of which runs ``dptrain run`` again as a worker of the process group.

One module per command: :mod:`~dptrain.cli.run`, :mod:`~dptrain.cli.plan` (plan and epsilon),
:mod:`~dptrain.cli.audit`; :mod:`~dptrain.cli.manifest` loads manifests, :mod:`~dptrain.cli.parser` declares the
command line; ``federate``/``federation`` come from :mod:`dptrain.federated.cli`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

from dptrain.cli.audit import audit_settings
from dptrain.cli.common import program
from dptrain.cli.manifest import LoadedManifest, load_job_manifest
from dptrain.cli.parser import build_parser
from dptrain.errors import DptrainError
from dptrain_api import ExitCode, ManifestError

__all__ = ["LoadedManifest", "audit_settings", "build_parser", "load_job_manifest", "main"]


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="dptrain: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("absl", "numexpr", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dptrain`` console script; returns the exit code."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    args.argv = arguments  # a distributed run's workers get the same command line
    _configure_logging(getattr(args, "quiet", False))
    func: Callable[[argparse.Namespace], int] = args.func
    started = time.monotonic()
    try:
        return func(args)
    except ManifestError as error:
        print(f"{program()}: error: {error}", file=sys.stderr)
        return ExitCode.INVALID_CONFIGURATION
    except DptrainError as error:
        print(f"{program()}: error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        print(f"dptrain: interrupted after {time.monotonic() - started:.0f} s", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.CRASHED
