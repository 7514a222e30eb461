"""Per-example independence: DP-SGD's sensitivity bound holds only if each example's gradient depends on that
example alone. A layer that mixes the examples of a batch (BatchNorm in training mode, a custom
``x - x.mean(0)``, attention over the batch dimension) lets one record change every other record's gradient,
and the printed ε would no longer bound anything. Such models are refused before anything is charged.

The check is a test, not a proof: known mixing layers are refused by type, and the model is probed on a random
batch (in evaluation mode and in training mode with dropout held off): every example's output computed in the
batch must equal its output computed alone. Forward hooks name the first layer where they part.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Final

import torch
from torch import nn

from dptrain.errors import ModelError

__all__ = ["BatchDependenceError", "check_per_example_independence", "reused_modules"]

_PROBE_BATCH: Final = 5
_TOLERANCE: Final = 1e-7  # float64: batched and single evaluations agree to ~1e-15
_MIXING_TYPES: Final = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


class BatchDependenceError(ModelError):
    """The model's output for one example depends on the other examples of its batch."""


@contextlib.contextmanager
def _recording(model: nn.Module, record: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    def hook(name: str):  # type: ignore[no-untyped-def]
        def save(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                record.setdefault(name, []).append(output.detach())

        return save

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_mixing_layer(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The first layer (in call order) whose batched output differs from its per-example outputs; "(output)"
    when only the model's own forward mixes; None when nothing does."""
    batched: dict[str, list[torch.Tensor]] = {}
    with _recording(model, batched), torch.no_grad():
        whole = model(probe)
    singles: list[dict[str, list[torch.Tensor]]] = []
    outputs = []
    for index in range(len(probe)):
        record: dict[str, list[torch.Tensor]] = {}
        with _recording(model, record), torch.no_grad():
            outputs.append(model(probe[index : index + 1]))
        singles.append(record)
    for name, tensors in batched.items():
        for call, tensor in enumerate(tensors):
            if tensor.dim() == 0 or tensor.shape[0] != len(probe):
                continue
            for index, record in enumerate(singles):
                single = record.get(name, [])
                if call >= len(single) or not torch.allclose(tensor[index : index + 1], single[call], atol=_TOLERANCE):
                    return name
    if not all(torch.allclose(whole[i : i + 1], out, atol=_TOLERANCE) for i, out in enumerate(outputs)):
        return "(output)"
    return None


def check_per_example_independence(model: nn.Module, input_shape: tuple[int, ...], *, integer_inputs: int = 0) -> None:
    """Raise :class:`BatchDependenceError` naming the layer when examples of a batch influence each other.

    ``integer_inputs`` > 0 probes with token ids in [0, integer_inputs) instead of real-valued features.
    """
    for name, module in model.named_modules():
        if isinstance(module, _MIXING_TYPES):
            raise BatchDependenceError(
                f"layer {name or '(root)'} ({type(module).__name__}) normalises with statistics of the whole batch, so "
                "one record changes every other record's gradient; use GroupNorm or LayerNorm"
            )
    try:
        probe_model = copy.deepcopy(model).double()
    except Exception:  # an unusual module that cannot be copied: probe in place, in its own precision
        probe_model = model
    generator = torch.Generator().manual_seed(0)
    if integer_inputs:
        probe = torch.randint(0, integer_inputs, (_PROBE_BATCH, *input_shape), generator=generator)
    else:
        probe = torch.rand((_PROBE_BATCH, *input_shape), generator=generator, dtype=torch.float64)
        probe = probe.to(next(probe_model.parameters(), torch.empty(0, dtype=torch.float64)).dtype)
    was_training = probe_model.training
    try:
        for training in (False, True):
            probe_model.train(training)
            for module in probe_model.modules():  # dropout is random per example, not mixing: hold it off
                if isinstance(module, nn.modules.dropout._DropoutNd):
                    module.eval()
            with torch.random.fork_rng(devices=[]):
                try:
                    layer = _first_mixing_layer(probe_model, probe)
                except (RuntimeError, ValueError) as error:  # Poisson batches (and micro-batches) can hold one example
                    raise ModelError(
                        f"the model cannot process a batch of one example: {type(error).__name__}: {error}"
                    ) from error
            if layer is not None:
                mode = "training" if training else "evaluation"
                raise BatchDependenceError(
                    f"the model's output for one example depends on the other examples of its batch (in {mode} "
                    f"mode), first at layer {layer}: one record would change every other record's gradient, which "
                    "voids the privacy guarantee; remove the mixing (or randomness) from that layer"
                )
    finally:
        probe_model.train(was_training)


def reused_modules(model: nn.Module, input_shape: tuple[int, ...], *, integer_inputs: int = 0) -> list[str]:
    """Modules called more than once per forward pass, or holding a parameter another module also holds (tied
    weights): Opacus' ghost clipping refuses both, its hooks mode handles them."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    tied = sorted({name for names in owners.values() if len(names) > 1 for name in names})
    calls: dict[str, list[torch.Tensor]] = {}
    shape = (2, *input_shape)
    probe = torch.zeros(shape, dtype=torch.long) if integer_inputs else torch.zeros(shape)
    with _recording(model, calls), torch.no_grad(), torch.random.fork_rng(devices=[]):
        model(probe.to(next(model.parameters()).device))
    return sorted(set(tied) | {name for name, outputs in calls.items() if len(outputs) > 1})
