"""dptrain.randomness: inclusion never above q (at the 2⁻²⁴ grid too), float64 Gaussian tails, ChaCha20 as specified."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from scipy import stats

from dptrain.randomness import (
    MAX_RADIUS,
    ChaChaBits,
    GeneratorBits,
    bernoulli,
    inclusion_threshold,
    standard_normal,
    uniform53,
)
from dptrain_accounting import PlanError, plan_fixed_steps, sampler_tail_mass


class _Words:
    """A fake source that hands out fixed words, in order (to probe the thresholds exactly)."""

    cryptographic = False
    device = torch.device("cpu")

    def __init__(self, words: list[int]) -> None:
        self._words = torch.tensor(words, dtype=torch.int64)
        self._next = 0

    def words(self, count: int) -> torch.Tensor:
        taken = self._words[self._next : self._next + count]
        assert len(taken) == count
        self._next += count
        return taken


def _word(top53: int) -> int:
    """The int64 bit pattern whose top 53 bits are ``top53`` (low bits set, to check they are ignored)."""
    value = (top53 << 11) | 0x7FF
    return value - (1 << 64) if value >= 1 << 63 else value


@pytest.mark.parametrize("rate", [2.0**-24, 1.5 * 2.0**-24, 2.0**-26, 1e-7, 64 / 1_070_000, 0.3, 1.0])
def test_inclusion_probability_is_the_largest_53_bit_fraction_not_above_q(rate: float) -> None:
    threshold = inclusion_threshold(rate)
    assert Fraction(threshold, 2**53) <= Fraction(rate) < Fraction(threshold + 1, 2**53)
    if threshold < 2**53:
        below, at = _word(threshold - 1) if threshold else None, _word(threshold)
        words = [at] if below is None else [below, at]
        included = bernoulli(_Words(words), len(words), rate).tolist()
        assert included == ([False] if below is None else [True, False])


def test_below_the_float32_grid_the_rate_that_runs_is_q_not_its_ceiling() -> None:
    """At q = 2⁻²⁶, float32 uniforms include at 2⁻²⁴ (4 q): 2·10⁸ seeded draws tell the two apart."""
    rate, chunk, chunks = 2.0**-26, 10_000_000, 20
    bits, legacy = GeneratorBits(torch.Generator().manual_seed(11)), torch.Generator().manual_seed(11)
    ours = sum(int(bernoulli(bits, chunk, rate).sum()) for _ in range(chunks))
    float32 = sum(int((torch.rand(chunk, generator=legacy) < rate).sum()) for _ in range(chunks))
    expected = rate * chunk * chunks  # ≈ 3.0; float32 gives ≈ 11.9
    assert ours <= expected + 4 * math.sqrt(expected)
    assert float32 >= 4 * expected - 4 * math.sqrt(4 * expected)  # the old construction fails the same bound


def test_uniform53_spans_53_bits() -> None:
    values = uniform53(GeneratorBits(torch.Generator().manual_seed(0)), 100_000)
    assert int(values.min()) >= 0
    assert int(values.max()) < 2**53
    assert int(values.max()) > 2**53 * 0.999  # the top bits are used
    assert bool((values & 1).any())
    assert bool((values & (1 << 52)).any())


def test_standard_normal_is_gaussian_in_float64() -> None:
    draws = standard_normal(GeneratorBits(torch.Generator().manual_seed(5)), 200_001)
    assert draws.dtype == torch.float64
    assert draws.numel() == 200_001  # an odd count drops the last partner
    assert abs(float(draws.mean())) < 4 / math.sqrt(200_001)
    assert float(draws.std()) == pytest.approx(1.0, rel=0.01)
    assert stats.kstest(draws.numpy(), "norm").pvalue > 1e-3
    assert float(draws.abs().max()) > 4.0


def test_the_radius_reaches_13_standard_deviations_not_5_77() -> None:
    # All-zero words: the smallest radius uniform (½·2⁻¹²⁶, its refinement word 0 too) and an angle of ½·2π/2³²
    # (the signed half 0): the largest draw there is.
    (largest,) = standard_normal(_Words([0, 0, 0]), 1).tolist()
    assert largest == pytest.approx(MAX_RADIUS)
    assert 13.2 < MAX_RADIUS < 13.3  # float32 Box–Muller stops at √(2·ln 2²⁴) ≈ 5.77
    # a radius word just above the refinement threshold needs no second word: 63 bits reach 2⁻⁵³
    (one,) = standard_normal(_Words([(1 << 10) << 1, 0]), 1).tolist()
    assert one == pytest.approx(math.sqrt(-2 * math.log(1024.5 * 2.0**-63)))
    assert sampler_tail_mass(0.3, 1) < 1e-22
    assert sampler_tail_mass(0.56, 10_000) < 1e-25  # the example: float32 lost ≈ 7e-5 of δ over 10 epochs
    assert sampler_tail_mass(0.05, 1) == 1.0  # too little noise: nothing to promise from the cap


def test_the_planner_refuses_noise_too_small_for_the_samplers_reach() -> None:
    common = {"num_examples": 1000, "eval_fraction": 0.0, "batch_size": 1000, "delta": 1e-6}
    with pytest.raises(PlanError, match="too little noise"):
        plan_fixed_steps(steps=1000, target_epsilon=100.0, noise_multiplier=0.15, **common)
    plan_fixed_steps(steps=2, target_epsilon=100.0, noise_multiplier=0.35, **common)  # ε ≈ 70: allowed


def test_chacha20_is_the_rfc_8439_keystream() -> None:
    """RFC 8439 §2.4.2 / A.1 test vector 1: the all-zero key and nonce, block counter 0."""
    words = ChaChaBits(key=bytes(32)).words(8)
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    assert words.numpy().tobytes() == expected
    assert ChaChaBits().cryptographic
    assert not torch.equal(ChaChaBits().words(4), ChaChaBits().words(4))  # a fresh key from the OS each time


def test_chacha20_draws_continue_the_stream() -> None:
    source, again = ChaChaBits(key=bytes(range(32))), ChaChaBits(key=bytes(range(32)))
    assert torch.equal(torch.cat([source.words(3), source.words(5)]), again.words(8))
