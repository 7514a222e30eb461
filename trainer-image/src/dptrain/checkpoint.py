"""Atomic checkpoints (model, optimizer, step, RNG states) and the exported model.

Files hold only tensors and plain containers, so they load with ``torch.load(weights_only=True)``:
reading a checkpoint can never run code. A checkpoint is written to a temporary file in the same
directory, fsynced, renamed over the old one and the directory fsynced, so a crash leaves either
the previous checkpoint or the new one. The privacy journal, not the checkpoint, is the record of
what was charged: a checkpoint at step k never claims that fewer than k steps were charged, and
resuming checks that the journal covers it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from dptrain.errors import CheckpointError
from dptrain.journal import atomic_write
from dptrain_api.job import DPTrainingJob

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "MODEL_NAME",
    "Checkpoint",
    "capture_rng_state",
    "export_model",
    "job_fingerprint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

CHECKPOINT_NAME: Final = "checkpoint.pt"
MODEL_NAME: Final = "model.pt"
CHECKPOINT_VERSION: Final = 1


def job_fingerprint(job: DPTrainingJob) -> str:
    """sha256 of the job's identity and immutable spec (dataset, model, privacy, training).

    Resources, checkpoint and run policy are left out: they may change between attempts
    (a suspended job resumed elsewhere) without changing what is trained or its privacy.
    """
    spec = job.spec
    identity = {
        "name": job.metadata.name,
        "namespace": job.metadata.namespace,
        "uid": job.metadata.uid,
        "dataset": spec.dataset.to_wire(),
        "model": spec.model.to_wire(),
        "privacy": spec.privacy.to_wire(),
        "training": spec.training.to_wire(),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' GradSampleModule wrappers (its state_dict has no ``_module.``)."""
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, numpy, python) as tensors and plain containers.

    DP noise and Poisson sampling do NOT use these generators: the engine draws them from
    generators seeded freshly from the OS on every attempt, so they are not checkpointed.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "hasGauss": int(has_gauss),
            "cachedGaussian": float(cached),
        },
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gaussNext": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["hasGauss"],
            numpy_state["cachedGaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gaussNext"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class Checkpoint:
    """Everything needed to continue training from ``step``."""

    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    job_hash: str
    plan: dict[str, Any]
    journal_entries: int
    """Number of journal entries when the checkpoint was saved (the journal may only have grown since)."""
    charged_steps: int
    """Steps the journal had charged when the checkpoint was saved (at least ``step``)."""
    attempt: int
    rng: dict[str, Any] = field(default_factory=capture_rng_state)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "step": int(self.step),
            "model": self.model_state,
            "optimizer": self.optimizer_state,
            "jobHash": self.job_hash,
            "plan": dict(self.plan),
            "journalEntries": int(self.journal_entries),
            "chargedSteps": int(self.charged_steps),
            "attempt": int(self.attempt),
            "rng": self.rng,
            "evalMetrics": {str(k): float(v) for k, v in self.eval_metrics.items()},
            "history": [dict(h) for h in self.history],
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Checkpoint:
        if payload.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"unsupported checkpoint version {payload.get('version')!r}")
        return cls(
            step=int(payload["step"]),
            model_state=dict(payload["model"]),
            optimizer_state=dict(payload["optimizer"]),
            job_hash=str(payload["jobHash"]),
            plan=dict(payload["plan"]),
            journal_entries=int(payload["journalEntries"]),
            charged_steps=int(payload["chargedSteps"]),
            attempt=int(payload["attempt"]),
            rng=dict(payload["rng"]),
            eval_metrics=dict(payload.get("evalMetrics", {})),
            history=list(payload.get("history", [])),
        )


def _serialise(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically (temp file, fsync, rename, fsync directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _serialise(checkpoint.to_payload()))


def load_checkpoint(path: Path, *, job_hash: str, plan: Mapping[str, Any] | None = None) -> Checkpoint | None:
    """The checkpoint at ``path`` (None if there is none), refusing another job's or another plan's.

    ``plan`` is the current plan's :meth:`~dptrain.plan.TrainingPlan.mechanism_key`; every key in it
    must match the checkpoint's plan.
    """
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint = Checkpoint.from_payload(payload)
    except Exception as error:
        raise CheckpointError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {error}); to restart from step 0, "
            "delete that file but keep the privacy journal (its charges stay)"
        ) from None
    if checkpoint.job_hash != job_hash:
        raise CheckpointError(f"output dir {path.parent} holds a different job; use a new --output")
    damaged = _non_finite(checkpoint.model_state) + _non_finite(checkpoint.optimizer_state, prefix="optimizer.")
    if damaged:
        raise CheckpointError(
            f"the checkpoint {path} holds non-finite values (NaN or inf) in {', '.join(damaged[:5])}; to restart "
            "from step 0, delete that file but keep the privacy journal (its charges stay)"
        )
    if plan is not None:
        changed = sorted(key for key, value in plan.items() if checkpoint.plan.get(key) != value)
        if changed:
            details = ", ".join(f"{key}: {checkpoint.plan.get(key)!r} -> {plan[key]!r}" for key in changed)
            raise CheckpointError(
                f"the checkpoint in {path.parent} was made under another plan ({details}); use a new --output"
            )
    return checkpoint


def _non_finite(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors anywhere in ``state`` (nested dicts and lists) with a NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix.rstrip(".")] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        return [name for key, value in state.items() for name in _non_finite(value, f"{prefix}{key}.")]
    if isinstance(state, list | tuple):
        return [name for index, value in enumerate(state) for name in _non_finite(value, f"{prefix}{index}.")]
    return []


def export_model(path: Path, model: nn.Module) -> Path:
    """Save the trained model's state_dict (unwrapped, on CPU) atomically; load with weights_only=True."""
    state = {key: value.detach().cpu().clone() for key, value in unwrap_model(model).state_dict().items()}
    atomic_write(path, _serialise(state))
    return path
