"""Canaries for the one-run audit, and the guesses made from their scores.

* **Gradient-space (Dirac) canaries** (white box). Canary j is a record whose clipped per-example gradient is
  C·e_j on its own coordinate of a *probe*: m extra coordinates that the model never reads. The job's own
  DP optimizer noises the probe in the same noise draw, with the same random source, σ, C and noise
  construction as the model's parameters, so each step releases Σ_{sampled canaries} C·e_j + N(0, σ²C²·I).
  Real records have a zero probe gradient and canaries a zero model gradient, so every record's gradient on
  (model, probe) still has norm ≤ C: this is exactly the subsampled Gaussian mechanism the accountant charges,
  in d + m dimensions. The score of canary j is the sum over steps of the released noisy coordinate j.
  The probe gives every canary a direction of its own however small the model is (a 62-parameter logistic
  regression could not hold 1000 orthogonal canaries), so the audit's power does not depend on the model.
  What it tests: Poisson sampling at q, the noise scale σ·C and its construction, and the number of noisy
  steps. What it does not: clipping (the canary is clipped by construction).
* **Poisoned canaries** (black box, adversarial). Records at the corners of the feature box (every feature 0 or
  1: as far from the data as prepared records can be) with the label the initial model finds LEAST likely: the
  largest loss and gradient a record can bring. They check that no record can dominate: clipping must bound each
  one's influence to C like any other's, so their audit, too, must stay below the claimed ε.
* **Input-space canaries** (black box). Records with uniformly random features in [0, 1] (the range every
  prepared feature is scaled to) and a uniformly random label: out of distribution, so a model that memorises
  shows it. They go through the whole pipeline (forward, per-example gradients, the job's clipping mode);
  the score is minus their loss under the final model. Small models cannot memorise many such points, so
  this audit is weaker than the gradient one (benchmarks/README.md shows by how much); it is the one that
  exercises clipping.

Each canary is included independently with probability ½ (a fair coin the training never sees). Guesses are
made by fixed rules from the scores alone (:func:`guess_counts`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dptrain.audit.bound import GuessCount

__all__ = ["GUESS_FRACTIONS", "GradientProbe", "guess_counts", "input_canaries", "input_scores", "poisoned_canaries"]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

GUESS_FRACTIONS: Final = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Rank rules: guess the top f·m/2 scores "in" and the bottom f·m/2 "out", abstain on the rest."""


class GradientProbe:
    """``size`` probe coordinates noised by ``optimizer``'s own noise draw; canary j's gradient is C·e_j there.

    Install it before training. It wraps the :class:`dptrain.clipping.PrivateOptimizer`'s noise draw (one per
    logical step, over the flat clipped sum) so that the same call draws over the model's coordinates AND the
    probe's, with the same random source, σ·C and construction; a step hook then scores the probe (its clipped
    canary sum plus its noise). With σ = 0 no noise is drawn and the probe scores its exact sum.
    """

    def __init__(self, optimizer: Any, *, size: int, device: torch.device) -> None:
        self.optimizer = optimizer
        self.size = size
        self.device = device
        self.scores = torch.zeros(size, dtype=torch.float64)
        """Σ over noisy steps of the released probe coordinates (before the division by the batch size)."""
        self.noisy_steps = 0
        self._pending = torch.zeros(size, device=device)
        self._noise: torch.Tensor | None = None
        self._draw: Callable[[int, float], torch.Tensor] = optimizer._draw_noise
        optimizer._draw_noise = self._draw_with_probe
        optimizer.attach_step_hook(self._after_step)

    @property
    def canary_norm(self) -> float:
        """C: the clipping bound the optimizer enforces on every record, and each canary's gradient norm."""
        return float(self.optimizer.max_grad_norm)

    def sample(self, canaries: torch.Tensor) -> None:
        """The gradient canaries in the coming step's Poisson batch (probe coordinates, each at most once)."""
        counts = torch.bincount(canaries.to(torch.int64).cpu(), minlength=self.size).to(torch.float32)
        self._pending = (counts * self.canary_norm).to(self.device)

    def _draw_with_probe(self, count: int, std: float) -> torch.Tensor:
        joint = self._draw(count + self.size, std)  # the optimizer's own construction, one draw over model and probe
        self._noise = joint[count:].to(self._pending.dtype)
        return joint[:count]

    def _after_step(self, _optimizer: Any) -> None:
        released = self._pending if self._noise is None else self._pending + self._noise
        self.scores += released.detach().to(torch.float64).cpu()
        self._pending = torch.zeros_like(self._pending)
        self._noise = None
        self.noisy_steps += 1


def input_canaries(
    count: int, *, input_shape: tuple[int, ...], num_classes: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` out-of-distribution records: features uniform in [0, 1], labels uniform over the classes."""
    features = torch.from_numpy(rng.random((count, *input_shape)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, num_classes, size=count).astype(np.int64))
    return features, labels


def poisoned_canaries(
    count: int, *, model: nn.Module, input_shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` adversarial records: features at random corners of [0, 1]^d, labels the initial ``model``'s least
    likely class for each (the largest loss, hence gradient, it can get)."""
    features = torch.from_numpy(rng.integers(0, 2, size=(count, *input_shape)).astype(np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            labels = model(features).argmin(dim=1)
    finally:
        model.train(was_training)
    return features, labels.to(torch.int64)


def input_scores(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, *, device: torch.device) -> FloatArray:
    """Minus each canary's cross-entropy under ``model`` (higher: more likely trained on)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(features.to(device))
            losses = nn.functional.cross_entropy(logits, labels.to(device), reduction="none")
    finally:
        model.train(was_training)
    scores: FloatArray = -losses.double().cpu().numpy()
    return scores


def _rank_count(scores: FloatArray, included: BoolArray, per_side: int, *, kind: str) -> GuessCount:
    # A stable sort breaks ties by index, which was fixed before any coin was flipped: a function of the scores.
    order = np.argsort(scores, kind="stable")
    guessed_out, guessed_in = order[:per_side], order[len(order) - per_side :]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return GuessCount(f"{kind}: top {per_side} in, bottom {per_side} out", len(scores), 2 * per_side, correct)


def guess_counts(
    scores: FloatArray, included: BoolArray, *, kind: str, thresholds: tuple[float, ...] = ()
) -> list[GuessCount]:
    """How many guesses each fixed rule gets right: the rank rules of :data:`GUESS_FRACTIONS`, and for each of
    ``thresholds`` "in above it, out at or below it" on every canary."""
    m = len(scores)
    sides = sorted(
        {max(1, int(fraction * m) // 2) for fraction in GUESS_FRACTIONS if 2 * max(1, int(fraction * m) // 2) <= m}
    )
    counts = [_rank_count(scores, included, per_side, kind=kind) for per_side in sides]
    for threshold in thresholds:
        correct = int(((scores > threshold) == included).sum())
        counts.append(GuessCount(f"{kind}: in above {threshold:.6g}, out below", m, m, correct))
    return counts
