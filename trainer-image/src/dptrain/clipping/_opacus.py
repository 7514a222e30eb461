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

from dptrain.clipping._factors import clip_weights
from dptrain.errors import ClippingError, ModelError

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
        self.groups: Tensor | None = None
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
        groups = self.groups
        units = int(groups.max()) + 1 if groups is not None and batch else batch
        norms = torch.zeros(units, dtype=present[0].dtype, device=present[0].device)
        for f in flat:
            if f is not None:  # per unit: the norm of the unit's summed gradient
                summed = f if groups is None else f.new_zeros((units, f.shape[1])).index_add_(0, groups, f)
                norms.add_(summed.square().sum(dim=1))
        factors, bad = clip_weights(norms.sqrt_(), self.max_grad_norm)
        if groups is not None:  # Σ_u c_u Σ_{i∈u} g_i = Σ_i c_{u(i)} g_i
            factors, bad = factors[groups], bad[groups] if bad is not None else None
        for p, view, f in zip(self.parameters, self._views, flat, strict=True):
            if f is not None and batch > 0:
                rows = f if bad is None else torch.where(bad[:, None], f.new_zeros(()), f)
                view.addmv_(rows.t(), factors.to(f.dtype))
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


def _sanitising_ghost_module(model: nn.Module, *, loss_reduction: str, max_grad_norm: float) -> Any:
    """Opacus' ghost-clipping module whose clip coefficients give non-finite examples weight 0 and remember them."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    class SanitisingGhostModule(GradSampleModuleFastGradientClipping):  # type: ignore[misc]
        nonfinite: Tensor | None = None

        def get_clipping_coef(self) -> Tensor:
            factors, bad = clip_weights(self.get_norm_sample(), self.max_grad_norm)
            if bad is not None:
                self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
            return factors

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SanitisingGhostModule(
            model, batch_first=True, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm
        )


def _rows(value: Any, keep: Tensor, batch: int) -> Any:
    """``value`` restricted to the kept examples when it is a batch-first tensor of the micro-batch."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[keep]
    return value


class OpacusGhostClipper(_OpacusClipper):
    """Opacus ghost clipping: norms in a first backward, the clipped sum in a second (its loss wrapper).

    Its second backward weights example i's loss by c_i, so an example whose norm is not finite poisons the sum even
    at c_i = 0 (autograd still multiplies 0 by its NaN/inf partials). Such a micro-batch is therefore computed
    again without those examples (the model's inputs and the targets are kept for it): the same clipped sum as
    if they had weight 0, and the same outcome whatever the other examples are. Only its time differs.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, criterion: Any, loss_reduction: str = "mean") -> None:
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        parameters = _trainable(model)
        module = _sanitising_ghost_module(model, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm)
        super().__init__(module, parameters, max_grad_norm)
        self._reset = _GradientReset(parameters, loss_reduction)
        self._loss = DPLossFastGradientClipping(module, self._reset, criterion, loss_reduction)
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self._target: Tensor | None = None
        self._recomputing = False
        module.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)

    @property
    def groups(self) -> Tensor | None:
        return None

    @groups.setter
    def groups(self, groups: Tensor | None) -> None:
        if groups is not None:
            raise ClippingError(
                "Opacus' ghost clipping clips each record's gradient: privacy units (several records clipped "
                "together) need clipping='bookkeeping' or 'hooks'"
            )

    def criterion(self, input: Tensor, target: Tensor) -> Any:
        """Opacus' ghost loss (call ``.backward()`` on it); the target is kept for a recomputation."""
        self._target = target
        return self._loss(input, target)

    def _keep_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and not self._recomputing:
            self._inputs = (args, kwargs)

    def _take_grads(self) -> int:
        """Move pending .grad (Σ_i c_i g_i of the last backward) into the views; 1 if any was pending."""
        pending = 0
        for p, view, last in zip(self.parameters, self._views, self._grad_views, strict=True):
            grad = p.grad
            if grad is not None and grad is not last:
                view.add_(grad.reshape(-1))
                p.grad = None
                pending = 1
        return pending

    def _discard_grads(self) -> None:
        for p, last in zip(self.parameters, self._grad_views, strict=True):
            if p.grad is not None and p.grad is not last:
                p.grad = None

    def flush(self) -> int:
        # After the ghost loss's backward, .grad holds Σ_i c_i g_i. A .grad that is the optimizer's own
        # view of the last step (or None) means nothing is pending.
        if self._recomputing:
            return 0
        for _ in range(3):  # the kept examples were finite: a second pass finds none to drop (bounded regardless)
            bad: Tensor | None = getattr(self.module, "nonfinite", None)
            self.module.nonfinite = None  # type: ignore[assignment]
            if bad is None or self._target is None:
                return self._take_grads()
            self._discard_grads()
            self._recompute(~bad)
        self._discard_grads()  # pragma: no cover - the kept examples stayed non-finite: they count for nothing
        return 1

    def _recompute(self, keep: Tensor) -> None:
        """Forward and ghost backward again on the kept examples of the last micro-batch (none kept: nothing)."""
        assert self._target is not None
        batch = int(self._target.shape[0])
        if not bool(keep.any()):
            return
        (args, kwargs), target = self._inputs, self._target
        self._recomputing = True
        try:
            output = self.module(
                *(_rows(a, keep, batch) for a in args), **{k: _rows(v, keep, batch) for k, v in kwargs.items()}
            )
            self._loss(output, target[keep]).backward()
        finally:
            self._recomputing = False
