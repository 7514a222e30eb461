"""Benchmark: data-parallel DP-SGD throughput, one process vs several, side by side in one run.

    .venv/bin/python benchmarks/distributed.py [--rounds 5] [--steps 30] [--models mlp cnn] [--device cpu|cuda]
                                               [--configs 1x1 1x2 2x1] [--json out.json]

A configuration ``PxT`` is P processes (a gloo group on CPU, NCCL with one GPU each on CUDA) × T torch threads
each. Every process runs the engine's step (``dptrain.dpsgd.make_private_training``, book-keeping clipping,
σ = 1, C = 1, secure noise, ``distributed=True`` when P > 1) on Poisson batches of its keyed shard
(``dptrain.data.shard``) at the GLOBAL rate q = B / N, exactly as ``dptrain run --nproc P`` does, on the same
model and the same global expected batch B for every configuration. After warm-up steps and a barrier, ``--steps``
steps are timed (from a barrier to a barrier); samples/s = the records in all ranks' batches ÷ the time.

Configurations are measured in interleaved rounds (the order rotated per round, each in freshly started
processes), and the median samples/s over rounds is reported. Speed-up and scaling efficiency are relative to
the single process with one thread (efficiency = speed-up ÷ P); ``vs 1×T`` compares with one process using the
same total threads (the fair single-process baseline on a machine with P·T cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing import start_processes

from dptrain.data import shard
from dptrain.dpsgd import PoissonSampler, make_private_training
from dptrain.models import build_model
from dptrain_api.job import ModelSpec

MODELS: dict[str, tuple[ModelSpec, tuple[int, ...], int, int]] = {
    # name: (spec, input shape, classes, global expected batch)
    "mlp": (ModelSpec(architecture="mlp", hidden_sizes=[512, 512]), (64,), 2, 512),
    "cnn": (ModelSpec(architecture="cnn", channels=[16, 32]), (1, 16, 16), 10, 256),
}
RECORDS = 20_000
WARMUP = 5
KEY = b"benchmarks/distributed"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Config:
    processes: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.processes}x{self.threads}"

    @classmethod
    def parse(cls, text: str) -> Config:
        processes, threads = text.lower().split("x")
        return cls(int(processes), int(threads))


@dataclass(frozen=True)
class Task:
    """One measurement: ``config`` on ``device`` training ``model`` for ``steps`` timed steps."""

    model: str
    config: Config
    device: str
    steps: int
    port: int
    out: str


def _private_step(task: Task, rank: int, device: torch.device) -> Callable[[], int]:
    """The engine's DP-SGD step on this rank's shard, at the global q; returns the records it used."""
    spec, shape, classes, batch = MODELS[task.model]
    data = torch.utils.data.TensorDataset(
        torch.rand(RECORDS, *shape, generator=torch.Generator().manual_seed(0)),
        torch.randint(0, classes, (RECORDS,), generator=torch.Generator().manual_seed(1)),
    )
    local = shard(data, shards=task.config.processes, index=rank, key=KEY)
    features, labels = (t.to(device) for t in local.tensors)
    torch.manual_seed(0)
    model, _ = build_model(spec, input_shape=shape, num_classes=classes)
    model = model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = make_private_training(
            model,
            torch.optim.SGD(model.parameters(), lr=0.01),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            physical_batch_size=batch,
            noise_generator=torch.Generator(device=device).manual_seed(rank),
            clipping_mode="bookkeeping",
            distributed=task.config.processes > 1,
        )
    sampler = PoissonSampler(len(labels), sample_rate=batch / RECORDS, generator=torch.Generator().manual_seed(7))

    def step() -> int:
        index = sampler.next_batch().to(device)
        private.step(features[index], labels[index])
        return int(index.numel())

    return step


def _rank(rank: int, task: Task) -> None:
    """One rank of one measurement (started by torch.multiprocessing.start_processes)."""
    import torch.distributed as dist

    torch.set_num_threads(task.config.threads)
    distributed = task.config.processes > 1
    device = torch.device(task.device, rank) if task.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(task.port))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=task.config.processes
        )
    step = _private_step(task, rank, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if distributed:
            dist.barrier()

    for _ in range(WARMUP):
        step()
    sync()
    started = time.perf_counter()
    samples = sum(step() for _ in range(task.steps))
    sync()
    elapsed = time.perf_counter() - started
    total = torch.tensor([samples], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(total)
        dist.destroy_process_group()
    if rank == 0:
        Path(task.out).write_text(json.dumps({"seconds": elapsed, "samples": float(total.item()), "steps": task.steps}))


def measure(model: str, config: Config, device: str, steps: int) -> dict[str, float]:
    """One measurement in fresh processes: (seconds, samples) of ``steps`` timed global steps."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        task = Task(model=model, config=config, device=device, steps=steps, port=free_port(), out=str(out))
        start_processes(_rank, args=(task,), nprocs=config.processes, start_method="spawn")
        result: dict[str, float] = json.loads(out.read_text())
    return result


def run(models: list[str], configs: list[Config], device: str, rounds: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        samples_per_second: dict[str, list[float]] = {c.name: [] for c in configs}
        step_ms: dict[str, list[float]] = {c.name: [] for c in configs}
        for round_index in range(rounds):
            order = configs[round_index % len(configs) :] + configs[: round_index % len(configs)]
            for config in order:
                result = measure(model, config, device, steps)
                samples_per_second[config.name].append(result["samples"] / result["seconds"])
                step_ms[config.name].append(1000 * result["seconds"] / result["steps"])
        base = statistics.median(samples_per_second[configs[0].name])
        for config in configs:
            median = statistics.median(samples_per_second[config.name])
            same_threads = f"1x{config.processes * config.threads}"
            rows.append(
                {
                    "model": model,
                    "batch": MODELS[model][3],
                    "config": config.name,
                    "processes": config.processes,
                    "threadsPerProcess": config.threads,
                    "stepMs": statistics.median(step_ms[config.name]),
                    "samplesPerSecond": median,
                    "rounds": samples_per_second[config.name],
                    "speedup": median / base,
                    "efficiency": median / base / config.processes,
                    "vsOneProcessSameThreads": (
                        median / statistics.median(samples_per_second[same_threads])
                        if config.processes > 1 and same_threads in samples_per_second
                        else None
                    ),
                }
            )
    return rows


def _table(rows: list[dict[str, Any]], device: str) -> str:
    lines = [
        f"device {device}; P×T = processes × threads each; speed-up and efficiency vs {rows[0]['config']}",
        "",
        "| model | global batch | P×T | step (ms) | samples/s | speed-up | efficiency | vs 1×(P·T) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = "—" if r["vsOneProcessSameThreads"] is None else f"{r['vsOneProcessSameThreads']:.2f}×"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['config'].replace('x', '×')} | {r['stepMs']:.1f} | "
            f"{r['samplesPerSecond']:.0f} | {r['speedup']:.2f}× | {100 * r['efficiency']:.0f} % | {versus} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=None, help="PxT configurations; the first is the baseline")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.configs is None:
        args.configs = ["1x1", "1x2", "2x1"] if args.device == "cpu" else ["1x1", f"{torch.cuda.device_count()}x1"]
    configs = list(dict.fromkeys(Config.parse(text) for text in args.configs))
    if args.device == "cuda" and max(c.processes for c in configs) > torch.cuda.device_count():
        parser.error(f"{torch.cuda.device_count()} GPU(s) visible: each process needs one")
    rows = run(args.models, configs, args.device, args.rounds, args.steps)
    print(_table(rows, args.device))
    if args.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
        if args.device == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(0)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
