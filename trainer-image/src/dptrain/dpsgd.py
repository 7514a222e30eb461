"""One DP-SGD step, whatever clips it: Poisson batches, physical micro-batches, one noisy optimizer step.

* :class:`PoissonSampler` draws each logical batch by including every local training record
  independently with probability ⌊q·2⁵³⌋/2⁵³ ≤ q (:func:`dptrain.randomness.bernoulli`: the accountants' q is a
  valid bound). An empty batch is a valid outcome and still takes a (noise-only) step, so every step of the plan
  runs and is charged.
* :func:`make_private_training` wraps the model and optimizer for per-example clipping at C and
  Gaussian noise σC with :func:`dptrain.make_private`: dptrain's book-keeping kernels, or Opacus' ghost
  or hooks mode. The optimizer averages by the EXPECTED batch size q·n, which does not depend on the data.
* :meth:`PrivateTraining.step` splits a logical batch into physical micro-batches that fit in
  memory; clipped gradients accumulate over them and the noise is added once, at the last one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dptrain.errors import ModelError
from dptrain.independence import reused_modules
from dptrain.randomness import RandomBits, bernoulli

__all__ = [
    "PoissonSampler",
    "PrivateTraining",
    "UnitSampler",
    "auto_clipping_mode",
    "make_optimizer",
    "make_private_training",
    "unit_micro_batches",
]

CLIPPING_MODES = ("bookkeeping", "ghost", "hooks")


class PoissonSampler:
    """Poisson subsampling of ``num_records`` records at rate ``sample_rate``, from ``bits``."""

    def __init__(self, num_records: int, *, sample_rate: float, bits: RandomBits) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_records = num_records
        self.sample_rate = sample_rate
        self.bits = bits

    def next_batch(self) -> torch.Tensor:
        """Indices of the records in the next logical batch (possibly none), on the CPU."""
        included = bernoulli(self.bits, self.num_records, self.sample_rate)
        return included.nonzero().squeeze(1).cpu()


class UnitSampler:
    """Poisson subsampling over privacy units: each unit among ``units`` (every record's unit index) joins the batch
    with probability ⌊q·2⁵³⌋/2⁵³ ≤ q, and brings all of its (kept) records."""

    def __init__(self, units: torch.Tensor, *, sample_rate: float, bits: RandomBits) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        _, local, counts = torch.unique(units.cpu(), return_inverse=True, return_counts=True)
        self.num_units = int(counts.shape[0])
        self.sample_rate = sample_rate
        self.bits = bits
        self._order = torch.argsort(local, stable=True)  # records grouped by unit
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the records of the units in the next logical batch (possibly none), grouped by unit, and each
        one's unit within the batch (0, 0, 1, 2, 2, ...), on the CPU."""
        chosen = bernoulli(self.bits, self.num_units, self.sample_rate).nonzero().squeeze(1).cpu()
        counts = self._counts[chosen]
        groups = torch.repeat_interleave(torch.arange(len(chosen)), counts)
        within = torch.arange(len(groups)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return self._order[self._starts[chosen][groups] + within], groups


def unit_micro_batches(groups: torch.Tensor, physical: int) -> list[slice]:
    """Micro-batches of at most ``physical`` records that never split a unit (``groups`` sorted, as sampled): a
    unit's summed gradient must be clipped in one piece."""
    if len(groups) <= physical:  # the usual case: the whole logical batch fits
        return [slice(0, len(groups))] if len(groups) else []
    counts = torch.bincount(groups).tolist()
    parts, start, size = [], 0, 0
    for count in counts:
        if count > physical:
            raise ValueError(f"a privacy unit has {count} records, more than the physical batch of {physical}")
        if size + count > physical:
            parts.append(slice(start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        parts.append(slice(start, start + size))
    return parts


def make_optimizer(parameters: Any, training: Any) -> torch.optim.Optimizer:
    """The optimizer of ``training.optimizer`` (it only ever sees clipped, noised gradients)."""
    name = training.optimizer
    if name == "sgd":
        return torch.optim.SGD(
            parameters, lr=training.learning_rate, momentum=training.momentum, weight_decay=training.weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    raise ModelError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def auto_clipping_mode(model: nn.Module, input_shape: tuple[int, ...] | None = None, *, units: bool = False) -> str:
    """The fastest clipping mode that is exact for ``model`` (benchmarks/step_time.py). A layer called twice per
    forward pass needs Opacus' hooks mode: it sums a reused layer's per-example gradients over its uses before
    clipping; the kernels and ghost clipping would refuse it at the first step. With privacy ``units`` ghost
    clipping (per record by construction) gives way to hooks."""
    from dptrain.clipping import choose_clipping_mode

    if input_shape is not None and reused_modules(model, input_shape):
        return "hooks"
    mode = choose_clipping_mode(model).mode
    return "hooks" if units and mode == "ghost" else mode


@dataclass
class PrivateTraining:
    """A model and an optimizer that clips each example's gradient at C and adds N(0, σ²C²) once per step."""

    model: nn.Module
    optimizer: Any  # dptrain.clipping.PrivateOptimizer
    criterion: Any  # nn.CrossEntropyLoss, or Opacus' DPLossFastGradientClipping (ghost)
    clipping_mode: str
    physical_batch_size: int

    @property
    def steps_taken(self) -> int:
        """Optimizer steps that added noise (one per logical batch)."""
        return int(self.optimizer.steps)

    def step(self, features: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """One DP-SGD step on a logical batch. Its loss is not read: it is a statistic of private records.

        An empty batch takes a noise-only step; a batch larger than the physical size is split, its clipped
        sums accumulate, and the noise is added once. ``groups`` (each record's privacy unit, sorted, as
        :class:`UnitSampler` draws them): each unit's summed gradient is clipped once, and no micro-batch splits
        a unit.
        """
        if groups is None:
            parts = [
                slice(start, start + self.physical_batch_size)
                for start in range(0, len(labels), self.physical_batch_size)
            ]
        else:
            parts = unit_micro_batches(groups, self.physical_batch_size)
        for part in parts:
            if groups is not None:  # units numbered from 0 within the micro-batch
                self.optimizer.group(groups[part] - groups[part.start] if part.start else groups[part])
            self.criterion(self.model(features[part]), labels[part]).backward()
            self.optimizer.accumulate()
        if groups is not None:
            self.optimizer.group(None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    physical_batch_size: int,
    noise_generator: torch.Generator | None,
    clipping_mode: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    secure_noise: bool = True,
    distributed: bool = False,
    units: bool = False,
) -> PrivateTraining:
    """Wrap for DP-SGD with :func:`dptrain.make_private`: per-example clipping at ``max_grad_norm``, noise σ·C
    once per step, mean over the expected batch.

    ``clipping_mode``: "bookkeeping" (dptrain's kernels), or Opacus' "ghost" / "hooks"; automatic by default (the
    fastest that is exact for the model, given ``input_shape``). ``secure_noise`` draws the noise from ChaCha20 keyed
    by the OS (a CSPRNG) instead of ``noise_generator``; both draw in float64 (:mod:`dptrain.randomness`).
    ``distributed`` (torch.distributed initialised): every mode's clipped sums are all-reduced over the world and
    rank 0 alone adds the noise; ``expected_batch_size`` is then the GLOBAL expected batch.
    """
    from dptrain.clipping import make_private

    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("the model has no trainable parameters")
    mode = clipping_mode or auto_clipping_mode(model, input_shape, units=units)
    if units and mode == "ghost":
        raise ModelError("privacy units need clipping 'bookkeeping' or 'hooks': ghost clipping clips each record")
    if mode not in CLIPPING_MODES:
        raise ModelError(f"unknown clipping mode {mode!r}; use one of {', '.join(CLIPPING_MODES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG chatter: the privacy report states the caveats
        private_model, private_optimizer, criterion = make_private(
            model,
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            clipping=mode,  # type: ignore[arg-type]
            generator=noise_generator,
            secure_noise=secure_noise,
            distributed=distributed,
        )
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        criterion=criterion,
        clipping_mode=mode,
        physical_batch_size=physical_batch_size,
    )
