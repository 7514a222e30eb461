"""Per-example clip factors, with non-finite examples given weight exactly zero (every clipping mode uses this)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clip_weights"]


def clip_weights(norms: Tensor, max_grad_norm: float) -> tuple[Tensor, Tensor | None]:
    """Opacus' clip factors ``min(1, C / (‖g_i‖ + 1e-6))`` per example, and which examples are not finite.

    An example whose gradient norm is NaN or infinite (a non-finite loss or activation, an inf entry, an overflow:
    crafted weights can make exactly one record overflow) gets factor 0, and is returned in ``bad`` (None when every
    example is finite) so that the caller zeroes its rows BEFORE any sum: 0·NaN and 0·inf are NaN, and one NaN
    would poison the whole noisy update. The rule reads that example's own norm only, never the aggregate, so
    whether a record counts depends on that record (and the model) alone. Only the time taken by the caller's
    zeroing depends on ``bad`` being None; what it computes does not.
    """
    factors = (max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return factors, None
    return torch.where(finite, factors, factors.new_zeros(())), ~finite
