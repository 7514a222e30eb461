"""PrivateOptimizer: one flat noise draw of std σC/B, empty batches, micro-batches, delegation, distributed."""

from __future__ import annotations

import copy
import os
import socket
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from dptrain.clipping import PrivateOptimizer, make_private
from dptrain.errors import ClippingError, ClippingProtocolError
from dptrain.randomness import GeneratorBits, standard_normal
from tests.support.clipping import max_relative_error, reference_update

CE = nn.CrossEntropyLoss()


def _mlp(seed: int = 0, width: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3)).double()


def _private(model: nn.Module, *, sigma: float = 0.0, clip: float = 0.5, expected: float = 8.0, **kw: Any) -> Any:
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected,
        clipping=kw.pop("clipping", "bookkeeping"),
        **kw,
    )


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("secure", [False, True])
def test_noise_is_one_flat_draw_with_std_sigma_c_over_b(secure: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100), nn.Tanh(), nn.Linear(100, 50)).double()
    sigma, clip, expected = 1.3, 0.5, 16.0
    generator = None if secure else torch.Generator().manual_seed(7)
    _, optimizer, _ = _private(
        model, sigma=sigma, clip=clip, expected=expected, generator=generator, secure_noise=secure
    )
    assert optimizer.noise_bits.cryptographic is secure
    optimizer.step()  # no micro-batch at all: a noise-only step
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
    assert noise.numel() == 20_100 + 5_050
    want = sigma * clip / expected
    assert abs(float(noise.std()) / want - 1) < 0.03
    assert abs(float(noise.mean())) < 4 * want / noise.numel() ** 0.5
    if secure:
        return  # a fresh ChaCha20 key: nothing to reproduce
    reference = standard_normal(GeneratorBits(torch.Generator().manual_seed(7)), noise.numel())  # in parameter order
    torch.testing.assert_close(noise, reference * (sigma * clip) / expected, rtol=1e-12, atol=0)


def test_noise_is_drawn_in_float64_and_rounded_once_for_float32_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Linear(300, 100)  # float32
    generator = torch.Generator().manual_seed(3)
    _, optimizer, _ = _private(model, sigma=2.0, clip=1.0, expected=1.0, generator=generator)
    optimizer.step()
    noise = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])  # type: ignore[union-attr]
    reference = standard_normal(GeneratorBits(torch.Generator().manual_seed(3)), noise.numel()) * 2.0
    assert torch.equal(noise, reference.float())  # float64 draws, one rounding
    float32_draws = torch.empty(noise.numel()).normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    assert float(float32_draws.abs().max()) <= 2.0 * 5.78  # torch's float32 sampler: capped at ±5.77σ


def test_a_seeded_generator_is_refused_for_secure_noise() -> None:
    with pytest.raises(ValueError, match="CSPRNG"):
        _private(_mlp(), sigma=1.0, generator=torch.Generator().manual_seed(1), secure_noise=True)


def test_empty_batch_takes_a_noise_free_step_at_sigma_zero() -> None:
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    _, optimizer, criterion = _private(model)
    x, y = _batch(0)
    criterion(model(x), y).backward()  # an empty Poisson batch still runs forward and backward
    optimizer.step()
    assert optimizer.steps == 1
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "ghost"])
def test_micro_batches_accumulate_like_one_batch(mode: str, explicit: bool) -> None:
    x, y = _batch(9)
    want = reference_update(_mlp(), x, y, clip=0.1, expected=8.0, criterion=CE)
    model = _mlp()
    wrapped, optimizer, criterion = _private(model, clip=0.1, clipping=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for part in (slice(0, 2), slice(2, 5), slice(5, 9)):
            criterion(wrapped(x[part]), y[part]).backward()
            if explicit:
                optimizer.accumulate()  # else: the next forward pass or step() accumulates it
    optimizer.step()
    assert max_relative_error(_grads(model), want) <= 1e-6


def test_delegates_state_and_zero_grad_to_the_wrapped_optimizer() -> None:
    model = _mlp()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    _, optimizer, criterion = make_private(
        model, inner, noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=4.0, clipping="bookkeeping"
    )
    assert optimizer.param_groups is inner.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = _batch(4)
    criterion(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.005)
    state = optimizer.state_dict()
    assert state == inner.state_dict()
    assert state["state"]
    fresh = _mlp()
    _, restored, _ = make_private(
        fresh,
        torch.optim.Adam(fresh.parameters(), lr=0.01),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        expected_batch_size=4.0,
        clipping="bookkeeping",
    )
    restored.load_state_dict(state)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_between_micro_batches_keeps_the_accumulated_sum() -> None:
    x, y = _batch(6)
    want = reference_update(_mlp(), x, y, clip=0.1, expected=8.0, criterion=CE)
    model = _mlp()
    _, optimizer, criterion = _private(model, clip=0.1)
    for part in (slice(0, 3), slice(3, 6)):
        criterion(model(x[part]), y[part]).backward()
        optimizer.accumulate()
        optimizer.zero_grad(set_to_none=False)
    optimizer.step()
    assert max_relative_error(_grads(model), want) <= 1e-6


def test_step_hooks_run_once_per_noised_step() -> None:
    model = _mlp()
    _, optimizer, criterion = _private(model)
    seen: list[int] = []
    optimizer.attach_step_hook(lambda o: seen.append(o.steps))
    for n in (3, 0, 2):
        x, y = _batch(n)
        criterion(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert seen == [1, 2, 3]


def test_optimizer_must_manage_exactly_the_trainable_parameters() -> None:
    model = _mlp()
    with pytest.raises(ClippingError, match="does not manage"):
        make_private(
            model,
            torch.optim.SGD(list(model.parameters())[:2], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
    other = nn.Linear(2, 2).double()
    model = _mlp()
    with pytest.raises(ClippingError, match="outside the model"):
        make_private(
            model,
            torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )


def test_detach_restores_requires_grad_and_removes_hooks() -> None:
    model = _mlp()
    _, optimizer, _ = _private(model)
    assert not any(p.requires_grad for p in model.parameters())  # autograd skips non-private gradients
    optimizer.clipper.detach()
    assert all(p.requires_grad for p in model.parameters())
    x, y = _batch(3)
    CE(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_backward_of_a_superseded_forward_pass_is_refused() -> None:
    model = _mlp()
    _, _, criterion = _private(model)
    x, y = _batch(4)
    first = criterion(model(x), y)
    second = criterion(model(x), y)
    with pytest.raises(ClippingProtocolError, match="earlier forward pass"):
        (first + second).backward()


# --- data parallel -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = _batch(6)
        model = _mlp(seed=rank)  # different initial weights: rank 0's are broadcast
        wrapped, optimizer, criterion = _private(model, clip=0.1, expected=8.0, distributed=True)
        part = slice(0, 4) if rank == 0 else slice(4, 6)  # ranks see different (uneven) shards
        criterion(wrapped(x[part]), y[part]).backward()
        optimizer.step()
        clipped = [g.clone() for g in _grads(model)]
        noisy = _mlp(seed=rank)
        _, noisy_optimizer, _ = _private(
            noisy, sigma=2.0, clip=0.5, expected=8.0, distributed=True, generator=torch.Generator().manual_seed(rank)
        )
        noisy_optimizer.step()  # noise only: drawn on rank 0 alone
        results[rank] = (clipped, _grads(noisy), [p.detach().clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def test_distributed_sum_with_noise_added_once() -> None:
    import torch.multiprocessing as mp

    manager = mp.get_context("fork").Manager()
    results = manager.dict()
    port = _free_port()
    processes = [mp.get_context("fork").Process(target=_rank, args=(r, 2, port, results)) for r in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert all(process.exitcode == 0 for process in processes)
    x, y = _batch(6)
    want = reference_update(_mlp(seed=0), x, y, clip=0.1, expected=8.0, criterion=CE)
    for rank in (0, 1):
        clipped, noise, params = results[rank]
        assert max_relative_error(clipped, want) <= 1e-6  # Σ over both shards ÷ the GLOBAL expected batch
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][2], strict=True))  # replicas in sync
        flat = torch.cat([n.flatten() for n in noise])
        ref = standard_normal(GeneratorBits(torch.Generator().manual_seed(0)), flat.numel())
        torch.testing.assert_close(flat, ref / 8.0, rtol=1e-12, atol=0)  # rank 0's draw only, on every rank


def test_distributed_needs_an_initialised_process_group() -> None:
    with pytest.raises(ClippingError, match="init_process_group"):
        _private(_mlp(), distributed=True)


def test_private_optimizer_can_be_built_from_a_clipper() -> None:
    from dptrain.clipping import BookkeepingClipper

    model = _mlp()
    clipper = BookkeepingClipper(model, max_grad_norm=0.1)
    optimizer = PrivateOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), clipper=clipper, noise_multiplier=0.0, expected_batch_size=8.0
    )
    x, y = _batch(5)
    CE(model(x), y).backward()
    optimizer.step()
    want = reference_update(_mlp(), x, y, clip=0.1, expected=8.0, criterion=CE)
    assert max_relative_error(_grads(model), want) <= 1e-6
    assert copy.deepcopy(optimizer.state_dict()) == optimizer.original_optimizer.state_dict()


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "ghost"])
def test_consecutive_steps_start_from_an_empty_sum(mode: str) -> None:
    """The .grad views left by one step never leak into the next logical batch (zero_grad or not)."""
    model = _mlp()
    wrapped, optimizer, criterion = _private(model, clip=0.1, clipping=mode)
    reference = _mlp()
    for seed, zero in ((1, False), (2, True), (3, False)):
        x, y = _batch(5, seed=seed)
        want = reference_update(reference, x, y, clip=0.1, expected=8.0, criterion=CE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            criterion(wrapped(x), y).backward()
        optimizer.step()
        assert max_relative_error(_grads(model), want) <= 1e-6
        reference.load_state_dict(model.state_dict())  # follow the update (lr 1)
        if zero:
            optimizer.zero_grad()
