"""dptrain: the DP-SGD trainer. ``import dptrain`` stays cheap (the torch-based API loads on first use) and has no
side effects: the console script's signal handling lives in :mod:`dptrain._entry`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dptrain.clipping import choose_clipping_mode, make_private

__all__ = ["choose_clipping_mode", "make_private"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dptrain import clipping

        return getattr(clipping, name)
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
