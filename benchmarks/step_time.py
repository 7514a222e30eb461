"""Benchmark (a): DP-SGD step time and peak memory ÷ non-private, per model, batch size and clipping path.

    .venv/bin/python benchmarks/step_time.py [--rounds 15] [--batches 64 512] [--models ...] [--json out.json]
                                             [--no-memory]

One optimizer step = forward, backward, optimizer.step(), zero_grad() on a fixed batch (σ = 1, C = 1).
Variants ("–" where a variant does not support the model):

* ``nonprivate``: plain PyTorch (SGD, cross-entropy).
* ``hooks`` / ``ghost``: ``PrivacyEngine.make_private(grad_sample_mode=...)``. Models with
  nn.MultiheadAttention get Opacus' ``ModuleValidator.fix`` first (DPMultiheadAttention: same maths).
* ``kernels``: ``dptrain.make_private(clipping="bookkeeping")`` (dptrain.clipping: per-layer kernels,
  one backward, flat noise drawn in float64 from a torch generator's words); ``kernels+secure``: the same with
  ``secure_noise=True`` (the words from ChaCha20, a CSPRNG: what jobs on a PrivateDataset run). The "auto" column
  names what ``make_private(clipping="auto")`` picks for the model.

All variants of one (model, batch) are timed interleaved in ONE process with one thread: every round
runs each variant for the same number of steps, in an order rotated per round; the reported time is
the median over rounds of the per-step mean, and a ratio is the median over rounds of (variant ÷
non-private in the same round). Many short rounds keep the ratios fair on a machine shared with
other work. Peak memory (optional) is measured separately, each variant in a fresh
subprocess: after setup (model, wrapping, batch) the kernel's peak-RSS mark is reset
(/proc/self/clear_refs 5), 5 steps run, and VmHWM − VmRSS-before-the-steps is reported: the most
extra resident memory the steps needed (activations, gradients, per-example gradients or norms,
optimizer state, allocator slack). Linux only; ``--no-memory`` skips it.

``--device cuda`` times the same variants on the GPU (model and batch on the device, a
``torch.cuda.synchronize()`` closes every timed block) and reports, instead of RSS, the peak CUDA memory each
variant's steps allocated above what was allocated before them (``torch.cuda.max_memory_allocated``), measured
in the same process after the timing rounds; ``benchmarks/gpu.sh`` runs it.
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

from dptrain.models import build_model
from dptrain_api.job import ModelSpec

VARIANTS = ("nonprivate", "hooks", "ghost", "kernels", "kernels+secure")
PRIVATE = VARIANTS[1:]
MODELS = ("mlp", "cnn", "resnet", "transformer", "encoder", "logistic")
SEQ_LEN = 32
VOCAB = 1000
CPU = torch.device("cpu")


class TinyTransformer(nn.Module):
    """Embedding → one pre-LN encoder block (nn.MultiheadAttention, 2 heads, d=64, FF 128) → mean pool → Linear."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 64, heads: int = 2, num_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.norm2(x))
        return self.head(x.mean(dim=1))  # type: ignore[no-any-return]


class Encoder(nn.Module):
    """Embedding → 2 × nn.TransformerEncoderLayer (pre-LN, 4 heads, d=64, FF 128, batch_first) → LayerNorm → Linear."""

    def __init__(self, vocab: int = VOCAB, d_model: int = 64, num_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(ids))).mean(dim=1))  # type: ignore[no-any-return]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        inner = channels // stride
        self.conv1 = nn.Conv2d(inner, channels, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, channels)
        self.skip = nn.Conv2d(inner, channels, 1, stride=stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.skip(x) + self.norm2(self.conv2(h)))


class SmallResNet(nn.Module):
    """3×16×16 input → conv 16 + GroupNorm → residual blocks (16, 32 stride 2) → global mean → Linear (10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(16), ResidualBlock(32, stride=2))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    if name == "cnn":  # the trainer's registry CNN on digits-shaped input
        model, _ = build_model(ModelSpec(architecture="cnn", channels=[16, 32]), input_shape=(1, 8, 8), num_classes=10)
        return model
    if name == "resnet":
        return SmallResNet()
    if name == "transformer":
        return TinyTransformer()
    if name == "encoder":
        return Encoder()
    if name == "logistic":  # the breast-cancer example's model (30 features)
        model, _ = build_model(ModelSpec(architecture="logistic"), input_shape=(30,), num_classes=2)
        return model
    raise ValueError(name)


def make_batch(name: str, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if name in ("mlp", "logistic"):
        return torch.randn(batch, 30, generator=generator), torch.randint(0, 2, (batch,), generator=generator)
    if name == "cnn":
        return torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    if name == "resnet":
        return torch.randn(batch, 3, 16, 16, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    ids = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=generator).contiguous()
    return ids, torch.randint(0, 2, (batch,), generator=generator)


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    mode: str


def _opacus_model(model: nn.Module) -> nn.Module:
    """Opacus has no per-sample gradients for nn.MultiheadAttention: its own drop-in replacement."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        from opacus.validators import ModuleValidator

        return ModuleValidator.fix(model)  # type: ignore[no-any-return]
    return model


def _opacus(variant: str, model: nn.Module, optimizer: torch.optim.Optimizer, x: Any, y: Any) -> tuple[Any, ...]:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=variant,
        )
    if variant == "ghost":
        return wrapped[0], wrapped[1], wrapped[2]
    return wrapped[0], wrapped[1], nn.CrossEntropyLoss()


def make_variant(variant: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Variant | None:
    """The step function of one variant, or None where the variant does not support the model."""
    from dptrain.clipping import choose_clipping_mode, make_private

    model = copy.deepcopy(base)
    if variant in ("hooks", "ghost"):
        model = _opacus_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = len(y)
    if variant == "nonprivate":
        p_model, p_opt, p_crit, mode = model, optimizer, nn.CrossEntropyLoss(), "none"
    elif variant in ("hooks", "ghost"):
        p_model, p_opt, p_crit = _opacus(variant, model, optimizer, x, y)
        mode = variant
    else:
        if choose_clipping_mode(model).mode != "bookkeeping":
            return None
        p_model, p_opt, p_crit = make_private(
            model,
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            clipping="bookkeeping",
            secure_noise=variant == "kernels+secure",
        )
        mode = "bookkeeping"

    def step() -> None:
        loss = p_crit(p_model(x), y)
        loss.backward()
        p_opt.step()
        p_opt.zero_grad(set_to_none=True)

    return Variant(variant, step, mode)


def _steps_for(step: Callable[[], None], target_s: float) -> int:
    started = time.perf_counter()
    step()
    elapsed = time.perf_counter() - started
    return max(1, min(200, int(target_s / max(elapsed, 1e-6))))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_mib(variants: list[Variant], device: torch.device) -> dict[str, float]:
    """Peak CUDA memory of 5 steps of each variant above what was allocated before them (MiB)."""
    peaks = {}
    for v in variants:
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(5):
            v.step()
        _synchronize(device)
        peaks[v.name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return peaks


def time_case(model_name: str, batch: int, rounds: int, target_s: float, device: torch.device = CPU) -> dict[str, Any]:
    from dptrain.clipping import choose_clipping_mode

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = make_model(model_name).to(device)
    x, y = (t.to(device) for t in make_batch(model_name, batch, generator))
    made = [make_variant(v, base, x, y) for v in VARIANTS]
    variants = [v for v in made if v is not None]
    for v in variants:  # warm-up (first calls allocate, JIT-free but cache-cold)
        for _ in range(2):
            v.step()
    _synchronize(device)
    # same step count per round for all variants: sized on the slowest one
    steps = min(_steps_for(v.step, target_s) for v in variants)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            started = time.perf_counter()
            for _ in range(steps):
                v.step()
            _synchronize(device)
            samples[v.name].append((time.perf_counter() - started) / steps)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    # Ratios pair each round's variant with the same round's non-private run (adjacent in time), then take
    # the median over rounds: a burst of load from other processes hits both sides of a pair.
    paired = {
        name: statistics.median(t / base for t, base in zip(times, samples["nonprivate"], strict=True))
        for name, times in samples.items()
    }
    row: dict[str, Any] = {
        "model": model_name,
        "device": device.type,
        "batch": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "ms": {name: 1e3 * t for name, t in medians.items()},
        "ratio": paired,
        "auto_mode": choose_clipping_mode(base).mode,
    }
    if device.type == "cuda":
        row["peak_cuda_mib"] = cuda_peak_mib(variants, device)
    return row


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
    assert v is not None
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    for _ in range(5):
        v.step()
    print(json.dumps({"step_peak_kib": _status_kib("VmHWM") - before, "rss_before_kib": before}))


def measure_memory(model_name: str, batch: int, variants: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for variant in variants:
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

    header = " | ".join(f"{v} ×" for v in PRIVATE)
    print(f"| model | batch | non-private ms | {header} | auto picks |")
    print("|---|---|---|" + "---|" * len(PRIVATE) + "---|")
    for row in rows:
        cells = " | ".join(cell(row["ratio"], v, ".2f", "×") for v in PRIVATE)
        print(f"| {row['model']} | {row['batch']} | {row['ms']['nonprivate']:.2f} | {cells} | {row['auto_mode']} |")
    if memory:
        print("\nPeak RSS growth during 5 steps ÷ non-private's (non-private in MiB; fresh process each):")
        print(f"| model | batch | non-private MiB | {header} |")
        print("|---|---|---|" + "---|" * len(PRIVATE))
        for row in rows:
            m = row["peak_rss_mib"]
            ratios = {k: v / max(m["nonprivate"], 1e-9) for k, v in m.items()}
            cells = " | ".join(cell(ratios, v, ".2f", "×") for v in PRIVATE)
            print(f"| {row['model']} | {row['batch']} | {m['nonprivate']:.1f} | {cells} |")
    if rows and "peak_cuda_mib" in rows[0]:
        print("\nPeak CUDA memory of 5 steps ÷ non-private's (non-private in MiB):")
        print(f"| model | batch | non-private MiB | {header} |")
        print("|---|---|---|" + "---|" * len(PRIVATE))
        for row in rows:
            m = row["peak_cuda_mib"]
            ratios = {k: v / max(m["nonprivate"], 1e-9) for k, v in m.items()}
            cells = " | ".join(cell(ratios, v, ".2f", "×") for v in PRIVATE)
            print(f"| {row['model']} | {row['batch']} | {m['nonprivate']:.1f} | {cells} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--target-seconds", type=float, default=0.05, help="time per variant per round")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "BATCH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    if args.memory_child:
        model_name, batch, variant = args.memory_child
        memory_child(model_name, int(batch), variant)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    rows = []
    for model_name in args.models:
        for batch in args.batches:
            row = time_case(model_name, batch, args.rounds, args.target_seconds, device)
            if not args.no_memory and device.type == "cpu":
                row["peak_rss_mib"] = measure_memory(model_name, batch, list(row["ms"]))
            rows.append(row)
            print(f"# {model_name} b={batch}: {row['ms']}", file=sys.stderr, flush=True)
    print_table(rows, not args.no_memory)
    if args.json:
        meta = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
