"""Benchmark (a): DP-SGD step time ÷ non-private step time, per model, batch size and clipping path.

    .venv/bin/python benchmarks/step_time.py [--rounds 5] [--batches 64 512] [--json out.json] [--no-memory]

One optimizer step = forward, backward, optimizer.step(), zero_grad() on a fixed batch. Columns:

* ``nonprivate``: plain PyTorch (SGD, cross-entropy).
* ``hooks`` / ``ghost``: ``PrivacyEngine.make_private(grad_sample_mode=...)`` (σ = 1, C = 1).
* ``bookkeeping``: ``dptrain.bookkeeping.BookkeepingOptimizer`` (Linear-only models: one backward,
  norms from activations × output gradients, clipped sums as one matmul per layer).
* ``dptrain``: ``dptrain.engine.make_private_training`` (the trainer's own wrapper: the clipping mode
  it picks automatically, expected-batch-size normalisation, its step hook), then one step through
  the returned model/criterion/optimizer on the same fixed batch. The Poisson loader it builds is
  not used (its batch size varies), so data loading is not part of any column.

All variants of one (model, batch) are timed interleaved in ONE process with one thread: every round
runs each variant for the same number of steps, in an order rotated per round; the reported time is
the median over rounds of the per-step mean. Peak memory (optional) is measured separately, each
variant in a fresh subprocess: after setup (model, wrapping, batch) the kernel's peak-RSS mark is
reset (/proc/self/clear_refs 5), 5 steps run, and VmHWM − VmRSS-before-the-steps is reported: the
most extra resident memory the steps needed (gradients, per-example gradients or norms, optimizer
state, allocator slack). Linux only; ``--no-memory`` skips it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain.engine import make_private_training
from dptrain.models import build_model
from dptrain.plan import TrainingPlan
from dptrain_api.job import ModelSpec

VARIANTS = ("nonprivate", "hooks", "ghost", "bookkeeping", "dptrain")
MODELS = ("mlp", "cnn", "transformer", "logistic")
SEQ_LEN = 32
VOCAB = 1000


class TinyTransformer(nn.Module):
    """Embedding → one pre-LN encoder block (DPMultiheadAttention, 2 heads, d=64, FF 128) → mean pool → Linear."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 64, heads: int = 2, num_classes: int = 2) -> None:
        super().__init__()
        from opacus.layers import DPMultiheadAttention

        self.embed = nn.Embedding(vocab, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = DPMultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.norm2(x))
        return self.head(x.mean(dim=1))  # type: ignore[no-any-return]


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    if name == "cnn":  # the trainer's registry CNN on digits-shaped input
        model, _ = build_model(ModelSpec(architecture="cnn", channels=[16, 32]), input_shape=(1, 8, 8), num_classes=10)
        return model
    if name == "transformer":
        return TinyTransformer()
    if name == "logistic":  # the breast-cancer example's model (30 features)
        model, _ = build_model(ModelSpec(architecture="logistic"), input_shape=(30,), num_classes=2)
        return model
    raise ValueError(name)


def make_batch(name: str, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if name in ("mlp", "logistic"):
        return torch.randn(batch, 30, generator=generator), torch.randint(0, 2, (batch,), generator=generator)
    if name == "cnn":
        return torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    ids = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=generator).contiguous()
    return ids, torch.randint(0, 2, (batch,), generator=generator)


def _plan(batch: int, n: int) -> TrainingPlan:
    return TrainingPlan(
        noise_multiplier=1.0,
        sample_rate=batch / n,
        steps=1,
        delta=1e-5,
        target_epsilon=3.0,
        accountant="pld",
        max_grad_norm=1.0,
        batch_size=batch,
        physical_batch_size=batch,
        train_size=n,
        eval_size=0,
        planned_epsilon=3.0,
    )


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    mode: str


def make_variant(variant: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant:
    from opacus import PrivacyEngine

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = len(y)
    if variant == "nonprivate":
        criterion = nn.CrossEntropyLoss()

        def plain_step() -> None:
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Variant(variant, plain_step, "none")
    dataset = TensorDataset(x, y)
    if variant == "bookkeeping":
        from dptrain.bookkeeping import BookkeepingOptimizer

        p_opt = BookkeepingOptimizer(
            optimizer, model=model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
        )
        p_model, p_crit, mode = model, nn.CrossEntropyLoss(), "bookkeeping"
    elif variant in ("hooks", "ghost"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = PrivacyEngine().make_private(
                module=model,
                optimizer=optimizer,
                criterion=nn.CrossEntropyLoss(),
                data_loader=DataLoader(dataset, batch_size=batch),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode=variant,
            )
        if variant == "ghost":
            p_model, p_opt, p_crit, _ = wrapped
        else:
            p_model, p_opt, _ = wrapped
            p_crit = nn.CrossEntropyLoss()
        mode = variant
    else:
        private = make_private_training(
            model,
            optimizer,
            dataset,
            plan=_plan(batch, 10 * batch),
            noise_generator=None,
            sampling_generator=None,
        )
        p_model, p_opt, p_crit, mode = private.model, private.optimizer, private.criterion, private.clipping_mode

    def private_step() -> None:
        loss = p_crit(p_model(x), y)
        loss.backward()
        p_opt.step()
        p_opt.zero_grad(set_to_none=True)

    return Variant(variant, private_step, mode)


def variants_for(model: nn.Module) -> list[str]:
    from dptrain.bookkeeping import supports_bookkeeping

    return [v for v in VARIANTS if v != "bookkeeping" or supports_bookkeeping(model)]


def _steps_for(step: Callable[[], None], target_s: float) -> int:
    started = time.perf_counter()
    step()
    elapsed = time.perf_counter() - started
    return max(2, min(200, int(target_s / max(elapsed, 1e-6))))


def time_case(model_name: str, batch: int, rounds: int, target_s: float) -> dict[str, Any]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = make_model(model_name)
    x, y = make_batch(model_name, batch, generator)
    variants = [make_variant(v, base, x, y) for v in variants_for(base)]
    for v in variants:  # warm-up (first calls allocate, JIT-free but cache-cold)
        for _ in range(2):
            v.step()
    # same step count per round for all variants: sized on the slowest one
    steps = min(_steps_for(v.step, target_s) for v in variants)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            started = time.perf_counter()
            for _ in range(steps):
                v.step()
            samples[v.name].append((time.perf_counter() - started) / steps)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return {
        "model": model_name,
        "batch": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "ms": {name: 1e3 * t for name, t in medians.items()},
        "ratio": {name: medians[name] / medians["nonprivate"] for name in medians},
        "dptrain_mode": next(v.mode for v in variants if v.name == "dptrain"),
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(model_name: str, batch: int, variant: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = make_model(model_name)
    x, y = make_batch(model_name, batch, generator)
    v = make_variant(variant, base, x, y)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    for _ in range(5):
        v.step()
    print(json.dumps({"step_peak_kib": _status_kib("VmHWM") - before, "rss_before_kib": before}))


def measure_memory(model_name: str, batch: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for variant in variants_for(make_model(model_name)):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", model_name, str(batch), variant],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["step_peak_kib"] / 1024.0
    return out


def print_table(rows: list[dict[str, Any]], memory: bool) -> None:
    def cell(values: dict[str, float], name: str, fmt: str, unit: str = "") -> str:
        return format(values[name], fmt) + unit if name in values else "–"

    print("| model | batch | non-private ms | hooks × | ghost × | bookkeeping × | dptrain × (mode) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        r = row["ratio"]
        print(
            f"| {row['model']} | {row['batch']} | {row['ms']['nonprivate']:.2f} | {r['hooks']:.1f}× | "
            f"{r['ghost']:.1f}× | {cell(r, 'bookkeeping', '.1f', '×')} | {r['dptrain']:.1f}× ({row['dptrain_mode']}) |"
        )
    if memory:
        print("\nPeak RSS growth during the first 5 steps, per variant (MiB, fresh process each):")
        print("| model | batch | non-private | hooks | ghost | bookkeeping | dptrain |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            m = row["peak_rss_mib"]
            print(
                f"| {row['model']} | {row['batch']} | {m['nonprivate']:.1f} | {m['hooks']:.1f} | "
                f"{m['ghost']:.1f} | {cell(m, 'bookkeeping', '.1f')} | {m['dptrain']:.1f} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--target-seconds", type=float, default=0.15, help="time per variant per round")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "BATCH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    if args.memory_child:
        model_name, batch, variant = args.memory_child
        memory_child(model_name, int(batch), variant)
        return 0
    rows = []
    for model_name in args.models:
        for batch in args.batches:
            row = time_case(model_name, batch, args.rounds, args.target_seconds)
            if not args.no_memory:
                row["peak_rss_mib"] = measure_memory(model_name, batch)
            rows.append(row)
            print(f"# {model_name} b={batch}: {row['ms']}", file=sys.stderr, flush=True)
    print_table(rows, not args.no_memory)
    if args.json:
        meta = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
