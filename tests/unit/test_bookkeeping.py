"""Book-keeping clipping: with σ = 0 it must give exactly Opacus hooks mode's clipped gradient; noise std σC/B."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from dptrain.bookkeeping import BookkeepingOptimizer, supports_bookkeeping
from dptrain.models import build_model
from dptrain_api.job import ModelSpec

EXPECTED_BATCH = 16


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))


def _opacus_hooks_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    module = GradSampleModule(copy.deepcopy(model))
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=EXPECTED_BATCH,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.autograd.backward(nn.functional.cross_entropy(module(x), y))
    optimizer.pre_step()
    return _grads(module)


def _bookkeeping_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, sigma: float = 0.0
) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    optimizer = BookkeepingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=EXPECTED_BATCH,
    )
    torch.autograd.backward(nn.functional.cross_entropy(model(x), y))
    optimizer.pre_step()
    return _grads(model)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return [g.detach().clone() for g in grads if g is not None]


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a = torch.cat([t.flatten() for t in a])
    flat_b = torch.cat([t.flatten() for t in b])
    return float((flat_a - flat_b).norm() / flat_b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("batch", [1, 7, 16, 40])
@pytest.mark.parametrize("clip", [0.05, 1.0])
def test_matches_opacus_hooks_on_random_batches(batch: int, clip: float) -> None:
    model = _mlp().double()
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=generator)
    assert _relative_error(_bookkeeping_grad(model, x, y, clip), _opacus_hooks_grad(model, x, y, clip)) <= 1e-6


def test_matches_when_no_example_is_clipped() -> None:
    model = _mlp().double()
    x = torch.randn(10, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    expected = _opacus_hooks_grad(model, x, y, clip=1e6)
    assert _relative_error(_bookkeeping_grad(model, x, y, clip=1e6), expected) <= 1e-6
    # unclipped: the plain gradient of the summed loss, divided by the expected batch size
    plain = copy.deepcopy(model)
    torch.autograd.backward(nn.functional.cross_entropy(plain(x), y, reduction="sum") / EXPECTED_BATCH)
    assert _relative_error(expected, _grads(plain)) <= 1e-6


def test_empty_batch_gives_zero_gradient() -> None:
    model = _mlp().double()
    x = torch.zeros(0, 12, dtype=torch.float64)
    y = torch.zeros(0, dtype=torch.long)
    grads = _bookkeeping_grad(model, x, y, clip=1.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _opacus_hooks_grad(model, x, y, clip=1.0))


def test_logistic_model_matches() -> None:
    model, _ = build_model(ModelSpec(architecture="logistic"), input_shape=(30,), num_classes=2)
    model = model.double()
    x = torch.randn(25, 30, dtype=torch.float64) * 3
    y = torch.randint(0, 2, (25,))
    assert _relative_error(_bookkeeping_grad(model, x, y, 0.5), _opacus_hooks_grad(model, x, y, 0.5)) <= 1e-6


def test_noise_std_is_sigma_c_over_expected_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100))
    sigma, clip = 1.3, 0.5
    grads = _bookkeeping_grad(model, torch.zeros(0, 200), torch.zeros(0, dtype=torch.long), clip, sigma=sigma)
    noise = torch.cat([g.flatten() for g in grads])
    expected = sigma * clip / EXPECTED_BATCH
    assert noise.numel() == 20100
    assert abs(float(noise.std()) / expected - 1) < 0.03
    assert abs(float(noise.mean())) < 4 * expected / noise.numel() ** 0.5


def test_micro_batches_accumulate_like_one_batch() -> None:
    model = _mlp().double()
    x = torch.randn(12, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    whole = _bookkeeping_grad(model, x, y, clip=0.1)
    split = copy.deepcopy(model)
    optimizer = BookkeepingOptimizer(
        torch.optim.SGD(split.parameters(), lr=0.1),
        model=split,
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        expected_batch_size=EXPECTED_BATCH,
    )
    for part, skip in ((slice(0, 5), True), (slice(5, 12), False)):
        optimizer.signal_skip_step(do_skip=skip)
        torch.autograd.backward(nn.functional.cross_entropy(split(x[part]), y[part]))
        if optimizer.pre_step():
            break
        optimizer.zero_grad(set_to_none=True)
    assert _relative_error(_grads(split), whole) <= 1e-6


def test_supports_only_linear_models() -> None:
    def build(**spec: object) -> nn.Module:
        shape = (1, 8, 8) if spec.get("architecture") == "cnn" else (30,)
        return build_model(ModelSpec(**spec), input_shape=shape, num_classes=2)[0]

    assert supports_bookkeeping(build(architecture="logistic"))
    assert supports_bookkeeping(build(architecture="mlp", hiddenSizes=[16, 8], activation="tanh"))
    assert not supports_bookkeeping(build(architecture="cnn", channels=[4]))
    assert not supports_bookkeeping(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
    assert not supports_bookkeeping(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    frozen = nn.Sequential(nn.Linear(4, 2))
    frozen[0].bias.requires_grad_(False)
    assert not supports_bookkeeping(frozen)
    assert not supports_bookkeeping(nn.Sequential(nn.ReLU()))


def test_refuses_a_layer_used_twice() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    optimizer = BookkeepingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    torch.autograd.backward(nn.functional.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 2])))
    with pytest.raises(RuntimeError, match="exactly one forward"):
        optimizer.pre_step()


# --- through the engine ---------------------------------------------------------------------------------


def _engine_private(mode: str | None, *, physical: int = 64) -> Any:
    from dptrain.dpsgd import make_private_training

    torch.manual_seed(3)
    model = _mlp().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return make_private_training(
        model,
        optimizer,
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=EXPECTED_BATCH,
        physical_batch_size=physical,
        noise_generator=None,
        clipping_mode=mode,
    )


def test_engine_picks_bookkeeping_for_linear_models_and_matches_hooks() -> None:
    x = torch.randn(30, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    results = {}
    for mode in (None, "hooks"):
        private = _engine_private(mode)
        assert private.clipping_mode == (mode or "bookkeeping")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.autograd.backward(private.criterion(private.model(x), y))
        private.optimizer.step()
        assert private.steps_taken == [1]
        results[private.clipping_mode] = [p.detach().clone() for p in private.model.parameters()]
    assert _relative_error(results["bookkeeping"], results["hooks"]) <= 1e-6


def test_engine_bookkeeping_splits_logical_batches_into_physical_ones() -> None:
    x = torch.randn(30, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    whole, split = _engine_private(None), _engine_private(None, physical=4)
    for private in (whole, split):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private.step(x, y)  # 8 micro-batches of at most 4, one noisy step
        assert private.steps_taken[0] == 1
    parameters = [[p.detach().clone() for p in private.model.parameters()] for private in (whole, split)]
    assert _relative_error(parameters[0], parameters[1]) <= 1e-9
