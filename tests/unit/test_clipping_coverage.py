"""What book-keeping refuses (and says why), run-time reuse detection, and what clipping="auto" picks."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from dptrain.clipping import choose_clipping_mode, make_private
from dptrain.errors import (
    BatchMixingLayerError,
    ClippingError,
    ClippingProtocolError,
    ModelError,
    ParameterReuseError,
    UnsupportedLayerError,
)


def _make(model: nn.Module, clipping: str = "bookkeeping") -> Any:
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        clipping=clipping,  # type: ignore[arg-type]
    )


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


@pytest.mark.parametrize("mode", ["auto", "bookkeeping", "ghost", "hooks"])
@pytest.mark.parametrize(
    "layer",
    [
        nn.BatchNorm1d(8),
        nn.SyncBatchNorm(8),
        nn.InstanceNorm1d(8, track_running_stats=True),
        nn.Embedding(8, 8, scale_grad_by_freq=True),
        nn.Embedding(8, 8, max_norm=1.0),
    ],
)
def test_batch_mixing_layers_are_refused_in_every_mode(layer: nn.Module, mode: str) -> None:
    first = nn.Embedding(4, 8) if isinstance(layer, nn.Embedding) else nn.Linear(4, 8)
    model = nn.Sequential(first, nn.Sequential(layer), nn.Linear(8, 2))
    with pytest.raises(BatchMixingLayerError, match=r"^1\.0: ") as error:
        _make(model, mode)
    assert error.value.module == "1.0"
    assert isinstance(error.value, ModelError)


@pytest.mark.parametrize(
    ("model", "module", "why"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), "1", "no book-keeping kernel for LSTM"),
        (nn.Sequential(nn.Conv3d(1, 2, 1)), "0", "no book-keeping kernel for Conv3d"),
        (nn.Sequential(nn.ConvTranspose2d(1, 2, 1)), "0", "no book-keeping kernel for ConvTranspose2d"),
        (Scaled(), "", "no book-keeping kernel for Scaled"),
        (nn.Sequential(nn.Embedding(5, 4, sparse=True)), "0", "sparse"),
        (nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True)), "0", "add_bias_kv"),
        (nn.Sequential(nn.MultiheadAttention(4, 2, add_zero_attn=True)), "0", "add_zero_attn"),
        (nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8)), "0", "batch_first=False"),
    ],
)
def test_uncovered_layers_are_named(model: nn.Module, module: str, why: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=why) as error:
        _make(model)
    assert error.value.module == module
    assert choose_clipping_mode(model).mode in ("ghost", "hooks")
    assert why in choose_clipping_mode(model).reason


def test_subclasses_are_not_covered() -> None:
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(UnsupportedLayerError, match="MyLinear"):
        _make(nn.Sequential(MyLinear(3, 2)))


def test_opacus_dp_attention_is_refused() -> None:
    from opacus.layers import DPMultiheadAttention

    model = nn.Sequential(DPMultiheadAttention(4, 2))
    with pytest.raises(UnsupportedLayerError, match="DPMultiheadAttention"):
        _make(model)


def test_tied_weights_are_refused() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(ids).mean(1))  # type: ignore[no-any-return]

    with pytest.raises(ParameterReuseError, match="tied"):
        _make(Tied())
    assert choose_clipping_mode(Tied()).mode == "hooks"  # ghost sums tied norms as if independent


def test_a_layer_applied_twice_is_refused_at_run_time() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    _, _, _criterion = _make(model)
    with pytest.raises(ParameterReuseError, match="ran twice"):
        model(torch.randn(3, 4))


def test_a_parameter_used_outside_its_layer_is_refused() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed(ids).mean(1) @ self.embed.weight.t()  # tied output projection, in forward code

    model = Functional()
    _make(model)
    with pytest.raises(ParameterReuseError, match="outside that layer"):
        model(torch.randint(0, 5, (3, 2)))


def test_a_layer_that_does_not_see_the_batch_first_is_refused() -> None:
    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.reshape(-1, 4)).reshape(x.shape[0], -1)  # (B·T, d): rows are not examples

    model = Flattening()
    _make(model)
    with pytest.raises(ClippingProtocolError, match="batch dimension"):
        model(torch.randn(3, 5, 4))


def test_no_trainable_parameters() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        choose_clipping_mode(model)
    with pytest.raises(ModelError, match="no trainable parameters"):
        _make(model)


def test_bad_arguments() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="clipping must be"):
        _make(model, "fast")
    with pytest.raises(ValueError, match="reduction"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            criterion=nn.CrossEntropyLoss(reduction="none"),
        )
    for numbers in ({"max_grad_norm": 0.0}, {"noise_multiplier": -1.0}, {"expected_batch_size": 0}):
        arguments: dict[str, Any] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4}
        with pytest.raises(ValueError, match=next(iter(numbers))):
            make_private(
                nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), **{**arguments, **numbers}
            )


def test_auto_picks_bookkeeping_when_covered_and_says_why() -> None:
    encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.Sequential(nn.Embedding(10, 8), encoder, nn.GroupNorm(1, 10), nn.Conv1d(10, 2, 3), nn.RMSNorm(6))
    choice = choose_clipping_mode(model)
    assert choice.mode == "bookkeeping"
    assert "Embedding ×1" in choice.reason
    assert "MultiheadAttention ×1" in choice.reason
    _, optimizer, _ = _make(model, "auto")
    assert optimizer.clipping_mode == "bookkeeping"


def test_auto_falls_back_to_ghost_then_hooks() -> None:
    class Linears(nn.Module):
        """Linear layers only, but one runs through a subclass book-keeping will not trust."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))  # type: ignore[no-any-return]

    assert choose_clipping_mode(Linears()).mode == "hooks"  # Opacus' norm samplers are exact types too
    hooks = choose_clipping_mode(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)))
    assert hooks.mode == "hooks"
    assert "LSTM" in hooks.reason
    ghost = choose_clipping_mode(nn.Sequential(nn.Embedding(5, 4, sparse=True), nn.Linear(4, 2)))
    assert ghost.mode == "ghost"
    assert "sparse" in ghost.reason
    assert "Opacus ghost clipping covers every layer" in ghost.reason


def test_errors_share_the_trainer_tree() -> None:
    for error in (UnsupportedLayerError, BatchMixingLayerError, ParameterReuseError, ClippingProtocolError):
        assert issubclass(error, ClippingError)
        assert issubclass(error, ModelError)
        assert error.exit_code == ModelError.exit_code


def test_import_dptrain_stays_cheap() -> None:
    code = "import sys, dptrain; assert 'torch' not in sys.modules; assert callable(dptrain.make_private)"
    subprocess.run([sys.executable, "-c", code], check=True)
