"""Which clipping path is exact for a model: book-keeping kernels, Opacus ghost, or Opacus hooks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from dptrain.clipping._layers import KERNEL_TYPES, LayerKernel, build_kernel
from dptrain.clipping._sites import NormStrategy
from dptrain.errors import BatchMixingLayerError, ModelError, ParameterReuseError, UnsupportedLayerError

__all__ = ["ClippingChoice", "Coverage", "Problem", "analyse", "choose_clipping_mode"]

Mode = Literal["bookkeeping", "ghost", "hooks"]


@dataclass(frozen=True)
class ClippingChoice:
    """The mode ``clipping="auto"`` uses for a model, and why (for the engine's report)."""

    mode: Mode
    reason: str


@dataclass(frozen=True)
class Problem:
    """A module that keeps the model off the book-keeping path."""

    module: str
    parameters: tuple[str, ...]
    reason: str
    kind: Literal["uncovered", "batch_mixing", "tied"]

    def error(self) -> ModelError:
        listed = f" (parameters {', '.join(self.parameters)})" if self.parameters else ""
        where = f"{self.module or '<root>'}{listed}"
        if self.kind == "batch_mixing":
            return BatchMixingLayerError(
                f"{where}: {self.reason}; per-example clipping is impossible with this layer (no clipping mode "
                "supports it): replace it, e.g. BatchNorm by GroupNorm or LayerNorm",
                module=self.module,
                parameters=self.parameters,
            )
        if self.kind == "tied":
            return ParameterReuseError(f"{where}: {self.reason}; book-keeping needs each parameter in one layer")
        return UnsupportedLayerError(
            f"{where}: {self.reason}; book-keeping clipping does not cover it (use clipping='hooks' or 'auto')",
            module=self.module,
            parameters=self.parameters,
        )


@dataclass
class Coverage:
    kernels: list[LayerKernel] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    trainable: int = 0

    @property
    def covered(self) -> bool:
        return self.trainable > 0 and not self.problems


def _batch_mixing_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants
        return f"{type(module).__name__} normalises with statistics of the whole batch (mixes examples)"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return f"{type(module).__name__} with track_running_stats updates running statistics from the batch"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "Embedding(scale_grad_by_freq=True) scales gradients by token counts over the whole batch"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "Embedding(max_norm=...) renormalises the batch's rows in place during forward (an un-noised update)"
    return None


def _sequence_first_reason(module: nn.Module) -> str | None:
    """Containers whose covered children see (sequence, batch, ...) inputs: dimension 0 is not the batch."""
    if type(module).__name__ == "DPMultiheadAttention" and type(module).__module__.startswith("opacus"):
        return "Opacus' DPMultiheadAttention feeds its Linear layers sequence-first inputs; use nn.MultiheadAttention"
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if isinstance(module, layers) and not module.self_attn.batch_first:
        return f"{type(module).__name__}(batch_first=False) feeds its Linear layers sequence-first inputs"
    return None


def _kernel_or_problem(
    name: str, module: nn.Module, trainable: list[str], strategy: NormStrategy
) -> LayerKernel | Problem:
    built = build_kernel(name, module, set(trainable), strategy)
    if isinstance(built, str):
        return Problem(name, tuple(trainable), built, "uncovered")
    unknown = sorted(set(trainable) - KERNEL_TYPES[type(module)][1])
    if unknown:  # e.g. weight_g/weight_v of old-style weight norm, bias_k/bias_v
        reason = f"{type(module).__name__} has parameters no kernel covers"
        return Problem(name, tuple(unknown), reason, "uncovered")
    return built


def analyse(model: nn.Module, *, strategy: NormStrategy = "auto") -> Coverage:
    """Kernels for every module with trainable parameters, and every reason the model is not covered."""
    coverage = Coverage()
    owners: dict[int, list[str]] = {}
    skip: set[int] = set()  # children handled by their parent's kernel (attention's out_proj)
    for name, module in model.named_modules():
        mixing = _batch_mixing_reason(module)
        if mixing is not None:
            coverage.problems.append(Problem(name, (), mixing, "batch_mixing"))
            continue
        sequence_first = _sequence_first_reason(module)
        if sequence_first is not None:
            coverage.problems.append(Problem(name, (), sequence_first, "uncovered"))
        if id(module) in skip:
            continue
        members = list(module.named_parameters(recurse=False))
        if type(module) is nn.MultiheadAttention:
            members += [(f"out_proj.{n}", p) for n, p in module.out_proj.named_parameters(recurse=False)]
            skip.add(id(module.out_proj))
        trainable = [n for n, p in members if p.requires_grad]
        for n, p in members:
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{name}.{n}" if name else n)
        if not trainable:
            continue
        coverage.trainable += len(trainable)
        found = _kernel_or_problem(name, module, trainable, strategy)
        if isinstance(found, Problem):
            coverage.problems.append(found)
        else:
            coverage.kernels.append(found)
    for places in owners.values():
        if len(places) > 1:
            coverage.problems.append(
                Problem(places[0].rpartition(".")[0], tuple(places), "one parameter is tied to several layers", "tied")
            )
    return coverage


def _ghost_covers(model: nn.Module, coverage: Coverage) -> bool:
    """Opacus ghost clipping computes every trainable parameter's norm directly (no tied parameters)."""
    from dptrain.models import supports_ghost_clipping

    return not any(p.kind == "tied" for p in coverage.problems) and supports_ghost_clipping(model)


def _summary(kernels: list[LayerKernel]) -> str:
    counts = Counter(type(k.module).__name__ for k in kernels)
    return ", ".join(f"{kind} ×{count}" for kind, count in sorted(counts.items()))


def choose_clipping_mode(model: nn.Module) -> ClippingChoice:
    """The mode ``make_private(clipping="auto")`` picks: the fastest one that is exact for the model.

    Book-keeping kernels when they cover every trainable parameter; else Opacus ghost clipping when
    its norm samplers cover every layer; else Opacus hooks. Raises :class:`BatchMixingLayerError`
    for layers that mix examples (no mode is exact) and ModelError for a model with nothing to train.
    """
    coverage = analyse(model)
    mixing = [p for p in coverage.problems if p.kind == "batch_mixing"]
    if mixing:
        raise mixing[0].error()
    if coverage.trainable == 0:
        raise ModelError("the model has no trainable parameters")
    if coverage.covered:
        return ClippingChoice(
            "bookkeeping", f"book-keeping kernels cover every trainable parameter ({_summary(coverage.kernels)})"
        )
    first = coverage.problems[0]
    why = f"book-keeping does not cover {first.module or '<root>'}: {first.reason}"
    if _ghost_covers(model, coverage):
        return ClippingChoice("ghost", f"{why}; Opacus ghost clipping covers every layer")
    return ClippingChoice("hooks", f"{why}; Opacus ghost clipping does not cover every layer either")
