"""Layer kernels: which modules book-keeping covers exactly, and how each one's forward is observed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dptrain.clipping._sites import ConvSite, EmbeddingSite, LinearSite, NormKind, NormSite, NormStrategy, Site

__all__ = ["KERNEL_TYPES", "LayerKernel", "Recorder", "build_kernel"]


class Recorder(Protocol):
    """What a kernel reports to during the forward pass (the book-keeping clipper)."""

    def enter(self, kernel: LayerKernel) -> None:
        """A covered layer runs (once per forward pass, or the recorder raises)."""

    def record(self, site: Site, activation: Tensor, output: Tensor, *, batch_dim: int = 0) -> Tensor:
        """Keep the site's input, hook its output's gradient; returns the output to hand on."""
        ...


class LayerKernel:
    """One covered module: its trainable parameters (in order) and its sites."""

    def __init__(self, name: str, module: nn.Module, parameters: list[tuple[str, nn.Parameter]], sites: list[Site]):
        self.name = name
        self.module = module
        self.parameters = parameters
        self.sites = sites

    def bind(self, views: Mapping[int, Tensor]) -> None:
        for site in self.sites:
            site.bind(views)

    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        """Observe the module with a forward hook (its single site sees input 0 and the output)."""
        (site,) = self.sites

        def observe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None  # evaluation: nothing to clip
            recorder.enter(self)
            activation = args[0] if args else next(iter(kwargs.values()))
            return recorder.record(site, activation, output)

        return [self.module.register_forward_hook(observe, with_kwargs=True)]

    def uninstall(self) -> None:
        """Undo anything install() did beyond its hook handles (attention kernels override this)."""


Refusal = str
KernelFactory = Callable[[str, Any, set[str], NormStrategy], "LayerKernel | Refusal"]


def _trainable(module: nn.Module, names: set[str], name: str) -> nn.Parameter | None:
    parameter = getattr(module, name, None)
    return parameter if name in names and isinstance(parameter, nn.Parameter) else None


def _owned(module: nn.Module, names: set[str], order: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
    owned = []
    for name in order:
        parameter = _trainable(module, names, name)
        if parameter is not None:
            owned.append((name, parameter))
    return owned


def _linear(name: str, m: nn.Linear, names: set[str], strategy: NormStrategy) -> LayerKernel | Refusal:
    site = LinearSite(name, weight=_trainable(m, names, "weight"), bias=_trainable(m, names, "bias"), strategy=strategy)
    return LayerKernel(name, m, _owned(m, names, ("weight", "bias")), [site])


def _conv(name: str, m: nn.Conv1d | nn.Conv2d, names: set[str], strategy: NormStrategy) -> LayerKernel | Refusal:
    weight, bias = _trainable(m, names, "weight"), _trainable(m, names, "bias")
    site = ConvSite(name, m, weight=weight, bias=bias, strategy=strategy)
    return LayerKernel(name, m, _owned(m, names, ("weight", "bias")), [site])


def _embedding(name: str, m: nn.Embedding, names: set[str], strategy: NormStrategy) -> LayerKernel | Refusal:
    if m.sparse:  # (max_norm and scale_grad_by_freq are refused in every mode: see _coverage)
        return "sparse=True: DP noise makes the gradient dense anyway; use sparse=False"
    site = EmbeddingSite(name, m, weight=_trainable(m, names, "weight"))
    return LayerKernel(name, m, _owned(m, names, ("weight",)), [site])


def _norm(name: str, m: nn.LayerNorm | nn.GroupNorm | nn.RMSNorm, names: set[str], _: NormStrategy) -> LayerKernel:
    kind: NormKind = "group" if isinstance(m, nn.GroupNorm) else "layer" if isinstance(m, nn.LayerNorm) else "rms"
    site = NormSite(name, m, kind=kind, weight=_trainable(m, names, "weight"), bias=_trainable(m, names, "bias"))
    return LayerKernel(name, m, _owned(m, names, ("weight", "bias")), [site])


def _attention(name: str, m: nn.MultiheadAttention, names: set[str], strategy: NormStrategy) -> LayerKernel | Refusal:
    from dptrain.clipping._attention import attention_kernel

    return attention_kernel(name, m, names, strategy)


KERNEL_TYPES: Final[Mapping[type[nn.Module], tuple[KernelFactory, frozenset[str]]]] = {
    # exact types only: a subclass may change forward. Second item: the parameter names a kernel covers.
    nn.Linear: (_linear, frozenset({"weight", "bias"})),
    nn.Conv1d: (_conv, frozenset({"weight", "bias"})),
    nn.Conv2d: (_conv, frozenset({"weight", "bias"})),
    nn.Embedding: (_embedding, frozenset({"weight"})),
    nn.LayerNorm: (_norm, frozenset({"weight", "bias"})),
    nn.GroupNorm: (_norm, frozenset({"weight", "bias"})),
    nn.RMSNorm: (_norm, frozenset({"weight"})),
    nn.MultiheadAttention: (
        _attention,
        frozenset(
            {
                "in_proj_weight",
                "in_proj_bias",
                "q_proj_weight",
                "k_proj_weight",
                "v_proj_weight",
                "out_proj.weight",
                "out_proj.bias",
            }
        ),
    ),
}


def build_kernel(name: str, module: nn.Module, trainable: set[str], strategy: NormStrategy) -> LayerKernel | Refusal:
    """The kernel for ``module`` (exact type in KERNEL_TYPES) covering its ``trainable`` parameter names, or why not."""
    entry = KERNEL_TYPES.get(type(module))
    if entry is None:
        return f"no book-keeping kernel for {type(module).__name__}"
    factory, _ = entry
    return factory(name, module, trainable, strategy)
