"""Checkpoints: atomic, weights_only-loadable, refuse another job's directory."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dptrain.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    Checkpoint,
    capture_rng_state,
    export_model,
    job_fingerprint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from dptrain.errors import CheckpointError
from dptrain_api import DPTrainingJob


def _job(name: str = "ckpt", **privacy: Any) -> DPTrainingJob:
    return DPTrainingJob.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "dataset": {"builtin": "breast-cancer"},
                "privacy": {"targetEpsilon": 3.0, **privacy},
                "resources": {"cpu": "1"},
            },
        }
    )


def _trained_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return model, optimizer


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, job_hash: str, **overrides: Any) -> Checkpoint:
    values: dict[str, Any] = {
        "step": 15,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "job_hash": job_hash,
        "plan": {"noiseMultiplier": 1.1, "sampleRate": 0.1, "steps": 30},
        "journal_entries": 3,
        "charged_steps": 15,
        "attempt": 2,
        "eval_metrics": {"accuracy": 0.9},
        "history": [{"step": 1.0, "epsilon": 0.5, "loss": 0.7}],
    }
    values.update(overrides)
    return Checkpoint(**values)


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    model, optimizer = _trained_model()
    job_hash = job_fingerprint(_job())
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(model, optimizer, job_hash))
    torch.load(path, weights_only=True)  # plain tensors and containers only: loads without unpickling code
    loaded = load_checkpoint(path, job_hash=job_hash, plan={"noiseMultiplier": 1.1, "steps": 30})
    assert loaded is not None
    assert loaded.step == 15
    assert loaded.attempt == 2
    assert loaded.charged_steps == 15
    assert loaded.journal_entries == 3
    assert loaded.eval_metrics == {"accuracy": 0.9}
    assert loaded.history == [{"step": 1.0, "epsilon": 0.5, "loss": 0.7}]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model_state[key], value)
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    fresh.load_state_dict(loaded.model_state)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    momentum = fresh_optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp files


def test_rng_states_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    model, optimizer = _trained_model()
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(model, optimizer, "h", rng=state))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    loaded = load_checkpoint(path, job_hash="h")
    assert loaded is not None
    restore_rng_state(loaded.rng)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, job_hash="h") is None


def test_a_different_job_is_refused(tmp_path: Path) -> None:
    model, optimizer = _trained_model()
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(model, optimizer, job_fingerprint(_job("one"))))
    with pytest.raises(CheckpointError, match=r"holds a different job; use a new --output"):
        load_checkpoint(path, job_hash=job_fingerprint(_job("two")))


def test_another_plan_is_refused(tmp_path: Path) -> None:
    model, optimizer = _trained_model()
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(model, optimizer, "h"))
    with pytest.raises(CheckpointError, match="another plan"):
        load_checkpoint(path, job_hash="h", plan={"noiseMultiplier": 1.2})


def test_an_unreadable_checkpoint_is_refused_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match="keep the privacy journal"):
        load_checkpoint(path, job_hash="h")


def test_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"version": 1, "evil": Path("/")}, path)  # an arbitrary class: weights_only refuses it
    with pytest.raises(CheckpointError):
        load_checkpoint(path, job_hash="h")


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _trained_model()
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(model, optimizer, "h", step=10))

    def crash(*_args: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, _checkpoint(model, optimizer, "h", step=20))
    monkeypatch.undo()
    loaded = load_checkpoint(path, job_hash="h")
    assert loaded is not None
    assert loaded.step == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_export_unwraps_opacus_and_loads_with_weights_only(tmp_path: Path) -> None:
    from opacus import GradSampleModule

    model, _ = _trained_model()
    wrapped = GradSampleModule(model)
    assert unwrap_model(wrapped) is model
    path = export_model(tmp_path / MODEL_NAME, wrapped)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.state_dict())
    assert not any(key.startswith("_module") for key in state)
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    fresh.load_state_dict(state)


def test_fingerprint_covers_what_is_trained_not_where() -> None:
    base = _job()
    assert job_fingerprint(base) == job_fingerprint(_job())
    moved = base.model_copy(deep=True)
    moved.spec.resources.cpu = "4"
    moved.spec.checkpoint.every_steps = 7
    assert job_fingerprint(moved) == job_fingerprint(base)
    assert job_fingerprint(_job(delta=1e-6)) != job_fingerprint(base)
    assert job_fingerprint(_job("other")) != job_fingerprint(base)
