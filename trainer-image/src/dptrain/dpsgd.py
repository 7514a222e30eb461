"""One DP-SGD step, whatever clips it: Poisson batches, physical micro-batches, one noisy optimizer step.

* :class:`PoissonSampler` draws each logical batch by including every local training record
  independently with probability exactly q (what the accountants assume). An empty batch is a valid
  outcome and still takes a (noise-only) step, so every step of the plan runs and is charged.
* :func:`make_private_training` wraps the model and optimizer for per-example clipping at C and
  Gaussian noise σC: book-keeping clipping (:mod:`dptrain.bookkeeping`), or Opacus' ghost or hooks
  mode. The optimizer averages by the EXPECTED batch size q·n, which does not depend on the data.
* :meth:`PrivateTraining.step` splits a logical batch into physical micro-batches that fit in
  memory; clipped gradients accumulate over them and the noise is added once, at the last one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain.errors import ModelError
from dptrain.independence import reused_modules
from dptrain.models import supports_ghost_clipping

__all__ = ["PoissonSampler", "PrivateTraining", "auto_clipping_mode", "make_optimizer", "make_private_training"]

CLIPPING_MODES = ("bookkeeping", "ghost", "hooks")


class PoissonSampler:
    """Poisson subsampling of ``num_records`` records at rate ``sample_rate`` from ``generator``."""

    def __init__(self, num_records: int, *, sample_rate: float, generator: torch.Generator) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_records = num_records
        self.sample_rate = sample_rate
        self.generator = generator

    def next_batch(self) -> torch.Tensor:
        """Indices of the records in the next logical batch (possibly none)."""
        included = torch.rand(self.num_records, generator=self.generator) < self.sample_rate
        return included.nonzero().squeeze(1)


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


def auto_clipping_mode(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> str:
    """The fastest clipping mode that is exact for ``model`` (benchmarks/step_time.py). Tied weights or a layer
    called twice per forward pass need Opacus' hooks mode: it sums a shared parameter's per-example gradients
    over its uses before clipping, the other modes would clip each use apart (or refuse)."""
    from dptrain.bookkeeping import supports_bookkeeping

    if input_shape is not None and reused_modules(model, input_shape):
        return "hooks"
    if supports_bookkeeping(model):
        return "bookkeeping"
    return "ghost" if supports_ghost_clipping(model) else "hooks"


@dataclass
class PrivateTraining:
    """A model and an optimizer that clips each example's gradient at C and adds N(0, σ²C²) once per step."""

    model: nn.Module
    optimizer: Any  # an Opacus DPOptimizer (or its fast-gradient-clipping or book-keeping subclass)
    criterion: Any  # nn.CrossEntropyLoss, or Opacus' DPLossFastGradientClipping (ghost)
    clipping_mode: str
    physical_batch_size: int
    steps_taken: list[int] = field(default_factory=lambda: [0])
    """steps_taken[0] counts optimizer steps that added noise (one per logical batch)."""

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One DP-SGD step on a logical batch. Its loss is not read: it is a statistic of private records."""
        starts = list(range(0, len(labels), self.physical_batch_size)) or [0]  # an empty batch: one empty pass
        for index, start in enumerate(starts):
            stop = start + self.physical_batch_size
            loss = self.criterion(self.model(features[start:stop]), labels[start:stop])
            loss.backward()
            if index < len(starts) - 1:
                # Clip and accumulate this micro-batch; the noise comes once, with the last one.
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _opacus_wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    mode: str,
    noise_generator: torch.Generator | None,
) -> tuple[nn.Module, Any, Any]:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and accountant chatter: the report states the caveats
        engine = PrivacyEngine(secure_mode=False)
        # Opacus wants a data loader to derive its own sample rate from; batches come from PoissonSampler
        # instead, and the optimizer's expected batch size is set from the plan below.
        template: DataLoader[Any] = DataLoader(TensorDataset(torch.zeros(1)), batch_size=1)
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=template,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            noise_generator=noise_generator,
        )
    if mode == "ghost":
        private_model, private_optimizer, criterion, _ = wrapped
    else:
        private_model, private_optimizer, _ = wrapped
        criterion = nn.CrossEntropyLoss()
    return private_model, private_optimizer, criterion


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
) -> PrivateTraining:
    """Wrap for DP-SGD: per-example clipping at ``max_grad_norm``, noise σ·C, mean over the expected batch.

    ``clipping_mode``: "bookkeeping" (Linear-only models, dptrain.bookkeeping), or Opacus' "ghost" /
    "hooks"; automatic by default (the fastest that is exact for the model, given ``input_shape``).
    ``secure_noise`` draws each noise coordinate as Opacus' secure_mode does (four draws), which defeats the
    floating-point attacks on a single Gaussian draw; it needs no torchcsprng.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("the model has no trainable parameters")
    mode = clipping_mode or auto_clipping_mode(model, input_shape)
    if mode not in CLIPPING_MODES:
        raise ModelError(f"unknown clipping mode {mode!r}; use one of {', '.join(CLIPPING_MODES)}")
    if mode == "bookkeeping":
        from dptrain.bookkeeping import BookkeepingOptimizer

        private_model: nn.Module = model
        private_optimizer: Any = BookkeepingOptimizer(
            optimizer,
            model=model,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=noise_generator,
        )
        criterion: Any = nn.CrossEntropyLoss()
    else:
        private_model, private_optimizer, criterion = _opacus_wrap(
            model,
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            mode=mode,
            noise_generator=noise_generator,
        )
    # Mean reduction divides the noised sum by the EXPECTED batch size q·n (data-independent).
    private_optimizer.expected_batch_size = expected_batch_size
    private_optimizer.secure_mode = secure_noise
    private = PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        criterion=criterion,
        clipping_mode=mode,
        physical_batch_size=physical_batch_size,
    )

    def count_step(_optimizer: Any) -> None:  # replaces Opacus' own accountant hook: we account via the journal
        private.steps_taken[0] += 1

    private_optimizer.attach_step_hook(count_step)
    return private
