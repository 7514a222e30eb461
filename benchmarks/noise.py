"""Benchmark (i): the cost of the noise per step: float64 Gaussian draws from ChaCha20 (secureNoise, what every job on
a PrivateDataset runs) and from a torch generator, against the float32 ``normal_`` draw they replaced.

    .venv/bin/python benchmarks/noise.py [--rounds 15] [--batch 512] [--json out.json]

For each model of ``step_time.py`` (its parameter count d): the time of one flat draw of d coordinates by
``dptrain.randomness.standard_normal`` with ChaCha20 and with a torch generator, and of torch's float32
``Tensor.normal_`` (the old, capped draw), each as a share of that model's DP step (the kernels with
``secure_noise=True``, timed in the same process). Medians over interleaved rounds, one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dptrain.randomness import ChaChaBits, GeneratorBits, standard_normal
from step_time import make_batch, make_model, make_variant

MODELS = ("mlp", "cnn", "resnet", "transformer", "encoder", "logistic")


def _median_ms(action: Callable[[], Any], rounds: int, repeats: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            action()
        times.append((time.perf_counter() - started) / repeats * 1e3)
    return statistics.median(times)


def measure(model_name: str, batch: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make_model(model_name)
    x, y = make_batch(model_name, batch, torch.Generator().manual_seed(1))
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    variant = make_variant("kernels+secure", model, x, y)
    assert variant is not None
    chacha, generator = ChaChaBits(), GeneratorBits()
    scratch = torch.empty(d)
    draws = {
        "chacha20 float64": lambda: standard_normal(chacha, d),
        "torch float64": lambda: standard_normal(generator, d),
        "torch float32 normal_ (old)": scratch.normal_,
    }
    step = _median_ms(variant.step, rounds, 5)
    out: dict[str, Any] = {"model": model_name, "batch": batch, "parameters": d, "stepMs": step}
    for name, draw in draws.items():
        cost = _median_ms(draw, rounds, 20)
        out[name] = {"ms": cost, "shareOfStep": cost / step}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.batch, args.rounds) for name in args.models]
    print("| model | parameters | DP step ms (kernels+secure) | ChaCha20 float64 ms (share) | torch float64 ms (share) "
          "| float32 normal_ ms (share) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row[key]['ms']:.3f} ({row[key]['shareOfStep']:.1%})"
            for key in ("chacha20 float64", "torch float64", "torch float32 normal_ (old)")
        ]
        print(f"| {row['model']} | {row['parameters']} | {row['stepMs']:.2f} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
