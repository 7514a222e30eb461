"""dptrain.models: architectures, custom factories, Opacus fixes, pretrained weights, ghost clipping."""

from __future__ import annotations

import logging
import pickle
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dptrain.data import BUILTIN_DATASETS
from dptrain.errors import ModelError
from dptrain.independence import BatchDependenceError
from dptrain.models import build_model, register_model, registered_models, supports_ghost_clipping
from dptrain_api.job import ModelSpec

IMAGE = BUILTIN_DATASETS["digits"]
TABULAR = BUILTIN_DATASETS["breast-cancer"]

# (architecture, dataset) pairs where the architecture applies.
APPLICABLE = [
    (architecture, dataset)
    for architecture in ("logistic", "mlp", "cnn")
    for dataset in BUILTIN_DATASETS
    if architecture != "cnn" or len(BUILTIN_DATASETS[dataset].input_shape) == 3
]


def _build(spec: ModelSpec, dataset: str = "breast-cancer", **kwargs: Any) -> tuple[nn.Module, list[str]]:
    info = BUILTIN_DATASETS[dataset]
    return build_model(spec, input_shape=info.input_shape, num_classes=info.num_classes, **kwargs)


def _write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


# --- built-in architectures ----------------------------------------------------------------------


def test_registered_architectures() -> None:
    assert registered_models() == ("cnn", "logistic", "mlp")


@pytest.mark.parametrize(("architecture", "dataset"), APPLICABLE)
def test_architecture_forward_shape(architecture: str, dataset: str) -> None:
    info = BUILTIN_DATASETS[dataset]
    model, notes = _build(ModelSpec(architecture=architecture), dataset)
    assert notes == []
    assert model.training
    output = model(torch.rand(5, *info.input_shape))
    assert tuple(output.shape) == (5, info.num_classes)


def test_logistic_is_one_linear_layer() -> None:
    model, _ = _build(ModelSpec(architecture="logistic"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert (linears[0].in_features, linears[0].out_features) == (30, 2)


def test_mlp_follows_hidden_sizes_and_activation() -> None:
    model, _ = _build(ModelSpec(architecture="mlp", hidden_sizes=[16, 8], activation="relu"))
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(30, 16), (16, 8), (8, 2)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())


def test_cnn_layers_are_dp_friendly() -> None:
    model, _ = _build(ModelSpec(architecture="cnn", channels=[4, 8, 8, 8]), "digits")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8), (8, 8), (8, 8)]
    # 8x8 halves three times to 1x1; the fourth block has nothing left to pool.
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert tuple(model(torch.rand(3, 1, 8, 8)).shape) == (3, 10)


@pytest.mark.parametrize("dataset", ["flchain", "breast-cancer"])
def test_cnn_refuses_tabular_data(dataset: str) -> None:
    with pytest.raises(ModelError, match=r"cnn needs image data such as digits.*use mlp for tabular data"):
        _build(ModelSpec(architecture="cnn"), dataset)


def test_register_model_refuses_duplicates_and_custom() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda spec, shape, classes: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="reserved"):
        register_model("custom")


@pytest.mark.parametrize(("architecture", "dataset"), APPLICABLE)
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_architectures_train_under_opacus(architecture: str, dataset: str, mode: str) -> None:
    from opacus import PrivacyEngine

    info = BUILTIN_DATASETS[dataset]
    torch.manual_seed(0)
    model, _ = _build(ModelSpec(architecture=architecture, hidden_sizes=[8], channels=[4]), dataset)
    before = [p.detach().clone() for p in model.parameters()]
    features = torch.rand(16, *info.input_shape)
    labels = torch.randint(0, info.num_classes, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that secure RNG is off; the trainer handles that
        engine = PrivacyEngine()
        if mode == "ghost":
            model, optimizer, criterion, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=0.5,
                max_grad_norm=1.0,
                criterion=criterion,
                grad_sample_mode="ghost",
            )
        else:
            model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=0.5,
                max_grad_norm=1.0,
                grad_sample_mode="hooks",
            )
        steps = 0
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            steps += 1
    assert steps >= 1
    after = list(model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


# --- ghost clipping ------------------------------------------------------------------------------


def test_supports_ghost_clipping() -> None:
    assert supports_ghost_clipping(_build(ModelSpec(architecture="logistic"))[0])
    assert supports_ghost_clipping(_build(ModelSpec(architecture="mlp"))[0])
    # Conv2d has no ghost norm sampler: Opacus falls back to per-example gradients for it.
    assert not supports_ghost_clipping(_build(ModelSpec(architecture="cnn"), "digits")[0])
    assert supports_ghost_clipping(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)))
    assert not supports_ghost_clipping(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


def test_supports_ghost_clipping_ignores_frozen_layers_and_subclasses() -> None:
    conv = nn.Conv2d(1, 2, 3)
    conv.requires_grad_(False)
    assert supports_ghost_clipping(nn.Sequential(conv, nn.Flatten(), nn.Linear(72, 2)))

    class MyLinear(nn.Linear):
        pass

    # Opacus matches the exact type, so a subclass is not ghost-clipped.
    assert not supports_ghost_clipping(nn.Sequential(MyLinear(3, 2)))
    frozen = nn.Linear(3, 2)
    frozen.requires_grad_(False)
    assert not supports_ghost_clipping(frozen)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))  # owned by a module Opacus has no sampler for

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale

    assert not supports_ghost_clipping(Scaled())


# --- custom factories ----------------------------------------------------------------------------

FACTORIES = """
import torch
from torch import nn

def with_shape(num_features, num_classes, input_shape, hidden=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

def documented(num_features, num_classes):
    return nn.Linear(num_features, num_classes)

def with_kwargs(**kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(kwargs["num_features"], kwargs["num_classes"]))

def batch_norm(num_features, num_classes):
    return nn.Sequential(nn.Linear(num_features, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, num_classes))

def image_batch_norm(num_features, num_classes):
    return nn.Sequential(nn.Unflatten(1, (1, 5, 6)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                         nn.Flatten(), nn.Linear(120, num_classes))

class BatchCenter(nn.Module):
    def forward(self, x):
        return x - x.mean(0)

def batch_center(num_features, num_classes):
    return nn.Sequential(nn.Linear(num_features, 8), BatchCenter(), nn.Linear(8, num_classes))

def not_a_module(num_features, num_classes):
    return {"weights": [1, 2, 3]}

def broken(num_features, num_classes):
    raise ValueError("hidden must be positive")

def wrong_output(num_features, num_classes):
    return nn.Linear(num_features, num_classes + 1)

def evaluating(num_features, num_classes):
    return nn.Linear(num_features, num_classes).eval()

def frozen_batch_norm(num_features, num_classes):
    norm = nn.BatchNorm1d(num_features)
    norm.requires_grad_(False)
    return nn.Sequential(norm, nn.Linear(num_features, num_classes))

NOT_CALLABLE = 3
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # A module name per test, so sys.modules never serves another test's copy.
    name = f"factories_{tmp_path.name.replace('-', '_')}"
    _write_module(tmp_path, name, FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _custom(factory: str, **factory_args: Any) -> ModelSpec:
    return ModelSpec(architecture="custom", factory=factory, factory_args=factory_args)


def test_custom_factory_gets_shape_and_args(factories: str) -> None:
    model, notes = _build(_custom(f"{factories}:with_shape", hidden=6), "digits")
    assert notes == []
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [6, 10]
    assert tuple(model(torch.rand(2, 1, 8, 8)).shape) == (2, 10)


def test_custom_factory_with_the_documented_signature(factories: str) -> None:
    # The API documents f(num_features, num_classes, **factoryArgs): input_shape must not break it.
    model, _ = _build(_custom(f"{factories}:documented"))
    assert isinstance(model, nn.Linear)
    assert (model.in_features, model.out_features) == (30, 2)
    model, _ = _build(_custom(f"{factories}:with_kwargs"), "digits")
    assert tuple(model(torch.rand(2, 1, 8, 8)).shape) == (2, 10)


def test_custom_factory_in_eval_mode_is_put_in_training_mode(factories: str) -> None:
    model, _ = _build(_custom(f"{factories}:evaluating"))
    assert model.training


@pytest.mark.parametrize(
    ("factory", "args", "expected"),
    [
        ("no_such_module_dptrain:make", {}, "cannot import module 'no_such_module_dptrain'"),
        ("{m}:missing", {}, "has no attribute 'missing'"),
        ("{m}:NOT_CALLABLE", {}, "not callable"),
        ("{m}:not_a_module", {}, "returned a dict, not a torch.nn.Module"),
        ("{m}:broken", {}, "raised ValueError: hidden must be positive"),
        ("{m}:documented", {"bias": False}, "raised TypeError"),
        ("{m}:documented", {"num_classes": 3}, "must not set ['num_classes']"),
        ("{m}:wrong_output", {}, "logits (2, 2), got (2, 3)"),
        ("{m}:frozen_batch_norm", {}, "BatchNorm"),
    ],
)
def test_bad_custom_factory(factories: str, factory: str, args: dict[str, Any], expected: str) -> None:
    with pytest.raises(ModelError) as caught:
        _build(_custom(factory.format(m=factories), **args))
    assert expected in str(caught.value)
    assert caught.value.exit_code == 4


def test_factory_module_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "exploding_factory_module", "raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="importing 'exploding_factory_module' raised RuntimeError: needs a GPU"):
        _build(_custom("exploding_factory_module:make"))


def test_batch_norm_is_replaced_with_a_warning(factories: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dptrain.models"):
        model, notes = _build(_custom(f"{factories}:image_batch_norm"))
    assert len(notes) == 1
    assert "BatchNorm2d -> GroupNorm" in notes[0]
    assert "2:" in notes[0]  # names the layer
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert any("BatchNorm2d -> GroupNorm" in record.getMessage() for record in caplog.records)
    assert tuple(model(torch.rand(4, 30)).shape) == (4, 2)


def test_a_model_that_cannot_take_one_example_is_refused(factories: str) -> None:
    # BatchNorm1d(8) becomes GroupNorm with one value per group, which fails on a batch of one: Poisson
    # batches can hold a single example, so this would crash in the middle of training.
    with pytest.raises(ModelError, match="batch of one example"):
        _build(_custom(f"{factories}:batch_norm"))


def test_a_custom_layer_that_mixes_examples_is_refused_by_name(factories: str) -> None:
    """The guarantee's hole 3: one record changing every record's gradient. Caught before anything is charged."""
    with pytest.raises(BatchDependenceError, match="first at layer 1") as caught:
        _build(_custom(f"{factories}:batch_center"))
    assert caught.value.exit_code == 4


# --- pretrained weights --------------------------------------------------------------------------


def test_pretrained_weights_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec(architecture="mlp", hidden_sizes=[5])
    torch.manual_seed(1)
    source, _ = _build(spec)
    torch.save(source.state_dict(), tmp_path / "public.pt")
    torch.manual_seed(2)
    fresh, _ = _build(spec)
    assert not torch.equal(fresh[1].weight, source[1].weight)

    for reference, base_dir in [
        (str(tmp_path / "public.pt"), None),
        ((tmp_path / "public.pt").as_uri(), None),
        ("public.pt", tmp_path),
    ]:
        spec_with_weights = ModelSpec(architecture="mlp", hidden_sizes=[5], pretrained_weights=reference)
        loaded, _ = _build(spec_with_weights, base_dir=base_dir)
        for (name, expected), actual in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(expected, actual), name


def test_pretrained_weights_saved_from_an_opacus_model(tmp_path: Path) -> None:
    source, _ = _build(ModelSpec(architecture="logistic"))
    torch.save({f"_module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "wrapped.pt")
    loaded, _ = _build(ModelSpec(architecture="logistic", pretrained_weights=str(tmp_path / "wrapped.pt")))
    assert torch.equal(loaded[1].weight, source[1].weight)


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    other, _ = _build(ModelSpec(architecture="mlp", hidden_sizes=[7]))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    spec = ModelSpec(architecture="mlp", hidden_sizes=[5], pretrained_weights=str(tmp_path / "other.pt"))
    with pytest.raises(ModelError) as caught:
        _build(spec)
    message = str(caught.value)
    assert "shape mismatches" in message
    assert "1.weight (7, 30) vs model (5, 30)" in message
    assert "3.weight (2, 7) vs model (2, 5)" in message

    logistic, _ = _build(ModelSpec(architecture="logistic"))
    torch.save(logistic.state_dict(), tmp_path / "logistic.pt")
    spec = ModelSpec(architecture="mlp", hidden_sizes=[5], pretrained_weights=str(tmp_path / "logistic.pt"))
    with pytest.raises(ModelError) as caught:
        _build(spec)
    assert "missing keys: 3.bias, 3.weight" in str(caught.value)
    assert "1.weight (2, 30) vs model (5, 30)" in str(caught.value)


def test_missing_weights_file(tmp_path: Path) -> None:
    spec = ModelSpec(architecture="logistic", pretrained_weights=str(tmp_path / "absent.pt"))
    with pytest.raises(ModelError, match=r"absent\.pt not found"):
        _build(spec)


def test_remote_weights_are_refused() -> None:
    spec = ModelSpec(architecture="logistic", pretrained_weights="https://example.com/weights.pt")
    with pytest.raises(ModelError, match="only local paths and file:// URIs"):
        _build(spec)


class _Payload:
    """Unpickling this would create a marker file: proof that a weights file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"0.weight": torch.zeros(1), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    with (tmp_path / "plain.pkl").open("wb") as handle:
        pickle.dump(_Payload(marker), handle)
    for name in ("evil.pt", "plain.pkl"):
        spec = ModelSpec(architecture="logistic", pretrained_weights=str(tmp_path / name))
        with pytest.raises(ModelError, match="objects other than tensors"):
            _build(spec)
    assert not marker.exists()


def test_a_checkpoint_is_not_a_state_dict(tmp_path: Path) -> None:
    model, _ = _build(ModelSpec(architecture="logistic"))
    torch.save({"model": model.state_dict(), "step": 10}, tmp_path / "checkpoint.pt")
    spec = ModelSpec(architecture="logistic", pretrained_weights=str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ModelError, match="expected a state_dict"):
        _build(spec)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ModelError, match="at least 2"):
        build_model(ModelSpec(architecture="logistic"), input_shape=(3,), num_classes=1)
    with pytest.raises(ModelError, match="non-empty and positive"):
        build_model(ModelSpec(architecture="logistic"), input_shape=(), num_classes=2)
