"""dptrain: the DP-SGD trainer. ``import dptrain`` stays cheap: the torch-based API loads on first use."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dptrain.clipping import choose_clipping_mode, make_private

__all__ = ["choose_clipping_mode", "make_private"]

EARLY_SIGNALS: list[int] = []
"""SIGTERM/SIGINT received by ``dptrain federation ...`` before its own handlers were installed (while it was still
importing): the pod was stopped at start-up. :mod:`dptrain.federated.cli` turns them into a clean stop, so the site
still reports that it charged nothing instead of dying silently (which its operator must count as the whole plan)."""


def _early_signal(signum: int, _frame: FrameType | None) -> None:
    EARLY_SIGNALS.append(signum)


if sys.argv[1:2] == ["federation"] and threading.current_thread() is threading.main_thread():
    for _signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal, _early_signal)


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dptrain import clipping

        return getattr(clipping, name)
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
