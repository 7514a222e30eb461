"""The ``dptrain`` console script. It keeps a stop that arrives while the command is still importing.

``dptrain federation ...`` imports torch and Flower before it can install its own handlers; a pod stopped in that
second would die silently, and its operator would have to count the site's whole plan as charged. So the script
records SIGTERM/SIGINT from its first line (before any heavy import) and :mod:`dptrain.federated.cli` turns what it
recorded into a clean stop that reports "nothing charged". Only the script does this: ``import dptrain`` in a
user's program never touches its signal handlers.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

__all__ = ["EARLY_SIGNALS", "main"]

EARLY_SIGNALS: list[int] = []
"""SIGTERM/SIGINT received by ``dptrain federation ...`` before its own handlers were installed."""


def _early_signal(signum: int, _frame: FrameType | None) -> None:
    EARLY_SIGNALS.append(signum)


def keep_early_signals(arguments: Sequence[str]) -> None:
    """Record stops from now on when the command is ``federation`` (it reports them once it has started)."""
    if list(arguments[:1]) == ["federation"] and threading.current_thread() is threading.main_thread():
        for early in (signal.SIGTERM, signal.SIGINT):
            signal.signal(early, _early_signal)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: keep early stops, then run the CLI (whose imports are the slow part)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    keep_early_signals(arguments)
    from dptrain.cli import main as run_command

    return run_command(arguments)
