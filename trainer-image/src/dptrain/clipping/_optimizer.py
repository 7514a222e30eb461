"""PrivateOptimizer: clipped sums in one flat buffer, one flat noise draw, then the user's optimizer.

Per logical batch: for each physical micro-batch, forward + backward, then :meth:`accumulate`
(optional: the next forward pass or :meth:`step` accumulates a pending micro-batch too); then
:meth:`step` adds N(0, σ²C²) over all parameters at once, divides by the EXPECTED batch size,
writes ``.grad`` (views of one flat tensor) and steps the wrapped optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from dptrain.errors import ClippingError
from dptrain.randomness import ChaChaBits, GeneratorBits, RandomBits, standard_normal

__all__ = ["Clipper", "PrivateOptimizer"]


class Clipper(Protocol):
    """Computes clipped per-example gradient sums into views of the optimizer's flat buffer."""

    parameters: list[nn.Parameter]
    max_grad_norm: float
    groups: Tensor | None
    """Each record's privacy unit in the coming micro-batch (None: every record is its own)."""

    def bind(self, sums: Mapping[int, Tensor], grads: Mapping[int, Tensor]) -> None:
        """Receive, per parameter (keyed by id), its view of the clipped-sum buffer and of the .grad buffer."""

    def flush(self) -> int:
        """Add the pending micro-batch's clipped sum into the views; returns 0 if nothing was pending.

        Otherwise its number of examples where the clipper knows it (Opacus ghost: 1).
        """
        ...


def _check_parameters(optimizer: Optimizer, parameters: Sequence[nn.Parameter]) -> None:
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    covered = {id(p) for p in parameters}
    missing = [p for p in parameters if id(p) not in managed]
    if missing:
        raise ClippingError(
            f"the optimizer does not manage {len(missing)} trainable parameter(s) of the model (shapes "
            f"{[tuple(p.shape) for p in missing[:5]]}); build it from model.parameters()"
        )
    extra = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in covered and p.requires_grad]
    if extra:
        raise ClippingError(
            f"the optimizer manages {len(extra)} trainable parameter(s) outside the model; they would get no "
            "private gradient"
        )


class PrivateOptimizer(Optimizer):
    """Wraps ``optimizer``: DP-SGD noise and normalisation over the clipper's flat clipped sum.

    ``expected_batch_size`` is the GLOBAL expected batch size (q·N over all ranks). With
    ``distributed=True`` (torch.distributed initialised), every rank's flat clipped sum is
    all-reduced (SUM) over ``process_group`` (default: the world) after rank 0 of the group alone
    added the noise, so noise enters exactly once per global step; parameters are broadcast from
    that rank at construction.

    The noise is drawn in float64 (:func:`dptrain.randomness.standard_normal`: draws reach ±13σC, not float32
    Box–Muller's ±5.77σC), added to the clipped sum in float64 and rounded to the parameters' dtype once. Its bits
    come from ChaCha20 keyed from the OS with ``secure_noise`` (a CSPRNG), else from ``generator`` (a torch
    generator: fast and reproducible, not a CSPRNG; one is seeded from the OS when none is given).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        clipper: Clipper,
        noise_multiplier: float,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
        secure_noise: bool = False,
        distributed: bool = False,
        process_group: Any = None,
    ) -> None:
        # No Optimizer.__init__: state and param groups stay the wrapped optimizer's (as Opacus' DPOptimizer).
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and ≥ 0, got {noise_multiplier}")
        if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        parameters = list(clipper.parameters)
        _check_parameters(optimizer, parameters)
        kinds = {(p.dtype, p.device) for p in parameters}
        if len(kinds) != 1:
            found = sorted(map(str, kinds))
            raise ClippingError(f"all trainable parameters must share one dtype and device, found {found}")
        ((dtype, device),) = kinds
        self.original_optimizer = optimizer
        self.clipper = clipper
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(clipper.max_grad_norm)
        self.expected_batch_size = expected_batch_size
        if secure_noise and generator is not None:
            raise ValueError(
                "secure_noise draws from a CSPRNG keyed by the OS: a seeded torch generator cannot be used"
            )
        self.noise_bits: RandomBits = (
            ChaChaBits(device=device) if secure_noise else GeneratorBits(generator, device=device)
        )
        self.secure_noise = secure_noise
        self.steps = 0
        self.clipping_mode = "custom"  # make_private sets the mode it chose
        self._step_hooks: list[Callable[[PrivateOptimizer], None]] = []
        total = sum(p.numel() for p in parameters)
        self._sum = torch.zeros(total, dtype=dtype, device=device)  # Σ clipped gradients of this logical batch
        self._flat_grad = torch.zeros(total, dtype=dtype, device=device)  # what .grad views show after step
        sums: dict[int, Tensor] = {}
        self._grads: list[tuple[nn.Parameter, Tensor]] = []
        offset = 0
        for p in parameters:
            n = p.numel()
            sums[id(p)] = self._sum[offset : offset + n].view_as(p)
            self._grads.append((p, self._flat_grad[offset : offset + n].view_as(p)))
            offset += n
        self.distributed = distributed
        self._group = process_group
        self._adds_noise = self._init_distributed(distributed, process_group, parameters)
        clipper.bind(sums, {id(p): view for p, view in self._grads})

    @staticmethod
    def _init_distributed(distributed: bool, process_group: Any, parameters: Sequence[Tensor]) -> bool:
        """Check the process group, broadcast the parameters; True on the rank that adds the noise."""
        if not distributed:
            return True
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ClippingError("distributed=True needs torch.distributed initialised (init_process_group) first")
        source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        with torch.no_grad():
            for p in parameters:  # identical replicas: every rank then applies the identical update
                dist.broadcast(p.data, src=source, group=process_group)
        return bool(dist.get_rank(process_group) == 0)

    # --- the torch.optim.Optimizer surface (delegated) -------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad (.grad only: clipped sums of pending micro-batches stay)."""
        self.original_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ClippingError("parameters cannot be added to a private optimizer after make_private")

    def attach_step_hook(self, hook: Callable[[PrivateOptimizer], None]) -> None:
        """Call ``hook(optimizer)`` after each noised step (before the wrapped optimizer's step)."""
        self._step_hooks.append(hook)

    def __repr__(self) -> str:
        return f"PrivateOptimizer({self.original_optimizer!r})"

    # --- DP-SGD ---------------------------------------------------------------------------------------

    def accumulate(self) -> None:
        """Add the last micro-batch's clipped per-example gradients to the logical batch's sum."""
        self.clipper.flush()

    def group(self, groups: Tensor | None) -> None:
        """Say which privacy unit each record of the NEXT micro-batch belongs to (int64 (B,), values 0 … U−1; None:
        every record is its own). Each unit's summed gradient Σ_{i∈u} g_i is then clipped once to C: DP with
        respect to adding or removing a whole unit. A unit must not be split across micro-batches (its norm is not
        additive). Call it before that micro-batch's forward pass; book-keeping and hooks support it."""
        self.clipper.flush()  # a pending micro-batch keeps the grouping it was computed under
        self.clipper.groups = groups

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Accumulate any pending micro-batch, noise the flat sum once, divide, write .grad, step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.clipper.flush()
        grad = self._flat_grad
        std = self.noise_multiplier * self.max_grad_norm
        if self._adds_noise and std > 0:  # in float64, rounded to the parameters' dtype once
            grad.copy_(self._draw_noise(grad.numel(), std).add_(self._sum))
        else:
            grad.copy_(self._sum)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self._group)
        grad.mul_(1.0 / self.expected_batch_size)
        self._sum.zero_()
        for p, view in self._grads:
            if p.grad is not view:
                p.grad = view
        self.steps += 1
        for hook in self._step_hooks:
            hook(self)
        self.original_optimizer.step()
        return loss

    def _draw_noise(self, count: int, std: float) -> Tensor:
        """``count`` N(0, std²) draws in float64 on the buffer's device (one flat draw per step)."""
        noise = standard_normal(self.noise_bits, count).mul_(std)
        return noise.to(self._sum.device)
