"""Unit tests for dptrain_accounting: epsilon values against independent computations, calibration."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import optimize, stats

import dptrain_accounting as acc
from dptrain_accounting import (
    AccountingError,
    CalibrationError,
    MechanismSegment,
    UnsupportedAccountantError,
    _accountants,
    calibrate_noise_multiplier,
    compact,
    compute_delta,
    compute_epsilon,
    plan_steps,
)

dp_event = pytest.importorskip("dp_accounting.dp_event")
pld_privacy_accountant = pytest.importorskip("dp_accounting.pld.pld_privacy_accountant")

# (sample_rate, noise_multiplier, steps, delta) -> epsilon measured with PLD at 1e-4 (field reference).
REFERENCE = [
    ((256 / 60000, 1.1, 14100, 1e-5), 2.385),
    ((0.01, 1.0, 1000, 1e-5), 1.828),
    ((0.001, 0.8, 10000, 1e-6), 0.947),
    ((0.1, 2.0, 500, 1e-5), 5.555),
    ((1.0, 5.0, 100, 1e-5), 9.997),
]
GRID = [params for params, _ in REFERENCE] + [(0.5, 3.0, 50, 1e-5), (0.02, 0.9, 1, 1e-5)]


def _direct_pld(segments: Sequence[tuple[float, float, int]], delta: float, discretization: float = 1e-4) -> float:
    """Epsilon straight from dp_accounting, built independently of the package: (q, sigma, steps)."""
    events = [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for q, sigma, steps in segments
    ]
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _reported(direct: float) -> float:
    """What compute_epsilon reports for a PLD epsilon: plus the safety margin (absolute, relative)."""
    absolute, relative = acc.PLD_SAFETY_MARGIN
    return direct + absolute + relative * direct


def _exact_gaussian_epsilon(sigma_effective: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism (sensitivity 1): delta(eps) from Balle & Wang (2018)."""
    s = sigma_effective

    def delta_of(eps: float) -> float:
        return float(stats.norm.cdf(-eps * s + 1 / (2 * s)) - math.exp(eps) * stats.norm.cdf(-eps * s - 1 / (2 * s)))

    return float(optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 200.0, xtol=1e-12))


def _exact_single_subsampled_epsilon(q: float, sigma: float, delta: float) -> float:
    """Exact epsilon of ONE Poisson-subsampled Gaussian step under add/remove adjacency.

    The privacy loss log((1-q) + q exp((2x-1)/(2 sigma^2))) is monotone in x, so the hockey-stick
    divergence in both directions has a closed form in normal tails.
    """
    norm = stats.norm

    def delta_of(eps: float) -> float:
        # remove: P = (1-q) N(0, s^2) + q N(1, s^2) against Q = N(0, s^2)
        x0 = sigma**2 * math.log((math.expm1(eps) + q) / q) + 0.5
        d_remove = (1 - q) * norm.sf(x0 / sigma) + q * norm.sf((x0 - 1) / sigma) - math.exp(eps) * norm.sf(x0 / sigma)
        d_add = 0.0
        ratio = (math.exp(-eps) - 1 + q) / q
        if ratio > 0:  # add: Q against P
            x1 = sigma**2 * math.log(ratio) + 0.5
            d_add = norm.cdf(x1 / sigma) - math.exp(eps) * (
                (1 - q) * norm.cdf(x1 / sigma) + q * norm.cdf((x1 - 1) / sigma)
            )
        return float(max(d_remove, d_add))

    return float(optimize.brentq(lambda e: delta_of(e) - delta, 1e-9, 200.0, xtol=1e-12))


def _eps(params: tuple[float, float, int, float], accountant: str = "pld") -> float:
    q, sigma, steps, delta = params
    return compute_epsilon([MechanismSegment(sigma, q, steps)], delta=delta, accountant=accountant)


# --------------------------------------------------------------------------------------------- epsilon


@pytest.mark.parametrize("params", GRID, ids=str)
def test_pld_matches_direct_dp_accounting(params: tuple[float, float, int, float]) -> None:
    q, sigma, steps, delta = params
    direct = _direct_pld([(q, sigma, steps)], delta)
    assert _eps(params) == pytest.approx(_reported(direct), rel=1e-9)


@pytest.mark.parametrize(("params", "expected"), REFERENCE, ids=str)
def test_pld_reference_table(params: tuple[float, float, int, float], expected: float) -> None:
    assert _eps(params) == pytest.approx(expected, rel=5e-3)


def test_full_batch_matches_exact_gaussian() -> None:
    # q = 1: T Gaussian steps with sigma compose exactly to one Gaussian with sigma / sqrt(T).
    exact = _exact_gaussian_epsilon(5.0 / math.sqrt(100), 1e-5)
    assert exact == pytest.approx(9.99726, abs=1e-5)
    pld = _eps((1.0, 5.0, 100, 1e-5))
    assert exact <= pld <= exact * 1.002
    assert _eps((1.0, 5.0, 100, 1e-5), "rdp") >= exact


@pytest.mark.parametrize(("q", "sigma", "delta"), [(0.01, 0.8, 1e-5), (0.2, 1.0, 1e-5), (0.5, 2.0, 1e-6)])
def test_single_subsampled_step_matches_exact(q: float, sigma: float, delta: float) -> None:
    exact = _exact_single_subsampled_epsilon(q, sigma, delta)
    pld = _eps((q, sigma, 1, delta))
    assert exact <= pld <= exact * 1.001  # pessimistic discretization: a valid, tight upper bound
    assert _eps((q, sigma, 1, delta), "rdp") >= exact


@pytest.mark.parametrize("params", GRID, ids=str)
def test_rdp_is_looser_than_pld(params: tuple[float, float, int, float]) -> None:
    pld, rdp = _eps(params), _eps(params, "rdp")
    assert rdp >= pld
    # Still a sensible bound (field: 7-80% above PLD over many steps; RDP is loosest for a single step).
    assert rdp <= (3.0 if params[2] == 1 else 2.0) * pld


def test_heterogeneous_composition_matches_direct() -> None:
    a = MechanismSegment(1.1, 256 / 60000, 3000)
    b = MechanismSegment(0.8, 0.01, 700)
    eps = compute_epsilon([a, b], delta=1e-5)
    direct = _direct_pld(
        [(a.sample_rate, a.noise_multiplier, a.steps), (b.sample_rate, b.noise_multiplier, b.steps)], 1e-5
    )
    assert eps == pytest.approx(_reported(direct), rel=1e-9)
    assert eps > max(compute_epsilon([a], delta=1e-5), compute_epsilon([b], delta=1e-5))


def test_epsilon_monotone_in_steps_and_noise() -> None:
    q, delta = 0.01, 1e-5
    by_steps = [compute_epsilon([MechanismSegment(1.0, q, t)], delta=delta) for t in (1, 10, 100, 1000)]
    assert by_steps == sorted(by_steps)
    assert len(set(by_steps)) == len(by_steps)
    by_sigma = [compute_epsilon([MechanismSegment(s, q, 500)], delta=delta) for s in (0.7, 1.0, 2.0, 4.0)]
    assert by_sigma == sorted(by_sigma, reverse=True)
    assert len(set(by_sigma)) == len(by_sigma)


def test_compaction_does_not_change_epsilon() -> None:
    q = 0.01
    pieces = [MechanismSegment(1.0, q, 300), MechanismSegment(1.0, q, 0), MechanismSegment(1.0, q, 700)]
    assert compact(pieces) == [MechanismSegment(1.0, q, 1000)]
    # Compare with dp_accounting composing the three pieces separately (no compaction anywhere).
    direct = _direct_pld([(q, 1.0, 300), (q, 1.0, 700)], 1e-5)
    assert compute_epsilon(pieces, delta=1e-5) == pytest.approx(_reported(direct), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.02, 0.8834, 2000), (0.1, 2.1733, 1000)], ids=str)
def test_the_safety_margin_covers_a_finer_discretization(q: float, sigma: float, steps: int) -> None:
    """Pessimistic PLD at 1e-4 is not monotone in the interval: around ε = 8 over thousands of steps it can come out a
    few 1e-6 below PLD at 1e-5. The reported value, with its margin, never does."""
    finer = _direct_pld([(q, sigma, steps)], 1e-5, discretization=1e-5)
    reported = compute_epsilon([MechanismSegment(sigma, q, steps)], delta=1e-5)
    assert 6.0 < finer < 9.0
    assert reported >= finer
    assert reported - finer < 1e-3  # a margin, not a loss of tightness


def test_prv_is_a_valid_upper_bound_close_to_pld() -> None:
    for params in [(256 / 60000, 1.1, 14100, 1e-5), (0.01, 1.0, 1000, 1e-5)]:
        q, sigma, steps, delta = params
        pld = _direct_pld([(q, sigma, steps)], delta, discretization=1e-5)
        prv = _eps(params, "prv")
        assert pld <= prv <= pld * 1.02
    mixed = [MechanismSegment(1.0, 0.01, 500), MechanismSegment(2.0, 0.1, 200)]
    direct = _direct_pld([(0.01, 1.0, 500), (0.1, 2.0, 200)], 1e-5, discretization=1e-5)
    assert direct <= compute_epsilon(mixed, delta=1e-5, accountant="prv") <= direct * 1.02


def test_no_steps_is_zero_and_delta_validated() -> None:
    assert compute_epsilon([], delta=1e-5) == 0.0
    assert compute_epsilon([MechanismSegment(1.0, 0.1, 0)], delta=1e-5, accountant="rdp") == 0.0
    assert compute_delta([], epsilon=1.0) == 0.0
    for bad in (0.0, 1.0, -1e-5, 2.0, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            compute_epsilon([MechanismSegment(1.0, 0.1, 10)], delta=bad)
    with pytest.raises(ValueError, match="epsilon"):
        compute_delta([MechanismSegment(1.0, 0.1, 10)], epsilon=-1.0)


def test_compute_delta_inverts_compute_epsilon() -> None:
    segments = [MechanismSegment(1.0, 0.01, 1000)]
    eps = compute_epsilon(segments, delta=1e-5)
    assert compute_delta(segments, epsilon=eps) == pytest.approx(1e-5, rel=1e-3)
    assert compute_delta(segments, epsilon=eps / 2) > 1e-5
    assert compute_delta(segments, epsilon=2 * eps) < 1e-5


# -------------------------------------------------------------------------------------- mechanism data


def test_segment_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        MechanismSegment(0.0, 0.1, 10)
    with pytest.raises(ValueError, match="noise_multiplier"):
        MechanismSegment(float("inf"), 0.1, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        MechanismSegment(1.0, 0.0, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        MechanismSegment(1.0, 1.5, 10)
    with pytest.raises(ValueError, match="steps"):
        MechanismSegment(1.0, 0.1, -1)
    with pytest.raises(ValueError, match="steps"):
        MechanismSegment(1.0, 0.1, 2.5)  # type: ignore[arg-type]
    assert MechanismSegment(1.0, 1.0, 0).steps == 0


def test_segment_dict_round_trip_and_hashing() -> None:
    segment = MechanismSegment(1.1, 0.004, 14100)
    assert segment.to_dict() == {"noiseMultiplier": 1.1, "sampleRate": 0.004, "steps": 14100}
    assert MechanismSegment.from_dict(segment.to_dict()) == segment
    assert MechanismSegment.from_dict({"noiseMultiplier": 2, "sampleRate": 1, "steps": 3}) == MechanismSegment(
        2.0, 1.0, 3
    )
    assert isinstance(MechanismSegment(2, 1, 3).noise_multiplier, float)
    # numpy scalars (as a trainer may hold them) are accepted and normalised to Python numbers.
    from_numpy = MechanismSegment(np.float64(1.1), np.float32(0.5), np.int64(3))  # type: ignore[arg-type]
    assert from_numpy == MechanismSegment(1.1, 0.5, 3)
    assert type(from_numpy.steps) is int
    assert len({segment, MechanismSegment(1.1, 0.004, 14100)}) == 1
    with pytest.raises(ValueError, match="sampleRate"):
        MechanismSegment.from_dict({"noiseMultiplier": 1.0, "steps": 3})


def test_compact_merges_only_consecutive_equal_segments() -> None:
    a, b = MechanismSegment(1.0, 0.01, 5), MechanismSegment(2.0, 0.01, 7)
    assert compact([]) == []
    assert compact([a, a, b, MechanismSegment(2.0, 0.01, 0), b, a]) == [
        MechanismSegment(1.0, 0.01, 10),
        MechanismSegment(2.0, 0.01, 14),
        a,
    ]
    assert compact([MechanismSegment(1.0, 0.01, 0)]) == []
    assert compact([a, MechanismSegment(1.0, 0.02, 5)]) == [a, MechanismSegment(1.0, 0.02, 5)]


def test_plan_steps() -> None:
    q, steps = plan_steps(dataset_size=60000, batch_size=256, epochs=60)
    assert q == 256 / 60000
    assert steps == 14063  # 60 * 234.375 = 14062.5, rounded up
    assert plan_steps(dataset_size=1000, batch_size=10, epochs=3) == (0.01, 300)  # not 301 from 3 / 0.01
    assert plan_steps(dataset_size=1000, batch_size=10, epochs=0.1) == (0.01, 10)
    assert plan_steps(dataset_size=7, batch_size=7, epochs=2.5) == (1.0, 3)
    with pytest.raises(ValueError, match="must not exceed"):
        plan_steps(dataset_size=100, batch_size=101, epochs=1.0)
    with pytest.raises(ValueError, match="dataset_size"):
        plan_steps(dataset_size=0, batch_size=1, epochs=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        plan_steps(dataset_size=100, batch_size=0, epochs=1.0)
    with pytest.raises(ValueError, match="epochs"):
        plan_steps(dataset_size=100, batch_size=10, epochs=0.0)


# ----------------------------------------------------------------------------------------- registry


def test_gdp_and_unknown_accountants_refused() -> None:
    segments = [MechanismSegment(1.0, 0.01, 100)]
    for name in ("gdp", "GDP"):
        with pytest.raises(UnsupportedAccountantError, match="under-report") as info:
            compute_epsilon(segments, delta=1e-5, accountant=name)
        assert "pld" in str(info.value)
        assert "rdp" in str(info.value)
    with pytest.raises(UnsupportedAccountantError, match="under-report"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100, accountant="gdp")
    with pytest.raises(UnsupportedAccountantError, match="under-report"):
        acc.register_accountant("gdp", lambda segments, delta: 0.0)
    with pytest.raises(UnsupportedAccountantError, match=r"unknown accountant 'nope'.*pld.*rdp"):
        acc.get_accountant("nope")
    assert issubclass(UnsupportedAccountantError, AccountingError)
    assert issubclass(UnsupportedAccountantError, ValueError)
    assert {"pld", "rdp"} <= set(acc.available_accountants())
    assert "gdp" not in acc.available_accountants()


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish afterwards."""
    monkeypatch.setattr(_accountants, "_registry", dict(_accountants._registry))


def _linear_accountant(scale: float) -> acc.EpsilonFunction:
    def epsilon(segments: Sequence[MechanismSegment], delta: float) -> float:
        return scale * sum(s.sample_rate * math.sqrt(s.steps) / s.noise_multiplier for s in segments)

    return epsilon


@pytest.mark.usefixtures("scratch_registry")
def test_register_accountant() -> None:
    segments = [MechanismSegment(2.0, 0.1, 100)]
    acc.register_accountant("Linear", _linear_accountant(1.0))
    assert "linear" in acc.available_accountants()
    assert compute_epsilon(segments, delta=1e-5, accountant="linear") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="already registered"):
        acc.register_accountant("linear", _linear_accountant(2.0))
    assert compute_epsilon(segments, delta=1e-5, accountant="linear") == pytest.approx(0.5)
    acc.register_accountant("linear", _linear_accountant(2.0), replace=True)
    assert compute_epsilon(segments, delta=1e-5, accountant="linear") == pytest.approx(1.0)  # no stale cache
    # Calibration works against any registered accountant and is verified with it: sigma = 0.1 * 10 / 0.25.
    sigma = calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=0.1, steps=100, accountant="linear")
    assert 2.0 * 0.1 * 10 / sigma <= 0.5
    assert sigma == pytest.approx(4.0, rel=2e-3)


# -------------------------------------------------------------------------------------- calibration

CALIBRATION_GRID = [
    # (target_epsilon, delta, sample_rate, steps)
    (1.0, 1e-5, 256 / 60000, 14100),
    (3.0, 1e-5, 0.01, 1000),
    (2.0, 1e-5, 1.0, 50),
    (8.0, 1e-5, 0.1, 500),
    (1.0, 1e-6, 0.001, 10000),
]
# Each PLD calibration costs a few exact PLD evaluations (0.3-2 s each); the last two are the slowest.
PLD_CALIBRATION_GRID = [
    case if i < 3 else pytest.param(case, marks=pytest.mark.slow) for i, case in enumerate(CALIBRATION_GRID)
]


def _check_calibrated(
    sigma: float,
    *,
    target: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str,
    prior: Sequence[MechanismSegment] = (),
    tolerance: float = 1e-3,
) -> None:
    def eps(s: float) -> float:
        return compute_epsilon([*prior, MechanismSegment(s, q, steps)], delta=delta, accountant=accountant)

    assert eps(sigma) <= target  # never overshoots
    assert eps(sigma * (1 - 2 * tolerance)) > target  # and is minimal


@pytest.mark.parametrize("case", PLD_CALIBRATION_GRID, ids=str)
def test_calibration_pld_never_overshoots_and_is_minimal(case: tuple[float, float, float, int]) -> None:
    target, delta, q, steps = case
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    _check_calibrated(sigma, target=target, delta=delta, q=q, steps=steps, accountant="pld")
    # The reported epsilon is dp_accounting's own answer, not a cached artefact of the search.
    assert _direct_pld([(q, sigma, steps)], delta) <= target


@pytest.mark.parametrize("case", CALIBRATION_GRID, ids=str)
def test_calibration_rdp_never_overshoots_and_needs_more_noise(case: tuple[float, float, float, int]) -> None:
    target, delta, q, steps = case
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant="rdp")
    _check_calibrated(sigma, target=target, delta=delta, q=q, steps=steps, accountant="rdp")
    # RDP is looser, so it needs more noise: PLD certifies that noise with room to spare.
    assert compute_epsilon([MechanismSegment(sigma, q, steps)], delta=delta) < target


def test_calibration_with_prior_segments() -> None:
    prior = [MechanismSegment(1.2, 0.01, 400), MechanismSegment(2.0, 0.02, 100)]
    spent = compute_epsilon(prior, delta=1e-5)
    target = spent + 1.0
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=0.01, steps=600, prior=prior)
    _check_calibrated(sigma, target=target, delta=1e-5, q=0.01, steps=600, accountant="pld", prior=prior)


def test_calibration_relative_tolerance() -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=2.0,
        delta=1e-5,
        sample_rate=0.01,
        steps=1000,
        accountant="rdp",
        relative_tolerance=0.02,
    )
    _check_calibrated(sigma, target=2.0, delta=1e-5, q=0.01, steps=1000, accountant="rdp", tolerance=0.02)


def test_calibration_unreachable_targets() -> None:
    # Even sigma = MAX_NOISE_MULTIPLIER leaves epsilon above a microscopic target.
    with pytest.raises(CalibrationError, match="unreachable"):
        calibrate_noise_multiplier(target_epsilon=1e-4, delta=1e-5, sample_rate=1.0, steps=100_000)
    prior = [MechanismSegment(0.8, 0.01, 1000)]
    with pytest.raises(CalibrationError, match="prior"):
        calibrate_noise_multiplier(
            target_epsilon=0.9 * compute_epsilon(prior, delta=1e-5),
            delta=1e-5,
            sample_rate=0.01,
            steps=10,
            prior=prior,
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": float("inf")},
        {"delta": 1.0},
        {"delta": 0.0},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"steps": 0},
        {"relative_tolerance": 0.0},
        {"relative_tolerance": 0.5},
    ],
    ids=str,
)
def test_calibration_rejects_bad_inputs(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100}
    args.update(kwargs)
    with pytest.raises(CalibrationError):
        calibrate_noise_multiplier(**args)  # type: ignore[arg-type]


def test_calibration_floor_for_very_loose_targets() -> None:
    # So loose a target that even the smallest supported noise meets it: the floor is returned, within target.
    sigma = calibrate_noise_multiplier(target_epsilon=1e4, delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp")
    assert sigma == acc.MIN_NOISE_MULTIPLIER
    assert compute_epsilon([MechanismSegment(sigma, 1.0, 1)], delta=1e-5, accountant="rdp") <= 1e4


# ---------------------------------------------------------------------------------------- hygiene


def test_import_hygiene() -> None:
    code = textwrap.dedent(
        """
        import sys
        import dptrain_accounting as a
        a.MechanismSegment(1.0, 0.5, 1)
        assert "dp_accounting" not in sys.modules, "dp_accounting must be imported lazily"
        a.compute_epsilon([a.MechanismSegment(1.0, 0.5, 1)], delta=1e-5)
        a.compute_epsilon([a.MechanismSegment(1.0, 0.5, 1)], delta=1e-5, accountant="rdp")
        bad = sorted(m for m in ("torch", "opacus", "pydantic", "kopf", "kubernetes") if m in sys.modules)
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
