"""One non-finite example never changes what happens to the others: weight zero before any sum, in every clipping
mode, with micro-batches, and in the held-out releases."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.clipping import make_private
from dptrain.evaluation import holdout_sums
from tests.support.clipping import max_relative_error

MODES = ("bookkeeping", "ghost", "hooks")


def _overflowing_logistic() -> nn.Module:
    """A finite model whose logit overflows float32 (→ inf, a NaN loss) exactly for records with x0 = x1 = 1."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2e38, 2e38, 0.3, -0.2], [0.0, 0.0, -0.1, 0.4]]))
        model.bias.zero_()
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2)
    )


def _update(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, *, micro: int) -> list[torch.Tensor]:
    """The clipped (σ = 0) update of one logical batch, in micro-batches of ``micro``."""
    wrapped, optimizer, criterion = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=8.0,
        clipping=mode,  # type: ignore[arg-type]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, len(y), micro):
            criterion(wrapped(x[start : start + micro]), y[start : start + micro]).backward()
            optimizer.accumulate()
        optimizer.step()
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def _clean_batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand((9, *shape), generator=g)
    if len(shape) == 1:
        x[:, :2] = 0.0  # never the overflowing pattern
    return x, torch.randint(0, 2, (9,), generator=g)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro", [3, 10])
def test_an_overflowing_record_adds_nothing_and_poisons_nothing(mode: str, micro: int) -> None:
    x, y = _clean_batch((4,))
    poison = torch.tensor([[1.0, 1.0, 0.5, 0.5]])
    with_poison = (torch.cat([x[:4], poison, x[4:]]), torch.cat([y[:4], torch.tensor([1]), y[4:]]))
    assert not torch.isfinite(_overflowing_logistic()(poison)).all()  # the record really overflows
    want = _update(_overflowing_logistic(), mode, x, y, micro=micro)
    got = _update(_overflowing_logistic(), mode, *with_poison, micro=micro)
    assert all(torch.isfinite(g).all() for g in got)
    assert max_relative_error(got, want) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("build", "shape"), [(_mlp, (4,)), (_cnn, (1, 4, 4))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_counts_for_nothing(mode: str, build: type, shape: tuple[int, ...], bad: float) -> None:
    x, y = _clean_batch(shape)
    poisoned = x.clone()
    poisoned[2].view(-1)[1] = bad
    keep = torch.arange(9) != 2
    want = _update(build(), mode, x[keep], y[keep], micro=4)
    got = _update(build(), mode, poisoned, y, micro=4)
    assert all(torch.isfinite(g).all() for g in got)
    assert max_relative_error(got, want) <= 1e-6


def test_an_all_bad_micro_batch_adds_nothing() -> None:
    poison = torch.tensor([[1.0, 1.0, 0.5, 0.5]] * 3)
    for mode in MODES:
        got = _update(_overflowing_logistic(), mode, poison, torch.tensor([0, 1, 1]), micro=3)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in got), mode


def test_a_held_out_record_with_a_non_finite_score_gets_a_fixed_row() -> None:
    x, y = _clean_batch((4,))
    clean = holdout_sums(_overflowing_logistic(), TensorDataset(x, y), num_classes=2, device=torch.device("cpu"))
    poisoned_x = torch.cat([x, torch.tensor([[1.0, 1.0, 0.5, 0.5]])])
    poisoned = holdout_sums(
        _overflowing_logistic(),
        TensorDataset(poisoned_x, torch.cat([y, torch.tensor([1])])),
        num_classes=2,
        device=torch.device("cpu"),
    )
    assert torch.isfinite(poisoned).all()
    difference = poisoned - clean
    assert difference[0] == 1  # one more record
    assert torch.linalg.vector_norm(difference) <= 2.0  # within the release's sensitivity
    assert difference[2] == 1.0  # the clipped loss at its maximum
