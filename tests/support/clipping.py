"""Reference DP-SGD for the clipping tests: one backward per example, clip, sum, divide (float64)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dptrain.clipping import BookkeepingClipper, PrivateOptimizer, make_private

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example_grads(model: nn.Module, x: Any, y: torch.Tensor, criterion: Loss) -> list[list[torch.Tensor]]:
    """Example i's gradient of its own loss, for every trainable parameter (model left untouched)."""
    reference = copy.deepcopy(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = []
    for i in range(len(y)):
        xi = tuple(t[i : i + 1] for t in x) if isinstance(x, tuple) else x[i : i + 1]
        out = reference(*xi) if isinstance(xi, tuple) else reference(xi)
        loss = criterion(out, y[i : i + 1])
        found = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)])
    return grads


def norms(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in gs)) for gs in grads])  # type: ignore[misc]


def reference_update(
    model: nn.Module, x: Any, y: torch.Tensor, *, clip: float, expected: float, criterion: Loss
) -> list[torch.Tensor]:
    """(Σ_i clip_C(g_i)) / expected with Opacus' clip factor min(1, C / (‖g‖ + 1e-6))."""
    grads = per_example_grads(model, x, y, criterion)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for gs, norm in zip(grads, norms(grads), strict=True):
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, gs, strict=True):
            t.add_(g * factor)
    return [t / expected for t in total]


def median_clip(model: nn.Module, x: Any, y: torch.Tensor, criterion: Loss) -> float:
    """A clipping bound that clips about half the examples (and leaves the others alone)."""
    found = norms(per_example_grads(model, x, y, criterion))
    return float(found.median()) * 1.0001 if len(found) > 1 else float(found[0]) * 0.5


def private_update(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    *,
    clip: float,
    expected: float,
    criterion: Loss | None = None,
    clipping: str = "bookkeeping",
    **options: Any,
) -> list[torch.Tensor]:
    """.grad after one σ = 0 step of make_private (on a deep copy of model), in model.parameters() order."""
    private = copy.deepcopy(model)
    trainable = [p for p in private.parameters() if p.requires_grad]
    loss_fn: Any = criterion or nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(trainable, lr=0.0)
    wrapped: nn.Module = private
    optimizer: Any
    if "strategy" in options:  # the kernels' norm strategy is below make_private's surface
        reduction = str(getattr(loss_fn, "reduction", "mean"))
        clipper = BookkeepingClipper(private, max_grad_norm=clip, loss_reduction=reduction, **options)
        optimizer = PrivateOptimizer(sgd, clipper=clipper, noise_multiplier=0.0, expected_batch_size=expected)
    else:
        wrapped, optimizer, loss_fn = make_private(
            private,
            sgd,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=expected,
            clipping=clipping,  # type: ignore[arg-type]
            criterion=loss_fn,
            **options,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = wrapped(*x) if isinstance(x, tuple) else wrapped(x)
        loss_fn(out, y).backward()
    optimizer.step()
    result = []
    for p in trainable:
        assert p.grad is not None
        result.append(p.grad.detach().clone())
    return result


def max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    flat_got = torch.cat([t.flatten() for t in got])
    flat_want = torch.cat([t.flatten() for t in want])
    return float((flat_got - flat_want).abs().max() / flat_want.abs().max().clamp(min=1e-30))
