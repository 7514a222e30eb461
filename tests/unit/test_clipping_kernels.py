"""Book-keeping kernels, layer by layer: with σ = 0 the update equals brute-force per-example clipping.

Reference: one backward per example, Opacus' clip factor min(1, C/(‖g‖+1e-6)), sum, divide by the
expected batch size (tests/support/clipping.py). C is the median per-example norm, so some examples
are clipped and some are not. float64 throughout; batch sizes 1 and 5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.support.clipping import max_relative_error, median_clip, private_update, reference_update

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

EXPECTED = 7.0
CE = nn.CrossEntropyLoss()


class Pool(nn.Module):
    """A layer, then mean over every non-batch, non-feature position, then a Linear head (3 classes)."""

    def __init__(self, layer: nn.Module, features: int, *, channels_first: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.channels_first = channels_first
        self.head = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.layer(x))
        h = h.flatten(2).mean(2) if self.channels_first else h.reshape(h.shape[0], -1, h.shape[-1]).mean(1)
        return self.head(h)  # type: ignore[no-any-return]


class Attend(nn.Module):
    """Inputs → (optional) projections → nn.MultiheadAttention with the given call options → head."""

    def __init__(self, attention: nn.MultiheadAttention, mode: str, **call: Any) -> None:
        super().__init__()
        self.attention = attention
        self.mode = mode
        self.call = call
        self.key = nn.Linear(4, attention.kdim)
        self.head = nn.Linear(attention.embed_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.attention.batch_first
        seq = x if first else x.transpose(0, 1)
        if self.mode == "self":
            q = k = v = seq
        elif self.mode == "kv":
            q, k = seq, self.key(seq[..., :4])
            v = k
        else:
            q, k, v = seq, self.key(seq[..., :4]), seq[..., : self.attention.vdim]
        out = self.attention(q, k, v, **self.call)[0]
        return self.head((out if first else out.transpose(0, 1)).mean(1))  # type: ignore[no-any-return]


def _seq(batch: int, steps: int = 4, features: int = 6) -> torch.Tensor:
    return torch.randn(batch, steps, features, dtype=torch.float64)


def _check(model: nn.Module, x: Any, batch: int, **options: Any) -> None:
    torch.manual_seed(1)
    model = model.double()
    y = torch.randint(0, 3, (batch,))
    clip = median_clip(model, x, y, CE)
    want = reference_update(model, x, y, clip=clip, expected=EXPECTED, criterion=CE)
    got = private_update(model, x, y, clip=clip, expected=EXPECTED, **options)
    assert max_relative_error(got, want) <= 1e-6


Case = Callable[[int], tuple[nn.Module, Any]]


def _conv2d(**kwargs: Any) -> Case:
    def build(batch: int) -> tuple[nn.Module, Any]:
        layer = nn.Conv2d(4, 4, **kwargs)
        return Pool(layer, 4, channels_first=True), torch.randn(batch, 4, 7, 6, dtype=torch.float64)

    return build


def _conv1d(**kwargs: Any) -> Case:
    def build(batch: int) -> tuple[nn.Module, Any]:
        layer = nn.Conv1d(4, 6, **kwargs)
        return Pool(layer, 6, channels_first=True), torch.randn(batch, 4, 11, dtype=torch.float64)

    return build


def _tokens(embedding: nn.Embedding, steps: int) -> Case:
    def build(batch: int) -> tuple[nn.Module, Any]:
        ids = torch.randint(0, 4, (batch, steps)) if steps else torch.randint(0, 4, (batch,))
        ids[0].fill_(1)  # repeated ids inside one example
        model = nn.Sequential(embedding, nn.Tanh(), nn.Linear(embedding.embedding_dim, 3))
        return (Pool(model, 3) if steps else model), ids

    return build


CASES: dict[str, Case] = {
    "linear-2d": lambda b: (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(b, 6).double()),
    "linear-no-bias": lambda b: (nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)), _seq(b)[:, 0]),
    "linear-sequence": lambda b: (Pool(nn.Linear(6, 5), 5), _seq(b)),
    "linear-4d": lambda b: (Pool(nn.Linear(6, 5), 5), torch.randn(b, 2, 3, 6, dtype=torch.float64)),
    "inplace-relu-first": lambda b: (
        nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),
        _seq(b)[:, 0],
    ),
    "conv2d-stride-pad": _conv2d(kernel_size=3, stride=2, padding=1),
    "conv2d-same-groups-reflect": _conv2d(kernel_size=3, padding="same", groups=2, padding_mode="reflect"),
    "conv2d-even-same": _conv2d(kernel_size=(2, 4), padding="same", dilation=(2, 1)),
    "conv2d-valid-dilated-nobias": _conv2d(kernel_size=2, dilation=2, padding="valid", bias=False),
    "conv2d-depthwise-circular": _conv2d(kernel_size=3, padding=1, groups=4, padding_mode="circular"),
    "conv2d-replicate-asym-stride": _conv2d(
        kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), padding_mode="replicate"
    ),
    "conv1d-dilated": _conv1d(kernel_size=3, dilation=2, padding=2, stride=2),
    "conv1d-groups": _conv1d(kernel_size=4, groups=2, padding="same"),
    "embedding-sequence": _tokens(nn.Embedding(4, 5, padding_idx=0), 6),
    "embedding-one-token": _tokens(nn.Embedding(4, 5), 0),
    "layernorm": lambda b: (Pool(nn.LayerNorm(6), 6), _seq(b)),
    "layernorm-2d-shape-no-bias": lambda b: (
        nn.Sequential(nn.LayerNorm((4, 6), bias=False), nn.Flatten(), nn.Linear(24, 3)),
        _seq(b),
    ),
    "groupnorm": lambda b: (Pool(nn.GroupNorm(2, 4), 4, channels_first=True), torch.randn(b, 4, 3, 5).double()),
    "rmsnorm": lambda b: (Pool(nn.RMSNorm(6), 6), _seq(b)),
    "rmsnorm-eps": lambda b: (Pool(nn.RMSNorm([4, 6], eps=1e-3), 6), _seq(b)),
}


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_matches_per_example_clipping(name: str, batch: int) -> None:
    torch.manual_seed(0)
    model, x = CASES[name](batch)
    _check(model, x, batch)


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
@pytest.mark.parametrize("name", ["linear-sequence", "linear-4d", "conv2d-stride-pad", "conv1d-groups"])
def test_both_norm_strategies_are_exact(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    model, x = CASES[name](5)
    _check(model, x, 5, strategy=strategy)


ATTENTION: dict[str, Callable[[], tuple[nn.MultiheadAttention, str, dict[str, Any]]]] = {
    "self-batch-first": lambda: (nn.MultiheadAttention(6, 2, batch_first=True), "self", {"need_weights": False}),
    "self-seq-first-weights": lambda: (nn.MultiheadAttention(6, 3), "self", {}),
    "self-no-bias-per-head-weights": lambda: (
        nn.MultiheadAttention(6, 2, bias=False, batch_first=True),
        "self",
        {"average_attn_weights": False},
    ),
    "self-causal-mask": lambda: (
        nn.MultiheadAttention(6, 2, batch_first=True),
        "self",
        {"attn_mask": nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64), "is_causal": True},
    ),
    "self-bool-mask": lambda: (
        nn.MultiheadAttention(6, 2, batch_first=True),
        "self",
        {"attn_mask": torch.triu(torch.ones(4, 4, dtype=torch.bool), 1), "need_weights": False},
    ),
    "cross-kv-shared": lambda: (nn.MultiheadAttention(6, 2, batch_first=True, kdim=6, vdim=6), "kv", {}),
    "cross-all-different": lambda: (nn.MultiheadAttention(6, 2, batch_first=True), "all", {}),
    "separate-kdim-vdim": lambda: (nn.MultiheadAttention(6, 2, kdim=5, vdim=3, batch_first=True), "all", {}),
}


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_matches_per_example_clipping(name: str, batch: int) -> None:
    torch.manual_seed(0)
    attention, mode, call = ATTENTION[name]()
    _check(Attend(attention, mode, **call), _seq(batch), batch)


class Padded(nn.Module):
    """Self-attention with a per-example key padding mask passed as a second input."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        out = self.attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return self.head(out.mean(1))  # type: ignore[no-any-return]


def test_attention_with_key_padding_mask_matches() -> None:
    torch.manual_seed(0)
    padding = torch.zeros(5, 4, dtype=torch.bool)
    padding[1, 2:] = True
    padding[3, 3] = True
    _check(Padded(), (_seq(5), padding), 5)


def test_transformer_encoder_layer_matches() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True, norm_first=True)
    _check(Pool(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), 6), _seq(5), 5)


def test_frozen_parameters_are_left_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    _check(model, torch.randn(5, 6, dtype=torch.float64), 5)


def test_summed_loss_matches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    summed = nn.CrossEntropyLoss(reduction="sum")
    clip = median_clip(model, x, y, summed)
    want = reference_update(model, x, y, clip=clip, expected=EXPECTED, criterion=summed)
    got = private_update(model, x, y, clip=clip, expected=EXPECTED, criterion=summed)
    assert max_relative_error(got, want) <= 1e-6


def test_nothing_clipped_gives_the_plain_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = private_update(model, x, y, clip=1e6, expected=EXPECTED)
    nn.functional.cross_entropy(model(x), y, reduction="sum").div(EXPECTED).backward()
    assert max_relative_error(got, [p.grad for p in model.parameters()]) <= 1e-9  # type: ignore[misc]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_modes_follow_the_same_contract(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    clip = median_clip(model, x, y, CE)
    want = reference_update(model, x, y, clip=clip, expected=EXPECTED, criterion=CE)
    assert max_relative_error(private_update(model, x, y, clip=clip, expected=EXPECTED, clipping=mode), want) <= 1e-6


@pytest.mark.parametrize(
    "options",
    [
        {"need_weights": True},
        {"need_weights": True, "average_attn_weights": False},
        {"need_weights": False},
        {"attn_mask": torch.triu(torch.full((4, 4), float("-inf"), dtype=torch.float64), 1)},
        {"key_padding_mask": torch.tensor([[False, False, True, True]] * 3)},
        {
            "key_padding_mask": torch.tensor([[False, False, False, True]] * 3),
            "attn_mask": torch.triu(torch.ones(4, 4, dtype=torch.bool), 1),
            "need_weights": False,
        },
        {"attn_mask": torch.triu(torch.ones(4, 4, dtype=torch.bool), 1), "is_causal": True, "need_weights": False},
        {"attn_mask": torch.zeros(6, 4, 4, dtype=torch.float64)},
    ],
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_forward_equals_pytorch(options: dict[str, Any], batch_first: bool) -> None:
    """The replaced forward returns what nn.MultiheadAttention returns, outputs and weights."""
    from dptrain.clipping import make_private

    torch.manual_seed(0)
    attention = nn.MultiheadAttention(6, 2, batch_first=batch_first).double()
    reference = nn.MultiheadAttention(6, 2, batch_first=batch_first).double()
    reference.load_state_dict(attention.state_dict())
    make_private(
        attention,
        torch.optim.SGD(attention.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=3,
        clipping="bookkeeping",
    )
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    got, got_weights = attention(x, x, x, **options)
    want, want_weights = reference(x, x, x, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if want_weights is None:
        assert got_weights is None
    else:
        torch.testing.assert_close(got_weights, want_weights, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # evaluation runs PyTorch's own forward
        torch.testing.assert_close(attention(x, x, x, **options)[0], want, rtol=1e-12, atol=1e-12)
