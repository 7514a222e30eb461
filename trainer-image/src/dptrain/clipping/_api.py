"""dptrain.make_private: one contract for every clipping mode."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from dptrain.clipping._bookkeeping import BookkeepingClipper
from dptrain.clipping._coverage import analyse, choose_clipping_mode
from dptrain.clipping._optimizer import Clipper, PrivateOptimizer

__all__ = ["ClippingMode", "make_private"]

ClippingMode = Literal["auto", "bookkeeping", "ghost", "hooks"]
_MODES = ("auto", "bookkeeping", "ghost", "hooks")


def _loss_reduction(criterion: Any) -> str:
    reduction = getattr(criterion, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"the criterion must average (reduction='mean') or sum (reduction='sum') per-example losses over the "
            f"batch, got reduction={reduction!r}"
        )
    return str(reduction)


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    clipping: ClippingMode = "auto",
    generator: torch.Generator | None = None,
    criterion: Any = None,
    secure_noise: bool = False,
    distributed: bool = False,
    process_group: Any = None,
) -> tuple[nn.Module, PrivateOptimizer, Any]:
    """Make ``model`` + ``optimizer`` train with DP-SGD; returns ``(model, optimizer, criterion)``.

    Contract (every mode): after ``criterion(model(x), y).backward(); optimizer.step()`` the wrapped
    optimizer steps with

        ``.grad = (Σ_i clip_C(g_i) + N(0, σ²C²·I)) / expected_batch_size``

    where ``g_i`` is example i's gradient of its own loss, ``clip_C(g) = g · min(1, C / (‖g‖ + 1e-6))``
    (Opacus' formula), ``C = max_grad_norm``, ``σ = noise_multiplier``, and the noise is ONE flat draw
    over all trainable parameters from ``generator``. For physical micro-batches of one logical
    batch: forward + backward, then ``optimizer.accumulate()``, per micro-batch; ``step()`` once
    at the end (it accumulates a pending micro-batch itself). ``step()`` without any micro-batch
    is a noise-only step (an empty Poisson batch). ``zero_grad``/``state_dict``/``load_state_dict``
    are the wrapped optimizer's.

    ``clipping``: "bookkeeping" (dptrain's kernels: one backward, no per-example gradients
    materialised; raises :class:`~dptrain.errors.UnsupportedLayerError` naming the first module it
    does not cover), "ghost"/"hooks" (Opacus, model wrapped in its GradSampleModule), or "auto":
    the fastest exact one, see :func:`choose_clipping_mode`. Layers that mix examples (BatchNorm)
    raise :class:`~dptrain.errors.BatchMixingLayerError` in every mode.

    ``criterion`` (default ``nn.CrossEntropyLoss()``) must reduce per-example losses by "mean" or
    "sum" over the batch (dimension 0). ``expected_batch_size`` is q·N (global over ranks); see
    :class:`PrivateOptimizer` for ``secure_noise``, ``distributed`` and ``process_group``.
    Book-keeping sets the covered parameters' ``requires_grad`` to False while attached
    (``optimizer.clipper.detach()`` restores it) and needs every covered layer applied once per
    forward pass to batch-first inputs; it checks both at run time and raises otherwise.
    """
    if clipping not in _MODES:
        raise ValueError(f"clipping must be one of {', '.join(_MODES)}, got {clipping!r}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    reduction = _loss_reduction(criterion)
    mode = choose_clipping_mode(model).mode if clipping == "auto" else clipping
    if mode != "bookkeeping":  # batch-mixing layers are refused in every mode
        for problem in analyse(model).problems:
            if problem.kind == "batch_mixing":
                raise problem.error()
    clipper: Clipper
    private_model: nn.Module = model
    if mode == "bookkeeping":
        clipper = BookkeepingClipper(model, max_grad_norm=max_grad_norm, loss_reduction=reduction)
    elif mode == "hooks":
        from dptrain.clipping._opacus import OpacusHooksClipper

        hooks = OpacusHooksClipper(model, max_grad_norm=max_grad_norm, loss_reduction=reduction)
        clipper, private_model = hooks, hooks.module
    else:
        from dptrain.clipping._opacus import OpacusGhostClipper

        ghost = OpacusGhostClipper(model, max_grad_norm=max_grad_norm, criterion=criterion, loss_reduction=reduction)
        clipper, private_model, criterion = ghost, ghost.module, ghost.criterion
    private_optimizer = PrivateOptimizer(
        optimizer,
        clipper=clipper,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        generator=generator,
        secure_noise=secure_noise,
        distributed=distributed,
        process_group=process_group,
    )
    private_optimizer.clipping_mode = mode
    return private_model, private_optimizer, criterion
