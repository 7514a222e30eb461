"""Random bits for DP: Poisson inclusion at a rate never above q, and Gaussian noise whose tails match the analysis.

Two facts about torch's own samplers break the accountant's assumptions (measured, field notes turn 3):

* ``torch.rand(n) < q`` draws float32 uniforms on a 2⁻²⁴ grid, so a record is included with probability
  ⌈q·2²⁴⌉/2²⁴ ≥ q: below q ≈ 2e-3 the ε printed for q falls under the true one.
* float32 ``normal_`` is Box–Muller on those uniforms: every draw satisfies |z| ≤ √(2·ln 2²⁴) ≈ 5.77, a region of
  infinite privacy loss per step (its probability is missing from δ).

Here every draw starts from uniform 64-bit words (:class:`RandomBits`): a torch generator's (:class:`GeneratorBits`)
or ChaCha20's keystream keyed from the OS (:class:`ChaChaBits`, a CSPRNG: ``privacy.secureNoise``).

* :func:`bernoulli` includes with probability ⌊q·2⁵³⌋/2⁵³, which is ≤ q and within 2⁻⁵³ of it (the accountant's q
  is then a valid, conservative rate).
* :func:`standard_normal` is Box–Muller in float64 whose radius uniform reaches 2⁻¹²⁷ (63 bits, and 63 more in the
  rare case it falls below 2⁻⁵³): draws reach |z| ≈ 13.2, so the probability of the missing tail beyond the
  shifted cap is below 1e-23 per step for any σ ≥ 0.3 (the planner refuses a plan where it is not negligible next
  to δ: ``sampler_tail_mass``); the angle has 32 bits. The result is cast to the parameters' dtype only at the end.
"""

from __future__ import annotations

import math
import os
from typing import Final, Protocol

import torch
from torch import Tensor

from dptrain_accounting import NOISE_SAMPLER_RADIUS

__all__ = [
    "ChaChaBits",
    "GeneratorBits",
    "RandomBits",
    "bernoulli",
    "fresh_bits",
    "inclusion_threshold",
    "standard_normal",
    "uniform53",
]

_CHACHA_BLOCK_WORDS: Final = 8  # 64-byte ChaCha20 blocks
_MASK53: Final = (1 << 53) - 1
_MASK63: Final = (1 << 63) - 1
_TWO_POW_53: Final = float(2**53)
_TWO_POW_MINUS_63: Final = 2.0**-63
_REFINE_BELOW: Final = 1 << 10  # a 63-bit uniform below 2⁻⁵³ gets 63 more bits
_ANGLE_STEP: Final = 2.0 * math.pi / 2**32
MAX_RADIUS: Final = NOISE_SAMPLER_RADIUS
"""The largest Box–Muller radius :func:`standard_normal` can draw (≈ 13.3; the planner checks σ against it)."""


class RandomBits(Protocol):
    """A source of independent uniform 64-bit words (as int64 bit patterns) on ``device``."""

    @property
    def device(self) -> torch.device: ...

    @property
    def cryptographic(self) -> bool:
        """Whether the words come from a CSPRNG."""
        ...

    def words(self, count: int) -> Tensor:
        """``count`` uniform 64-bit words, int64, on :attr:`device`."""
        ...


class GeneratorBits:
    """Words from a torch generator (fast, on any device; seeded from the OS when none is given): not a CSPRNG."""

    cryptographic = False

    def __init__(self, generator: torch.Generator | None = None, *, device: torch.device | str = "cpu") -> None:
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        self.generator = generator

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def words(self, count: int) -> Tensor:
        out = torch.empty(count, dtype=torch.int64, device=self.device)
        return out.random_(-(2**63), None, generator=self.generator)


class ChaChaBits:
    """ChaCha20 keystream (``cryptography``, OpenSSL's implementation) under a fresh 256-bit key from the OS: a CSPRNG.

    Words are made on the CPU and moved to ``device``.
    """

    cryptographic = True

    def __init__(self, *, device: torch.device | str = "cpu", key: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key = os.urandom(32) if key is None else key
        nonce = bytes(16)  # a fresh key per source: the counter block may start at zero
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._device = torch.device(device)
        self._zeros = b""  # the plaintext: the keystream is the encryption of zeros

    @property
    def device(self) -> torch.device:
        return self._device

    def words(self, count: int) -> Tensor:
        if len(self._zeros) < 8 * count:
            self._zeros = bytes(8 * count)
        out = torch.empty(count + _CHACHA_BLOCK_WORDS, dtype=torch.int64)  # update_into wants a block of slack
        self._stream.update_into(memoryview(self._zeros)[: 8 * count], out.numpy().data.cast("B"))
        return out[:count].to(self._device)


def fresh_bits(*, secure: bool, device: torch.device | str = "cpu") -> RandomBits:
    """A new source seeded from the OS: ChaCha20 when ``secure``, else a torch generator on ``device``."""
    return ChaChaBits(device=device) if secure else GeneratorBits(device=device)


def uniform53(bits: RandomBits, count: int) -> Tensor:
    """``count`` uniform integers in [0, 2⁵³) (int64): the top 53 bits of fresh words."""
    return (bits.words(count) >> 11) & _MASK53


def inclusion_threshold(rate: float) -> int:
    """⌊rate·2⁵³⌋: a word's top 53 bits below it include the record (exact: scaling by 2⁵³ only moves the exponent)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"a rate must be in [0, 1], got {rate}")
    return math.floor(rate * _TWO_POW_53)


def bernoulli(bits: RandomBits, count: int, rate: float) -> Tensor:
    """``count`` independent inclusions (bool), each with probability ⌊rate·2⁵³⌋/2⁵³: at most ``rate``, and within
    2⁻⁵³ of it."""
    return uniform53(bits, count) < inclusion_threshold(rate)


def standard_normal(bits: RandomBits, count: int) -> Tensor:
    """``count`` independent N(0, 1) draws in float64: Box–Muller on a 63-bit radius uniform (refined with a second
    word, to 126 bits, in the rare case it falls below 2⁻⁵³) and a 32-bit angle. Draws reach ±MAX_RADIUS."""
    pairs = (count + 1) // 2
    angle_words = (pairs + 1) // 2  # two 32-bit angles per word
    words = bits.words(pairs + angle_words)
    high = (words[:pairs] >> 1).bitwise_and_(_MASK63)
    uniform = high.to(torch.float64).add_(0.5).mul_(_TWO_POW_MINUS_63)  # in (0, 1), as small as 2⁻⁶⁴ ...
    if pairs and int(high.min()) < _REFINE_BELOW:  # ... and as small as 2⁻¹²⁷ (a branch on random bits only)
        tiny = high < _REFINE_BELOW
        low = (bits.words(int(tiny.sum())) >> 1).bitwise_and_(_MASK63).to(torch.float64).add_(0.5)
        uniform[tiny] = (high[tiny].to(torch.float64) + low * _TWO_POW_MINUS_63) * _TWO_POW_MINUS_63
    radius = uniform.log_().mul_(-2.0).sqrt_()
    # Signed 32-bit halves: angles in [-π, π), as uniform as [0, 2π) (and cheaper to reduce).
    angle = words[pairs:].view(torch.int32)[:pairs].to(torch.float64).add_(0.5).mul_(_ANGLE_STEP)
    draws = torch.empty(2 * pairs, dtype=torch.float64, device=words.device)
    torch.mul(radius, torch.cos(angle), out=draws[:pairs])
    torch.mul(radius, angle.sin_(), out=draws[pairs:])
    return draws[:count]
