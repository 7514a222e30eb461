"""The book-keeping clipper: hooks on every covered layer, per-example norms and clipped sums after backward.

One forward and ONE backward pass of the batch loss per micro-batch. The covered parameters are set
to ``requires_grad=False`` while the clipper is attached, so autograd computes only the gradients
that flow between layers (which the kernels need) and never the non-private parameter gradients
(which they replace): the private step then costs about as many matrix products as a plain one.
The first covered layer's output is made a fresh autograd root so that its gradient still arrives.
:meth:`BookkeepingClipper.detach` restores the flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from dptrain.clipping._coverage import analyse
from dptrain.clipping._factors import clip_weights
from dptrain.clipping._layers import LayerKernel
from dptrain.clipping._sites import Grouping, NormStrategy, Site
from dptrain.errors import ClippingProtocolError, ModelError, ParameterReuseError

__all__ = ["BookkeepingClipper"]

_METADATA: Final = frozenset(
    {
        "shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim", "layout", "is_cuda",
        "data", "names", "size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous", "element_size",
        "data_ptr", "storage_offset", "detach", "is_floating_point", "is_complex", "get_device", "_version",
        "__len__", "__hash__", "__repr__", "__format__",
    }
)  # fmt: skip


def _function_name(func: Any) -> str:
    name = str(getattr(func, "__name__", ""))
    if name == "__get__":  # a property such as Tensor.shape: the descriptor carries the name
        name = str(getattr(getattr(func, "__self__", None), "__name__", ""))
    return name


def _tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, Tensor))
    return found


class _ParameterUseGuard(TorchFunctionMode):
    """During the first training forward pass: a covered parameter used outside its own layer is an error.

    Autograd would not see that use (the parameter does not require grad while clipping), so its
    gradient would be silently missing, e.g. an output projection tied to the embedding matrix.
    """

    def __init__(self, owners: Mapping[int, LayerKernel]) -> None:
        super().__init__()
        self._owners = owners
        self.active: list[int] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if _function_name(func) not in _METADATA:
            for tensor in _tensors(args, kwargs):
                owner = self._owners.get(id(tensor))
                if owner is not None and id(owner) not in self.active:
                    raise ParameterReuseError(
                        f"a parameter of {owner.name or '<root>'} is used outside that layer's forward "
                        f"(by {_function_name(func) or func}), e.g. tied weights: book-keeping clipping cannot "
                        "attribute that gradient; use clipping='hooks'"
                    )
        return func(*args, **kwargs)


def _leading_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_dim: int) -> int | None:
    """The batch size of the model's first tensor input (checked against every covered layer's input)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return int(value.shape[batch_dim]) if value.dim() > batch_dim else None
    return None


def _sequence_first(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) and not module.batch_first


class BookkeepingClipper:
    """Per-example clipping for a model that the book-keeping kernels cover completely.

    ``loss_reduction``: "mean" if the loss is the batch mean of per-example losses (gradients are
    rescaled by the micro-batch size), "sum" if it is their sum. ``strategy`` forces ghost norms or
    instantiated per-example gradients in sequence/convolution layers (default: by cost).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_grad_norm: float,
        loss_reduction: str = "mean",
        strategy: NormStrategy = "auto",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        coverage = analyse(model, strategy=strategy)
        if coverage.problems:
            order = {"batch_mixing": 0, "tied": 1, "uncovered": 2}
            raise min(coverage.problems, key=lambda p: order[p.kind]).error()
        if coverage.trainable == 0:
            raise ModelError("the model has no trainable parameters")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.kernels = coverage.kernels
        self.parameters: list[nn.Parameter] = [p for k in self.kernels for _, p in k.parameters]
        self._mean = loss_reduction == "mean"
        self.groups: Tensor | None = None
        """Each record's privacy unit in the coming micro-batch (see PrivateOptimizer.group); None: per record."""
        self._owners = {id(p): k for k in self.kernels for _, p in k.parameters}
        self._pass = 0
        self._entered: set[int] = set()
        self._recorded: list[Site] = []
        self._batch: int | None = None
        self._bound = False
        self._guard: _ParameterUseGuard | None = _ParameterUseGuard(self._owners)  # None once validated
        self._guarding = False
        self._handles = [model.register_forward_pre_hook(self._begin_pass, with_kwargs=True)]
        self._guard_handles = self._guard_hooks(self._guard)
        for kernel in self.kernels:
            self._handles += kernel.install(self)
        self._handles.append(model.register_forward_hook(self._end_pass, with_kwargs=True, always_call=True))
        for p in self.parameters:  # autograd skips the non-private parameter gradients (see module docstring)
            p.requires_grad_(False)

    def bind(self, sums: Mapping[int, Tensor], grads: Mapping[int, Tensor]) -> None:
        """Give every site the views of the flat clipped-sum buffer it adds into (keyed by id(parameter))."""
        for kernel in self.kernels:
            kernel.bind(sums)
        self._bound = True

    def detach(self) -> None:
        """Remove every hook and restore ``requires_grad`` of the covered parameters."""
        if self._guard is not None and self._guarding:
            self._guard.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        self._guard, self._guarding = None, False
        for handle in self._handles + self._guard_handles:
            handle.remove()
        self._handles, self._guard_handles = [], []
        for kernel in self.kernels:
            kernel.uninstall()
        for p in self.parameters:
            p.requires_grad_(True)
        self._reset()

    # --- forward-pass bookkeeping (Recorder) --------------------------------------------------------

    def _begin_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return
        if self._recorded:
            self.flush()  # the previous micro-batch: accumulated if it was backpropagated, else dropped
        self._pass += 1
        self._batch = _leading_batch(args, kwargs, 1 if _sequence_first(module) else 0)
        if self._guard is not None and not self._guarding:  # the first training forward pass is checked
            self._guard.active.clear()
            self._guard.__enter__()  # type: ignore[no-untyped-call]
            self._guarding = True

    def _end_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._guard is not None and self._guarding:
            self._guard.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._guarding = False
            self._guard = None
            for handle in self._guard_handles:
                handle.remove()
            self._guard_handles = []

    def _guard_hooks(self, guard: _ParameterUseGuard) -> list[RemovableHandle]:
        """Track which covered layer is running (only until the guarded first pass is over)."""
        handles = []
        for kernel in self.kernels:
            key = id(kernel)

            def push(module: nn.Module, args: Any, key: int = key) -> None:
                guard.active.append(key)

            def pop(module: nn.Module, args: Any, output: Any, key: int = key) -> None:
                if key in guard.active:
                    guard.active.remove(key)

            handles.append(kernel.module.register_forward_pre_hook(push))
            handles.append(kernel.module.register_forward_hook(pop, always_call=True))
        return handles

    def enter(self, kernel: LayerKernel) -> None:
        if id(kernel) in self._entered:
            raise ParameterReuseError(
                f"{kernel.name or '<root>'} ran twice in one forward pass (a reused layer): book-keeping clipping "
                "needs each layer applied once per forward pass; use clipping='hooks'"
            )
        self._entered.add(id(kernel))

    def record(self, site: Site, activation: Tensor, output: Tensor, *, batch_dim: int = 0) -> Tensor:
        if activation.dim() <= batch_dim:
            shape = tuple(activation.shape)
            raise ClippingProtocolError(f"{site.label}: input of shape {shape} has no batch dimension")
        examples = int(activation.shape[batch_dim])
        if self._batch is None:
            self._batch = examples
        elif examples != self._batch:
            raise ClippingProtocolError(
                f"{site.label}: its input has another number of rows along the batch dimension than the model's input "
                "(the counts are those of a private batch, so they are not shown): book-keeping clipping needs every "
                "covered layer to see the batch along dimension 0 (batch_first); use clipping='hooks' for other layouts"
            )
        site.activation = activation.detach()
        site.batch_dim = batch_dim
        self._recorded.append(site)
        pass_id = self._pass

        def receive(grad: Tensor | None) -> None:
            if pass_id != self._pass:
                raise ClippingProtocolError(
                    f"{site.label}: a gradient arrived for an earlier forward pass; book-keeping clipping needs "
                    "forward, backward (and accumulate) per micro-batch, not several forwards before one backward"
                )
            if site.grad is not None:
                raise ClippingProtocolError(f"{site.label}: a second backward pass through the same forward pass")
            site.grad = grad

        if output.requires_grad:
            output.register_hook(receive)  # type: ignore[no-untyped-call]
            return output
        # Nothing upstream is trained: start the graph at a fresh leaf, handed on as a copy so that in-place
        # ops downstream stay legal. Its gradient is read after accumulation (a pre-accumulation hook holding
        # it would make AccumulateGrad copy it).
        root = output.detach().requires_grad_()
        root.register_post_accumulate_grad_hook(lambda leaf: receive(leaf.grad))  # type: ignore[no-untyped-call]
        return root.clone()

    # --- clipping -------------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """A forward pass whose gradients have arrived but are not accumulated yet."""
        return any(site.grad is not None for site in self._recorded)

    def flush(self) -> int:
        """Add the current micro-batch's clipped sum into the bound views; returns its size (0 if none)."""
        if not self._bound:
            raise ClippingProtocolError("the clipper is not bound to an optimizer (use dptrain.make_private)")
        sites = [site for site in self._recorded if site.grad is not None]
        batch = self._batch or 0
        try:
            if sites and batch > 0:
                self._accumulate(sites, batch)
            return batch if sites else 0
        finally:
            self._reset()

    def _reset(self) -> None:
        for site in self._recorded:
            site.reset()
        self._recorded.clear()
        self._entered.clear()
        self._pass += 1  # gradients of a dropped pass that still arrive are errors

    def _accumulate(self, sites: list[Site], batch: int) -> None:
        scale = float(batch) if self._mean else 1.0  # mean loss: captured gradients are per-example / batch
        groups = self.groups
        if groups is not None and len(groups) != batch:
            raise ClippingProtocolError(f"the micro-batch has {batch} records but {len(groups)} unit labels")
        grouping = Grouping.of(groups) if groups is not None else None
        norms = sites[0].squared_norms(batch, grouping)
        for site in sites[1:]:
            norms.add_(site.squared_norms(batch, grouping))
        norms.sqrt_().mul_(scale)
        weights, bad = clip_weights(norms, self.max_grad_norm)  # per unit when grouped: then per record below
        if groups is not None:  # Σ_u w_u Σ_{i∈u} g_i = Σ_i w_{u(i)} g_i: the kernels add per record
            weights, bad = weights[groups], bad[groups] if bad is not None else None
        weights.mul_(scale)
        for site in sites:
            if bad is not None:
                site.drop(bad)
            site.add_clipped(weights)
