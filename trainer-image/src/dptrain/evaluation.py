"""Held-out metrics, released with differential privacy (the Gaussian mechanism on the holdout partition).

What leaves the pod about the held-out records is never an exact statistic: each release adds Gaussian noise
to a vector of sums over the holdout, one row per record,

    [1, correct, min(loss, L) / L, one-hot(class, score bin)]    (the last part for binary tasks only),

L = :func:`loss_clip`,

whose L2 norm is at most ``sensitivity(num_classes)``: adding or removing one record moves the sums by at most
that much. The noise std is σ_holdout times that sensitivity, so one release is the Gaussian mechanism with
noise multiplier σ_holdout (``dptrain_accounting.MechanismSegment(σ_holdout, 1.0, 1)``), charged to the holdout
partition in the journal before it is computed. Accuracy, clipped loss and AUC are then computed from the
noisy sums (post-processing, free).
"""

from __future__ import annotations

import math
from typing import Final

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.checkpoint import unwrap_model
from dptrain.randomness import RandomBits, standard_normal

__all__ = [
    "AUC_BINS",
    "SIZE_FACTOR",
    "declared_size_mismatch",
    "dp_release",
    "dp_release_sums",
    "holdout_sums",
    "loss_clip",
    "metrics_from_sums",
    "release_schedule",
    "sensitivity",
]
AUC_BINS: Final = 10
"""Score bins of the binary-task histograms the AUC is computed from."""
_BATCH: Final = 4096


def loss_clip(num_classes: int) -> float:
    """Per-record cross-entropy is clipped at twice the loss of a uniform guess, 2·ln(classes), before it is
    summed: it bounds the sensitivity, and a tighter clip leaves more signal above the noise."""
    return max(1.0, 2.0 * math.log(num_classes))


def sensitivity(num_classes: int) -> float:
    """L2 norm bound of one record's row: count, correct, clipped loss (each ≤ 1) and, binary, one histogram cell."""
    return 2.0 if num_classes == 2 else math.sqrt(3.0)


def holdout_sums(model: nn.Module, holdout: TensorDataset, *, num_classes: int, device: torch.device) -> torch.Tensor:
    """The EXACT sums over the held-out records (float64). Private: only :func:`dp_release` may see them.

    With privacy units (the holdout's third tensor: each record's unit), each unit contributes the MEAN of its
    records' rows: its influence on the sums is bounded like one record's (the sensitivity is unchanged), and the
    metrics weigh every individual the same."""
    features, labels = holdout.tensors[:2]
    units = holdout.tensors[2] if len(holdout.tensors) > 2 else None
    width = 3 + (2 * AUC_BINS if num_classes == 2 else 0)
    sums = torch.zeros(width, dtype=torch.float64)
    per_record = []
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(labels), _BATCH):
                logits = module(features[start : start + _BATCH].to(device)).double().cpu()
                rows = _rows(logits, labels[start : start + _BATCH].cpu(), num_classes=num_classes)
                if units is None:
                    sums.add_(rows.sum(dim=0))
                else:
                    per_record.append(rows)
    finally:
        module.train(was_training)
    if units is None or not per_record:
        return sums
    _, local, counts = torch.unique(units.cpu(), return_inverse=True, return_counts=True)
    unit_rows = torch.zeros(len(counts), width, dtype=torch.float64).index_add_(0, local, torch.cat(per_record))
    means: torch.Tensor = unit_rows / counts.unsqueeze(1).double()
    return means.sum(dim=0)


def _rows(logits: torch.Tensor, target: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """One bounded row per record. A record whose logits are not all finite (crafted or overflowing weights) gets a
    fixed row, [1, wrong, maximal loss, lowest score bin], decided from that record alone: its sensitivity is the
    same, and a NaN never reaches the sums (nor an index out of range the histogram)."""
    clip = loss_clip(num_classes)
    finite = torch.isfinite(logits).all(dim=1)
    safe = torch.where(finite[:, None], logits, logits.new_zeros(()))
    losses = nn.functional.cross_entropy(safe, target, reduction="none").nan_to_num(nan=clip, posinf=clip)
    losses = torch.where(finite, losses.clamp(max=clip) / clip, losses.new_ones(()))
    correct = ((safe.argmax(dim=1) == target) & finite).double()
    rows = torch.stack([torch.ones_like(correct), correct, losses], dim=1)
    if num_classes != 2:
        return rows
    score = torch.where(finite, torch.softmax(safe, dim=1)[:, 1].nan_to_num(nan=0.0), safe.new_zeros(()))
    cell = target * AUC_BINS + (score * AUC_BINS).long().clamp(min=0, max=AUC_BINS - 1)
    return torch.cat([rows, nn.functional.one_hot(cell, 2 * AUC_BINS).double()], dim=1)


def _gaussian(size: int, *, std: float, bits: RandomBits) -> torch.Tensor:
    """N(0, std²) per coordinate, float64 (:func:`dptrain.randomness.standard_normal`)."""
    return standard_normal(bits, size).mul_(std).cpu()


def dp_release_sums(
    model: nn.Module,
    holdout: TensorDataset,
    *,
    num_classes: int,
    noise_multiplier: float,
    bits: RandomBits,
    device: torch.device,
) -> torch.Tensor:
    """The held-out sums with Gaussian noise (one Gaussian mechanism, σ = ``noise_multiplier`` × the sensitivity):
    what a release publishes. Sums released by several sites about the same model may be added up (post-processing):
    the result is a DP release over the union of their holdouts. Charge it BEFORE calling this."""
    sums = holdout_sums(model, holdout, num_classes=num_classes, device=device)
    return sums + _gaussian(len(sums), std=noise_multiplier * sensitivity(num_classes), bits=bits)


def metrics_from_sums(noisy: torch.Tensor, *, num_classes: int) -> dict[str, float]:
    """Accuracy, clipped loss and (binary) AUC computed from released noisy sums (post-processing, free)."""
    count = max(float(noisy[0]), 1.0)
    metrics = {
        "accuracy": min(max(float(noisy[1]) / count, 0.0), 1.0),
        "loss": loss_clip(num_classes) * min(max(float(noisy[2]) / count, 0.0), 1.0),
    }
    if num_classes == 2:
        auc = _auc(noisy[3:].clamp(min=0.0))
        if auc is not None:
            metrics["auc"] = auc
    return metrics


def dp_release(
    model: nn.Module,
    holdout: TensorDataset,
    *,
    num_classes: int,
    noise_multiplier: float,
    bits: RandomBits,
    device: torch.device,
) -> dict[str, float]:
    """One DP release of held-out accuracy, loss (clipped at :func:`loss_clip`) and, for binary tasks, AUC.

    Charge it (one step of the holdout partition's mechanism) BEFORE calling this.
    """
    noisy = dp_release_sums(
        model, holdout, num_classes=num_classes, noise_multiplier=noise_multiplier, bits=bits, device=device
    )
    return metrics_from_sums(noisy, num_classes=num_classes)


def _auc(histograms: torch.Tensor) -> float | None:
    """ROC AUC from per-class score histograms (ties within a bin count half), None when a class is empty."""
    negative, positive = histograms[:AUC_BINS], histograms[AUC_BINS:]
    total = float(negative.sum()) * float(positive.sum())
    if total <= 0.0:
        return None
    above = torch.flip(torch.cumsum(torch.flip(positive, [0]), 0), [0]) - positive  # positives in higher bins
    return float((negative * (above + 0.5 * positive)).sum()) / total


def release_schedule(*, steps: int, releases: int, from_start: bool = False) -> list[int]:
    """The steps after which held-out metrics are released: evenly spaced, the last at the end of the plan.

    ``from_start`` (a job's engine, with at least two releases): the first at step 0, before any DP-SGD step, where
    its count also checks the declared size (:func:`declared_size_mismatch`)."""
    if from_start and releases >= 2:
        return [0, *(math.ceil(k * steps / (releases - 1)) for k in range(1, releases))]
    return [math.ceil(k * steps / releases) for k in range(1, releases + 1)] if releases > 0 else []


SIZE_FACTOR: Final = 10.0
"""A holdout this many times smaller or larger than the declared size implies is a DeclaredSizeMismatch."""


def declared_size_mismatch(noisy_count: float, *, expected: float, noise_std: float) -> bool:
    """Does a release's noisy count of held-out records show a file far from its declared size? Only when the count
    is ``SIZE_FACTOR`` times off AND more than four noise standard deviations from the expected count (a
    post-processing of the DP release: it reveals nothing the release did not; with a small holdout it never fires)."""
    far = noisy_count < expected / SIZE_FACTOR or noisy_count > expected * SIZE_FACTOR
    return far and abs(noisy_count - expected) > 4.0 * noise_std
