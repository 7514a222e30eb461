"""Property: for random small module trees, book-keeping's σ = 0 update equals brute-force per-example clipping.

Trees of Linear / Conv1d / Conv2d / Embedding / LayerNorm / GroupNorm / RMSNorm / nn.MultiheadAttention
with elementwise activations, residual connections and parallel branches, on token, sequence, image
and signal inputs; batch sizes 1, 2, 3 and 5; C = the median per-example norm (some clipped, some not).
Derandomised with few examples so CI is stable and fast.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.support.clipping import max_relative_error, median_clip, private_update, reference_update

CE = nn.CrossEntropyLoss()
WIDTH, STEPS, CHANNELS, CLASSES = 4, 3, 4, 3
Spec = Any


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)  # type: ignore[no-any-return]


class Parallel(nn.Module):
    def __init__(self, left: nn.Module, right: nn.Module) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)  # type: ignore[no-any-return]


class SelfAttention(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]  # type: ignore[no-any-return]


class Net(nn.Module):
    def __init__(self, stem: nn.Module, body: nn.Module, head: nn.Module, pool: tuple[int, ...]) -> None:
        super().__init__()
        self.stem, self.body, self.head, self.pool = stem, body, head, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.stem(x))).mean(self.pool))  # type: ignore[no-any-return]


SEQUENCE_LEAVES = st.sampled_from(["linear", "layernorm", "rmsnorm", "attention1", "attention2", "tanh", "gelu"])
IMAGE_LEAVES = st.sampled_from(["conv3", "conv1", "conv-dilated", "conv-groups-reflect", "groupnorm", "relu"])


def _trees(leaves: st.SearchStrategy[str]) -> st.SearchStrategy[Spec]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            children.map(lambda c: ("residual", c)),
            st.tuples(st.just("parallel"), children, children),
            st.lists(children, min_size=1, max_size=3).map(lambda c: ("chain", *c)),
        ),
        max_leaves=5,
    )


def _leaf(name: str, dims: int) -> nn.Module:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    leaves: dict[str, Any] = {
        "linear": lambda: nn.Linear(WIDTH, WIDTH),
        "layernorm": lambda: nn.LayerNorm(WIDTH),
        "rmsnorm": lambda: nn.RMSNorm(WIDTH),
        "attention1": lambda: SelfAttention(1),
        "attention2": lambda: SelfAttention(2),
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "conv3": lambda: conv(CHANNELS, CHANNELS, 3, padding=1),
        "conv1": lambda: conv(CHANNELS, CHANNELS, 1, bias=False),
        "conv-dilated": lambda: conv(CHANNELS, CHANNELS, 3, padding=2, dilation=2),
        "conv-groups-reflect": lambda: conv(CHANNELS, CHANNELS, 3, padding="same", groups=2, padding_mode="reflect"),
        "groupnorm": lambda: nn.GroupNorm(2, CHANNELS),
        "relu": nn.ReLU,
    }
    return leaves[name]()  # type: ignore[no-any-return]


def _build(spec: Spec, dims: int) -> nn.Module:
    if isinstance(spec, str):
        return _leaf(spec, dims)
    kind, *parts = spec
    modules = [_build(part, dims) for part in parts]
    if kind == "residual":
        return Residual(modules[0])
    if kind == "parallel":
        return Parallel(modules[0], modules[1])
    return nn.Sequential(*modules)


@st.composite
def models(draw: st.DrawFn) -> tuple[nn.Module, Any, int]:
    source = draw(st.sampled_from(["tokens", "sequence", "image", "signal"]))
    batch = draw(st.sampled_from([1, 2, 3, 5]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if source in ("tokens", "sequence"):
        body = _build(draw(_trees(SEQUENCE_LEAVES)), 0)
        if source == "tokens":
            stem: nn.Module = nn.Embedding(6, WIDTH, padding_idx=draw(st.sampled_from([None, 0])))
            x: torch.Tensor = torch.randint(0, 6, (batch, STEPS))
        else:
            stem, x = nn.Linear(2, WIDTH), torch.randn(batch, STEPS, 2)
        model = Net(stem, body, nn.Linear(WIDTH, CLASSES), (1,))
    else:
        dims = 2 if source == "image" else 1
        body = _build(draw(_trees(IMAGE_LEAVES)), dims)
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        stem = conv(2, CHANNELS, 3, stride=draw(st.sampled_from([1, 2])), padding=1)
        x = torch.randn(batch, 2, *([5] * dims))
        model = Net(stem, body, nn.Linear(CHANNELS, CLASSES), tuple(range(2, 2 + dims)))
    model = model.double()
    return model, (x.double() if x.is_floating_point() else x), batch


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_random_trees_match_per_example_clipping(case: tuple[nn.Module, Any, int]) -> None:
    model, x, batch = case
    y = torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(batch))
    clip = median_clip(model, x, y, CE)
    want = reference_update(model, x, y, clip=clip, expected=6.0, criterion=CE)
    got = private_update(model, x, y, clip=clip, expected=6.0)
    assert max_relative_error(got, want) <= 1e-6
