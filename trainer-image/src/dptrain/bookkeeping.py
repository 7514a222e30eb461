"""Book-keeping clipping (Bu et al., ICML 2023) for models made only of nn.Linear and elementwise layers.

One forward and ONE backward pass of the batch loss, no per-example gradients materialised:

* a forward hook keeps each Linear's input activations A (B×d) and hooks its output to keep the
  output gradients G (B×p) during backward;
* per-example gradient norms come from the "ghost norm" identity for a Linear with 2-D input,
  ``||∇W_i||² = ||a_i||²·||g_i||²`` and ``||∇b_i||² = ||g_i||²``, summed over the layers;
* clip factors ``c_i = min(1, C / (||∇_i|| + 1e-6))`` (Opacus' formula), then the clipped sums
  ``Σ_i c_i ∇W_i = (c ⊙ G)ᵀ A`` and ``Σ_i c_i g_i`` (bias) as one matrix product per layer;
* Opacus' DPOptimizer machinery does the rest unchanged: Gaussian noise N(0, σ²C²) per
  coordinate from the given generator, division by the EXPECTED batch size, the step hook, and
  skipped steps for physical micro-batches (BatchMemoryManager).

Only exact for models where every trainable parameter belongs to an nn.Linear applied once per
forward pass to a (batch, features) input; :func:`supports_bookkeeping` checks the structure
and the optimizer checks the rest at run time (it raises rather than clip wrongly).
"""

from __future__ import annotations

from typing import Any, Final

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

__all__ = ["BookkeepingOptimizer", "supports_bookkeeping"]

_ELEMENTWISE: Final = (
    nn.Sequential,
    nn.Flatten,
    nn.Identity,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Dropout,
)


def supports_bookkeeping(model: nn.Module) -> bool:
    """True if the model's modules are nn.Linear (all parameters trainable) and parameter-free elementwise layers.

    Exact types only (a subclass may change forward). Containers other than nn.Sequential are
    refused because their forward may reuse a layer or mix examples.
    """
    linears = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            if not all(p.requires_grad for p in module.parameters(recurse=False)):
                return False
            linears += 1
        elif type(module) not in _ELEMENTWISE or any(True for _ in module.parameters(recurse=False)):
            return False
    return linears > 0


class BookkeepingOptimizer(DPOptimizer):  # type: ignore[misc]
    """A DPOptimizer whose clipping comes from Linear activations and output gradients (no grad_sample).

    Use with the UNWRAPPED model and a mean-reduced loss (``loss_reduction="mean"``, as the engine
    does): output gradients are rescaled by the physical batch size to per-example gradients.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        model: nn.Module,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> None:
        if not supports_bookkeeping(model):
            raise ValueError("book-keeping clipping needs a model of nn.Linear and elementwise layers only")
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
        )
        self._linears = [m for m in model.modules() if type(m) is nn.Linear]
        managed = {id(p) for p in self.params}
        for layer in self._linears:
            for p in layer.parameters(recurse=False):
                if id(p) not in managed:
                    raise ValueError("the optimizer must manage every parameter of the model's Linear layers")
        if len(managed) != sum(len(list(layer.parameters(recurse=False))) for layer in self._linears):
            raise ValueError("the optimizer manages parameters outside the model's Linear layers")
        self._activations: dict[int, list[torch.Tensor]] = {}
        self._output_grads: dict[int, list[torch.Tensor]] = {}
        self._handles = [layer.register_forward_hook(self._capture) for layer in self._linears]

    # --- capture --------------------------------------------------------------------------------------

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation: nothing to clip
        activation = inputs[0]
        if activation.dim() != 2:
            raise RuntimeError(
                f"book-keeping clipping needs 2-D Linear inputs (batch, features), got shape {tuple(activation.shape)}"
            )
        key = id(module)
        self._activations.setdefault(key, []).append(activation.detach())

        def keep(grad: torch.Tensor) -> None:
            self._output_grads.setdefault(key, []).append(grad.detach())

        output.register_hook(keep)  # type: ignore[no-untyped-call]

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- clipping ---------------------------------------------------------------------------------------

    def _layer_captures(self) -> list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
        captures = []
        for layer in self._linears:
            key = id(layer)
            activations = self._activations.get(key, [])
            grads = self._output_grads.get(key, [])
            if len(activations) != 1 or len(grads) != 1:
                raise RuntimeError(
                    f"book-keeping clipping needs exactly one forward and one backward pass per Linear between "
                    f"optimizer steps; got {len(activations)} forward and {len(grads)} backward for {layer}"
                )
            captures.append((layer, activations[0], grads[0]))
        return captures

    def clip_and_accumulate(self) -> None:
        captures = self._layer_captures()
        batch = captures[0][1].shape[0]
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        norms_squared: torch.Tensor | None = None
        scaled = []
        for layer, activation, grad in captures:
            if activation.shape[0] != batch or grad.shape[0] != batch:
                raise RuntimeError("Linear layers saw different batch sizes in one pass")
            g = grad.to(layer.weight.dtype) * scale  # per-example output gradients
            a = activation.to(layer.weight.dtype)
            g_squared = g.pow(2).sum(dim=1)
            layer_norms = a.pow(2).sum(dim=1) * g_squared
            if layer.bias is not None:
                layer_norms = layer_norms + g_squared
            norms_squared = layer_norms if norms_squared is None else norms_squared + layer_norms
            scaled.append((layer, a, g))
        assert norms_squared is not None
        factors = (self.max_grad_norm / (norms_squared.sqrt() + 1e-6)).clamp(max=1.0)
        for layer, a, g in scaled:
            weighted = g * factors.unsqueeze(1)
            sums = [(layer.weight, weighted.t() @ a)]
            if layer.bias is not None:
                sums.append((layer.bias, weighted.sum(dim=0)))
            for p, summed in sums:  # Opacus keeps the clipped sum in the ad-hoc attribute p.summed_grad
                previous = getattr(p, "summed_grad", None)
                p.summed_grad = summed if previous is None else previous + summed  # type: ignore[attr-defined]
        self._activations.clear()
        self._output_grads.clear()

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size

    def pre_step(self, closure: Any = None) -> bool:
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._activations.clear()
        self._output_grads.clear()
        if not self._is_last_step_skipped:
            for p in self.params:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)
