"""The mechanism description shared by every accountant: runs of Poisson-subsampled Gaussian steps."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["NOISE_SAMPLER_RADIUS", "MechanismSegment", "compact", "plan_steps", "sampler_tail_mass"]


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(float(value))
    raise ValueError(f"{name} must be an integer, got {value!r}")


@dataclass(frozen=True)
class MechanismSegment:
    """``steps`` consecutive DP-SGD steps, each a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is the ratio of the Gaussian noise standard deviation to the clipping norm
    and ``sample_rate`` the Poisson sampling probability of each example.  Instances are immutable
    and hashable, so tuples of them can key caches.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        noise_multiplier = _finite_float("noise_multiplier", self.noise_multiplier)
        if noise_multiplier <= 0.0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        sample_rate = _finite_float("sample_rate", self.sample_rate)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        steps = _integer("steps", self.steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps!r}")
        # Normalise the types (e.g. an int noise multiplier) so equal segments compare and hash equal.
        object.__setattr__(self, "noise_multiplier", noise_multiplier)
        object.__setattr__(self, "sample_rate", sample_rate)
        object.__setattr__(self, "steps", steps)

    def to_dict(self) -> dict[str, float | int]:
        """The camelCase form stored in resource statuses: ``noiseMultiplier``, ``sampleRate``, ``steps``."""
        return {"noiseMultiplier": self.noise_multiplier, "sampleRate": self.sample_rate, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MechanismSegment:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing keys or invalid values."""
        missing = [key for key in ("noiseMultiplier", "sampleRate", "steps") if key not in d]
        if missing:
            raise ValueError(f"mechanism segment is missing {', '.join(missing)}: {dict(d)!r}")
        return cls(
            noise_multiplier=d["noiseMultiplier"],
            sample_rate=d["sampleRate"],
            steps=d["steps"],
        )


def compact(segments: Iterable[MechanismSegment]) -> list[MechanismSegment]:
    """Drop empty segments and merge consecutive segments with equal (noise multiplier, sample rate).

    The order of the remaining segments is kept (the ledger is chronological); composing
    ``k`` then ``m`` identical steps is the same mechanism as ``k + m`` steps, so the privacy
    guarantee of the result is unchanged.
    """
    result: list[MechanismSegment] = []
    for segment in segments:
        if not isinstance(segment, MechanismSegment):
            raise TypeError(f"expected MechanismSegment, got {type(segment).__name__}")
        if segment.steps == 0:
            continue
        if result and (result[-1].noise_multiplier, result[-1].sample_rate) == (
            segment.noise_multiplier,
            segment.sample_rate,
        ):
            last = result[-1]
            result[-1] = MechanismSegment(last.noise_multiplier, last.sample_rate, last.steps + segment.steps)
        else:
            result.append(segment)
    return result


def plan_steps(*, dataset_size: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """``(sample_rate, steps)`` for Poisson sampling with expected batch ``batch_size`` over ``epochs``.

    ``sample_rate = batch_size / dataset_size`` and ``steps = ceil(epochs / sample_rate)``; a
    product that is an integer up to floating-point noise is not rounded up a further step.
    """
    dataset_size = _integer("dataset_size", dataset_size)
    batch_size = _integer("batch_size", batch_size)
    epochs = _finite_float("epochs", epochs)
    if dataset_size <= 0:
        raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if batch_size > dataset_size:
        raise ValueError(f"batch_size ({batch_size}) must not exceed dataset_size ({dataset_size})")
    if epochs <= 0.0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    sample_rate = batch_size / dataset_size
    exact = epochs * dataset_size / batch_size
    nearest = round(exact)
    steps = nearest if abs(exact - nearest) <= 1e-9 * max(1.0, exact) else math.ceil(exact)
    return sample_rate, max(1, int(steps))


NOISE_SAMPLER_RADIUS: Final = math.sqrt(-2.0 * math.log(0.5 * 2.0**-126))
"""The largest |z| the trainer's Gaussian sampler draws (dptrain.randomness: Box–Muller, radius uniform ≥ 2⁻¹²⁷)."""


def sampler_tail_mass(noise_multiplier: float, steps: int) -> float:
    """An upper bound on the probability, over ``steps`` steps, that a neighbouring dataset's output lands where the
    capped sampler gives the other no density: per step P(|Z| > radius − 1/σ) for the coordinate one record moves
    most (by at most C, i.e. 1/σ noise standard deviations). It must stay negligible next to δ."""
    if noise_multiplier <= 0:
        return math.inf
    reach = NOISE_SAMPLER_RADIUS - 1.0 / noise_multiplier
    return min(1.0, steps * math.erfc(reach / math.sqrt(2.0))) if reach > 0 else 1.0
