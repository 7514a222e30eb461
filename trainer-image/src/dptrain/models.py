"""Models: the built-in architectures, custom factories, Opacus compatibility and pretrained weights.

The built-in architectures use only layers that both Opacus modes handle (`hooks` and `ghost`):
Linear, Conv2d, activations, pooling and Flatten. Nothing normalises across the batch, because
a layer that mixes examples breaks the per-example sensitivity that DP-SGD's guarantee rests on.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch import nn

from dptrain.errors import ModelError
from dptrain.independence import check_per_example_independence
from dptrain_api.job import ModelSpec

__all__ = [
    "ModelBuilder",
    "build_model",
    "register_model",
    "registered_models",
    "state_problems",
    "supports_ghost_clipping",
]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[[ModelSpec, tuple[int, ...], int], nn.Module]
"""Builds a model from (spec, input_shape, num_classes); input_shape excludes the batch dimension."""

_REGISTRY: dict[str, ModelBuilder] = {}
_FACTORY_ARGUMENTS = ("num_features", "num_classes", "input_shape")
_MAX_LISTED = 10  # keys listed in a weights error; the rest are counted


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under ``model.architecture == name``."""
    if name == "custom":
        raise ValueError("'custom' is reserved for model.factory")

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model architecture {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def registered_models() -> tuple[str, ...]:
    """Names of the registered architectures (custom factories aside)."""
    return tuple(sorted(_REGISTRY))


def _activation(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    raise ModelError(f"unknown activation {name!r}; use tanh or relu")


@register_model("logistic")
def _build_logistic(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # num_classes outputs even for binary labels: one cross-entropy loss for every architecture.
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model("mlp")
def _build_mlp(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in spec.hidden_sizes:
        layers += [nn.Linear(width, hidden), _activation(spec.activation)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn")
def _build_cnn(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(
            f"cnn needs image data such as digits (input shape channels x height x width); this dataset's input "
            f"shape is {input_shape}: use mlp for tabular data"
        )
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in spec.channels:
        layers += [nn.Conv2d(channels, out_channels, kernel_size=3, padding=1), _activation(spec.activation)]
        if min(height, width) >= 2:  # pool while there is something left to halve
            layers.append(nn.AvgPool2d(2))
            height, width = height // 2, width // 2
        channels = out_channels
    layers += [nn.Flatten(), nn.Linear(channels * height * width, num_classes)]
    return nn.Sequential(*layers)


def _build_custom(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    factory = spec.factory
    if factory is None or ":" not in factory:
        raise ModelError(f"model.factory must be 'module:function' for a custom architecture, got {factory!r}")
    module_name, _, function_name = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"model.factory {factory!r}: cannot import module {module_name!r}: {error}") from error
    except Exception as error:  # the module's own top-level code failed
        raise ModelError(
            f"model.factory {factory!r}: importing {module_name!r} raised {type(error).__name__}: {error}"
        ) from error
    function = getattr(module, function_name, None)
    if function is None:
        raise ModelError(f"model.factory {factory!r}: module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise ModelError(f"model.factory {factory!r}: {function_name!r} is a {type(function).__name__}, not callable")

    clashes = sorted(set(_FACTORY_ARGUMENTS) & set(spec.factory_args))
    if clashes:
        raise ModelError(f"model.factoryArgs must not set {clashes}: the trainer passes them from the dataset")
    arguments: dict[str, object] = {"num_features": math.prod(input_shape), "num_classes": num_classes}
    # The API documents factories as f(num_features, num_classes, **factoryArgs); input_shape is
    # passed only to factories that can take it, so those documented signatures keep working.
    if _accepts_keyword(function, "input_shape"):
        arguments["input_shape"] = input_shape
    try:
        model = function(**arguments, **spec.factory_args)
    except Exception as error:
        raise ModelError(f"model.factory {factory!r} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory {factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _accepts_keyword(function: Callable[..., object], name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass it and let the call decide
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        for p in parameters
    )


def _make_private_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Let Opacus replace layers DP-SGD cannot train (BatchNorm → GroupNorm, LSTM → DPLSTM, …)."""
    from opacus.validators import ModuleValidator

    warnings: list[str] = []
    if ModuleValidator.validate(model, strict=False):
        before = {name: type(module) for name, module in model.named_modules()}
        try:
            model = ModuleValidator.fix(model)
        except Exception as error:
            raise ModelError(
                f"Opacus could not make the model DP-compatible: {type(error).__name__}: {error}"
            ) from error
        changes = [
            f"{name or '(root)'}: {before[name].__name__} -> {type(module).__name__}"
            for name, module in model.named_modules()
            if name in before and before[name] is not type(module)
        ]
        if changes:
            message = (
                "replaced layers that DP-SGD cannot train (they mix examples within a batch or lack per-example "
                f"gradients): {'; '.join(changes)}. Pretrained statistics of replaced layers are not kept."
            )
            logger.warning(message)
            warnings.append(message)
        remaining = ModuleValidator.validate(model, strict=False)
        if remaining:
            problems = "; ".join(str(problem) for problem in remaining)
            raise ModelError(f"the model cannot be trained with DP-SGD (Opacus): {problems}")
    # Opacus only validates trainable modules, but a frozen BatchNorm in training mode still
    # normalises with batch statistics, which makes one example's gradient depend on the others.
    frozen_batch_norms = [
        name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if frozen_batch_norms:
        raise ModelError(
            f"the model has BatchNorm layers {frozen_batch_norms}: they mix examples within a batch, which DP-SGD "
            "does not allow; use GroupNorm or LayerNorm"
        )
    return model, warnings


def _weights_path(reference: str, base_dir: Path | None) -> Path:
    if "://" in reference:
        parsed = urlparse(reference)
        if parsed.scheme != "file":
            raise ModelError(
                f"model.pretrainedWeights {reference!r}: only local paths and file:// URIs are supported, "
                f"not {parsed.scheme}://"
            )
        if parsed.netloc not in ("", "localhost"):
            raise ModelError(f"model.pretrainedWeights {reference!r}: file:// URIs must name a local file")
        path = Path(url2pathname(parsed.path))
    else:
        path = Path(reference)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown if len(keys) <= _MAX_LISTED else f"{shown} and {len(keys) - _MAX_LISTED} more"


def _load_pretrained(model: nn.Module, reference: str, base_dir: Path | None) -> None:
    path = _weights_path(reference, base_dir)
    if not path.is_file():
        raise ModelError(f"model.pretrainedWeights: file {path} not found")
    try:
        # weights_only: a weights file must never be able to run code when it is read.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"model.pretrainedWeights {path}: refused, it holds objects other than tensors (torch.load with "
            f"weights_only=True; save model.state_dict() instead): {error}"
        ) from error
    except Exception as error:
        raise ModelError(f"model.pretrainedWeights {path}: cannot read: {type(error).__name__}: {error}") from error
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ModelError(
            f"model.pretrainedWeights {path}: expected a state_dict (parameter names to tensors), "
            f"got a {type(loaded).__name__}; save model.state_dict(), not a checkpoint"
        )
    state: dict[str, torch.Tensor] = dict(loaded)
    prefix = "_module."  # weights saved from an Opacus-wrapped model
    if state and all(key.startswith(prefix) for key in state):
        state = {key.removeprefix(prefix): value for key, value in state.items()}

    problems = state_problems(state, model.state_dict())
    if problems:
        raise ModelError(f"model.pretrainedWeights {path} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def state_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``state`` (weights from outside: pretrained, a coordinator's global model) cannot be loaded into a model
    whose state dict is ``expected``: missing, unexpected or mis-shaped keys, non-tensors, and non-finite values
    (a NaN or inf weight would make every example's gradient non-finite). Names only, never values."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    foreign = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    present = [key for key in expected if key in state and key not in foreign]
    mismatched = sorted(key for key in present if state[key].shape != expected[key].shape)
    non_finite = sorted(
        key for key in present if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all())
    )
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if foreign:
        problems.append(f"not tensors: {_listed(foreign)}")
    if mismatched:
        shapes = [f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}" for key in mismatched]
        problems.append(f"shape mismatches: {_listed(shapes)}")
    if non_finite:
        problems.append(f"non-finite values (NaN or inf) in: {_listed(non_finite)}")
    return problems


def _check_output(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """One forward pass on zeros, so a wrong factory fails here with a clear message, not mid-training."""
    probe = torch.zeros((2, *input_shape), dtype=torch.float32)
    # fork_rng: dropout in the probe must not shift the seeded RNG that training relies on.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            output = model(probe)
        except Exception as error:
            raise ModelError(
                f"the model's forward pass failed on input of shape {tuple(probe.shape)}: "
                f"{type(error).__name__}: {error}"
            ) from error
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(f"the model must map input {tuple(probe.shape)} to logits (2, {num_classes}), got {got}")


def build_model(
    spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int, base_dir: Path | None = None
) -> tuple[nn.Module, list[str]]:
    """Build the model (in training mode), make it Opacus-compatible, load pretrained weights, and refuse it
    when examples of a batch influence each other (:mod:`dptrain.independence`).

    Returns the model and human-readable warnings (layers Opacus replaced). ``base_dir`` resolves a
    relative ``pretrainedWeights`` path (the manifest's folder); the working directory otherwise.
    """
    input_shape = tuple(int(size) for size in input_shape)
    if not input_shape or any(size < 1 for size in input_shape):
        raise ModelError(f"input shape must be non-empty and positive, got {input_shape}")
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}")

    if spec.architecture == "custom":
        model = _build_custom(spec, input_shape, num_classes)
    else:
        builder = _REGISTRY.get(spec.architecture)
        if builder is None:
            known = ", ".join([*registered_models(), "custom"])
            raise ModelError(f"unknown model architecture {spec.architecture!r}; choose one of: {known}")
        model = builder(spec, input_shape, num_classes)
    model.train()  # Opacus refuses models in eval mode; a factory may hand one back
    model, warnings = _make_private_compatible(model)
    if spec.pretrained_weights is not None:
        _load_pretrained(model, spec.pretrained_weights, base_dir)
    _check_output(model, input_shape, num_classes)
    check_per_example_independence(model, input_shape)
    return model, warnings


def supports_ghost_clipping(model: nn.Module) -> bool:
    """True if Opacus' ghost clipping computes every trainable parameter's per-example norm directly.

    Opacus looks up ``type(module)`` (exact type, no subclasses) in its NORM_SAMPLERS table (Linear
    and Embedding in Opacus 1.6). Other layers still work with ``grad_sample_mode="ghost"``, but
    fall back to materialising per-example gradients, which loses ghost clipping's speed.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    supported = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    trainable = False
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            trainable = True
            if type(module) not in supported:
                return False
    return trainable  # nothing to train: nothing to clip either
