"""Opacus' hooks and ghost clipping behind the same flat-buffer optimizer (modes "hooks" and "ghost").

Opacus computes the per-example clipping; accumulation, noise, normalisation and the distributed
all-reduce are PrivateOptimizer's, so every mode follows one contract.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dptrain.errors import ModelError

__all__ = ["OpacusGhostClipper", "OpacusHooksClipper"]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ModelError("the model has no trainable parameters")
    return parameters


class _OpacusClipper:
    def __init__(self, module: nn.Module, parameters: list[nn.Parameter], max_grad_norm: float) -> None:
        self.module = module
        self.parameters = parameters
        self.max_grad_norm = float(max_grad_norm)
        self._views: list[Tensor] = []
        self._grad_views: list[Tensor] = []
        module.register_forward_pre_hook(self._before_forward)

    def bind(self, sums: Mapping[int, Tensor], grads: Mapping[int, Tensor]) -> None:
        self._views = [sums[id(p)].view(-1) for p in self.parameters]
        self._grad_views = [grads[id(p)] for p in self.parameters]

    def flush(self) -> int:
        raise NotImplementedError

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self.flush()  # a backpropagated micro-batch that was not accumulated yet


class OpacusHooksClipper(_OpacusClipper):
    """Opacus GradSampleModule (per-example gradients materialised), clipped with Opacus' formula."""

    def __init__(self, model: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean") -> None:
        from opacus import GradSampleModule

        parameters = _trainable(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = GradSampleModule(model, batch_first=True, loss_reduction=loss_reduction)
        super().__init__(module, parameters, max_grad_norm)

    def flush(self) -> int:
        samples = [getattr(p, "grad_sample", None) for p in self.parameters]
        present = [s for s in samples if s is not None]
        if not present:
            return 0
        batch = int(present[0].shape[0])
        flat = [None if s is None else s.reshape(batch, -1) for s in samples]
        norms = torch.zeros(batch, dtype=present[0].dtype, device=present[0].device)
        for f in flat:
            if f is not None:
                norms.add_(f.square().sum(dim=1))
        factors = (self.max_grad_norm / (norms.sqrt_() + 1e-6)).clamp_(max=1.0)
        for p, view, f in zip(self.parameters, self._views, flat, strict=True):
            if f is not None and batch > 0:
                view.addmv_(f.t(), factors.to(f.dtype))
            p.grad_sample = None  # type: ignore[attr-defined]
            p.grad = None  # autograd's non-private sum: never used
        return batch


class _GradientReset:
    """What Opacus' ghost loss calls between its two backward passes (an optimizer's zero_grad)."""

    def __init__(self, parameters: list[nn.Parameter], loss_reduction: str) -> None:
        self._parameters = parameters
        self.loss_reduction = loss_reduction

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._parameters:
            p.grad = None


class OpacusGhostClipper(_OpacusClipper):
    """Opacus ghost clipping: norms in a first backward, the clipped sum in a second (its loss wrapper)."""

    def __init__(self, model: nn.Module, *, max_grad_norm: float, criterion: Any, loss_reduction: str = "mean") -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        parameters = _trainable(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm
            )
        super().__init__(module, parameters, max_grad_norm)
        self._reset = _GradientReset(parameters, loss_reduction)
        self.criterion = DPLossFastGradientClipping(module, self._reset, criterion, loss_reduction)

    def flush(self) -> int:
        # After the ghost loss's backward, .grad holds Σ_i c_i g_i. A .grad that is the optimizer's own
        # view of the last step (or None) means nothing is pending.
        pending = 0
        for p, view, last in zip(self.parameters, self._views, self._grad_views, strict=True):
            grad = p.grad
            if grad is not None and grad is not last:
                view.add_(grad.reshape(-1))
                p.grad = None
                pending = 1
        return pending
