"""Privacy units (a patient with several records): each unit's summed gradient is clipped once, in every clipping
mode that can (book-keeping kernels, Opacus hooks), equal to the brute force in float64; ghost refuses."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from dptrain.clipping import make_private
from dptrain.errors import ClippingError
from tests.support.clipping import max_relative_error, per_example_grads

CE = nn.CrossEntropyLoss()


def _unit_reference(model: nn.Module, x: Any, y: torch.Tensor, groups: torch.Tensor, *, clip: float) -> list[Any]:
    """Σ_u clip_C(Σ_{i∈u} g_i) / expected, with Opacus' clip factor, from one backward per record."""
    grads = per_example_grads(model, x, y, CE)
    units = int(groups.max()) + 1
    summed = [[torch.zeros_like(g) for g in grads[0]] for _ in range(units)]
    for record, gs in enumerate(grads):
        for total, g in zip(summed[int(groups[record])], gs, strict=True):
            total.add_(g)
    out = [torch.zeros_like(g) for g in grads[0]]
    for gs in summed:
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))  # type: ignore[arg-type]
        factor = min(1.0, clip / (norm + 1e-6))
        for total, g in zip(out, gs, strict=True):
            total.add_(g * factor)
    return [t / 4.0 for t in out]


def _private_unit_update(
    model: nn.Module, x: Any, y: torch.Tensor, groups: torch.Tensor, *, clip: float, mode: str, micro: list[slice]
) -> list[torch.Tensor]:
    private = copy.deepcopy(model)
    wrapped, optimizer, criterion = make_private(
        private,
        torch.optim.SGD(private.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=4.0,
        clipping=mode,  # type: ignore[arg-type]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in micro:
            local = groups[part] - groups[part].min()
            optimizer.group(local)
            criterion(wrapped(x[part]), y[part]).backward()
            optimizer.accumulate()
        optimizer.group(None)
        optimizer.step()
    return [p.grad.detach().clone() for p in private.parameters()]  # type: ignore[union-attr]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _wide_mlp() -> nn.Module:
    """Wide enough that per-unit norms take the padded path: ghost for the first layer, instantiated for the second."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).double()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
    ).double()


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(ids)).mean(dim=1))


MODELS = {
    "mlp": (_mlp, lambda g: torch.randn(10, 6, dtype=torch.float64, generator=g)),
    "wide-mlp": (_wide_mlp, lambda g: torch.randn(10, 6, dtype=torch.float64, generator=g)),
    "cnn": (_cnn, lambda g: torch.randn(10, 1, 4, 4, dtype=torch.float64, generator=g)),
    "tokens": (lambda: _Tokens().double(), lambda g: torch.randint(0, 20, (10, 5), generator=g)),
}
# 10 records of 4 units, records of a unit contiguous (as the unit sampler hands them): 3, 1, 4, 2 records
GROUPS = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3])


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_per_unit_clipping_equals_the_brute_force(mode: str, model_name: str) -> None:
    build, inputs = MODELS[model_name]
    g = torch.Generator().manual_seed(3)
    x, y = inputs(g), torch.randint(0, 3, (10,), generator=g)
    model = build()
    clip = 0.3  # small: most units are clipped
    want = _unit_reference(model, x, y, GROUPS, clip=clip)
    whole = _private_unit_update(model, x, y, GROUPS, clip=clip, mode=mode, micro=[slice(0, 10)])
    assert max_relative_error(whole, want) <= 1e-9
    # micro-batches on unit boundaries accumulate to the same update
    split = _private_unit_update(model, x, y, GROUPS, clip=clip, mode=mode, micro=[slice(0, 4), slice(4, 10)])
    assert max_relative_error(split, want) <= 1e-9
    # and it is not the record-level update (which clips each record on its own)
    records = _private_unit_update(model, x, y, torch.arange(10), clip=clip, mode=mode, micro=[slice(0, 10)])
    assert max_relative_error(records, want) > 1e-3


def test_ghost_clipping_refuses_units() -> None:
    model = _mlp()
    _, optimizer, _ = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4.0,
        clipping="ghost",
    )
    with pytest.raises(ClippingError, match="bookkeeping"):
        optimizer.group(torch.tensor([0, 0, 1, 1]))
    optimizer.group(None)  # per record: fine


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_a_unit_with_a_non_finite_record_counts_for_nothing(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (10,), generator=g)
    poisoned = x.clone()
    poisoned[5, 2] = float("nan")  # unit 2's second record
    keep = GROUPS != 2
    model = _mlp()
    want = _private_unit_update(model, x[keep], y[keep], torch.tensor([0, 0, 0, 1, 2, 2]), clip=0.3, mode=mode,
                                micro=[slice(0, 6)])  # fmt: skip
    got = _private_unit_update(model, poisoned, y, GROUPS, clip=0.3, mode=mode, micro=[slice(0, 10)])
    assert all(torch.isfinite(t).all() for t in got)
    assert max_relative_error(got, want) <= 1e-9


def test_the_unit_sampler_draws_whole_units_poisson_at_q() -> None:
    """Each unit joins independently with probability q (χ² over the units' counts), with all of its records."""
    from scipy import stats

    from dptrain.dpsgd import UnitSampler
    from dptrain.randomness import GeneratorBits

    sizes = torch.tensor([1, 2, 3, 4] * 50)  # 200 units of 1-4 records
    units = torch.repeat_interleave(torch.arange(200), sizes)[
        torch.randperm(500, generator=torch.Generator().manual_seed(1))
    ]
    q, steps = 0.1, 3000
    sampler = UnitSampler(units, sample_rate=q, bits=GeneratorBits(torch.Generator().manual_seed(2)))
    counts = torch.zeros(200)
    for _ in range(steps):
        index, groups = sampler.next_batch()
        chosen = units[index]
        assert torch.equal(groups, torch.unique_consecutive(chosen, return_inverse=True)[1])  # grouped, in order
        present = torch.unique(chosen)
        assert torch.equal(torch.bincount(chosen, minlength=200)[present], sizes[present])  # every record of a unit
        counts[present] += 1
    expected = steps * q
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=200) > 1e-3
    assert abs(float(counts.mean()) - expected) < 4 * (expected * (1 - q) / 200) ** 0.5


def test_micro_batches_never_split_a_unit() -> None:
    from dptrain.dpsgd import unit_micro_batches

    groups = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3])
    assert unit_micro_batches(groups, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert unit_micro_batches(groups, 10) == [slice(0, 10)]
    with pytest.raises(ValueError, match="more than the physical batch"):
        unit_micro_batches(groups, 3)
