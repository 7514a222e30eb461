"""Benchmark: data-parallel DP-SGD throughput, one process vs several, side by side in one run.

    .venv/bin/python benchmarks/distributed.py [--rounds 15] [--steps 20] [--models mlp cnn] [--device cpu|cuda]
                                               [--configs 1x1 1x2 2x1] [--json out.json]

A configuration ``PxT`` is P processes × T torch threads each; P is 1 or the largest P asked for (W). W processes
are started once per model (torch.multiprocessing, a gloo group on CPU, NCCL with one GPU each on CUDA) and every
configuration runs in them: a W-process configuration on all of them, a one-process configuration on rank 0
while the others wait at a barrier (blocked, not spinning). Every configuration runs the engine's step
(``dptrain.dpsgd.make_private_training``: book-keeping clipping, σ = 1, C = 1, secure noise, ``distributed=True``
over W processes, and the engine's per-step stop vote) on Poisson batches of its keyed shard
(``dptrain.data.shard``) at the GLOBAL rate q = B / N, as ``dptrain run --nproc W`` does, with the same model and
the same global expected batch B.

Rounds interleave the configurations (order rotated per round): each round times ``--steps`` steps of each, from
a barrier to a barrier, after warm-up. samples/s = records in all ranks' batches ÷ time. The machine is shared, so
the table reports medians over rounds, and the speed-up is the median over rounds of the ratio to the first
configuration IN THE SAME ROUND (neighbours' load moves absolute numbers, the paired ratios much less). Scaling
efficiency = speed-up ÷ cores used (P·T).
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
from dptrain.distributed import Group, StopVote
from dptrain.dpsgd import PoissonSampler, make_private_training
from dptrain.models import build_model
from dptrain.randomness import GeneratorBits
from dptrain_api.job import ModelSpec

MODELS: dict[str, tuple[ModelSpec, tuple[int, ...], int, int]] = {
    # name: (spec, input shape, classes, global expected batch)
    "mlp": (ModelSpec(architecture="mlp", hidden_sizes=[512, 512]), (64,), 2, 512),
    "cnn": (ModelSpec(architecture="cnn", channels=[16, 32]), (1, 16, 16), 10, 256),
}
RECORDS = 20_000
WARMUP = 3
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
    """What every rank measures: ``configs`` on ``device`` with ``model``, ``rounds`` × ``steps`` timed steps."""

    model: str
    configs: tuple[Config, ...]
    device: str
    rounds: int
    steps: int
    port: int
    out: str

    @property
    def world(self) -> int:
        return max(config.processes for config in self.configs)


def _private_step(task: Task, config: Config, rank: int, device: torch.device) -> Callable[[], int]:
    """The engine's DP-SGD step of ``config`` on this rank's shard at the global q; it returns the records used."""
    spec, shape, classes, batch = MODELS[task.model]
    data = torch.utils.data.TensorDataset(
        torch.rand(RECORDS, *shape, generator=torch.Generator().manual_seed(0)),
        torch.randint(0, classes, (RECORDS,), generator=torch.Generator().manual_seed(1)),
    )
    local = shard(data, shards=config.processes, index=rank, key=KEY)
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
            secure_noise=False,
            clipping_mode="bookkeeping",
            distributed=config.processes > 1,
        )
    sampler = PoissonSampler(
        len(labels), sample_rate=batch / RECORDS, bits=GeneratorBits(torch.Generator().manual_seed(7))
    )
    group = Group(rank=rank, world_size=config.processes, local_rank=rank, local_world_size=config.processes)
    vote = StopVote(group if config.processes > 1 else Group())  # the engine's per-step stop vote

    def step() -> int:
        vote.poll(False)
        index = sampler.next_batch().to(device)
        private.step(features[index], labels[index])
        return int(index.numel())

    return step


def _rank(rank: int, task: Task) -> None:
    """One of the W processes (started by torch.multiprocessing.start_processes): every round, every config."""
    import torch.distributed as dist

    device = torch.device(task.device, rank) if task.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(task.port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=task.world)
    steps = {c: _private_step(task, c, rank, device) for c in task.configs if rank < c.processes}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    results: dict[str, list[dict[str, float]]] = {c.name: [] for c in task.configs}
    for round_index in range(task.rounds):
        shift = round_index % len(task.configs)
        for config in task.configs[shift:] + task.configs[:shift]:
            torch.set_num_threads(config.threads)
            step = steps.get(config)
            for _ in range(WARMUP if step else 0):
                step()  # type: ignore[misc]
            sync()
            started = time.perf_counter()
            samples = sum(step() for _ in range(task.steps)) if step else 0
            sync()
            elapsed = time.perf_counter() - started
            total = torch.tensor([samples], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            results[config.name].append({"seconds": elapsed, "samples": float(total.item())})
    dist.destroy_process_group()
    if rank == 0:
        Path(task.out).write_text(json.dumps(results))


def measure(task: Task) -> dict[str, list[dict[str, float]]]:
    """Per configuration, per round: seconds and samples of the timed steps."""
    start_processes(_rank, args=(task,), nprocs=task.world, start_method="spawn")
    results: dict[str, list[dict[str, float]]] = json.loads(Path(task.out).read_text())
    return results


def summarise(model: str, configs: list[Config], results: dict[str, list[dict[str, float]]], steps: int) -> list[Any]:
    """One row per configuration: medians over rounds, and the paired speed-up against the first configuration."""
    rate = {name: [r["samples"] / r["seconds"] for r in rounds] for name, rounds in results.items()}
    base = configs[0].name
    rows = []
    for config in configs:
        ratios = [mine / theirs for mine, theirs in zip(rate[config.name], rate[base], strict=True)]
        speedup = statistics.median(ratios)
        rows.append(
            {
                "model": model,
                "batch": MODELS[model][3],
                "config": config.name,
                "processes": config.processes,
                "threadsPerProcess": config.threads,
                "stepMs": statistics.median(1000 * r["seconds"] / steps for r in results[config.name]),
                "samplesPerSecond": statistics.median(rate[config.name]),
                "rounds": rate[config.name],
                "speedup": speedup,
                "efficiency": speedup / (config.processes * config.threads),
            }
        )
    return rows


def _table(rows: list[dict[str, Any]], device: str, rounds: int) -> str:
    lines = [
        f"device {device}; P×T = processes × threads each; median of {rounds} interleaved rounds; speed-up = median "
        f"paired ratio to {rows[0]['config'].replace('x', '×')}; efficiency = speed-up ÷ (P·T)",
        "",
        "| model | global batch | P×T | step (ms) | samples/s | speed-up | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['config'].replace('x', '×')} | {r['stepMs']:.1f} | "
            f"{r['samplesPerSecond']:.0f} | {r['speedup']:.2f}× | {100 * r['efficiency']:.0f} % |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=None, help="PxT configurations; the first is the baseline")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.configs is None:
        args.configs = ["1x1", "1x2", "2x1"] if args.device == "cpu" else ["1x1", f"{torch.cuda.device_count()}x1"]
    configs = list(dict.fromkeys(Config.parse(text) for text in args.configs))
    world = max(c.processes for c in configs)
    if any(c.processes not in (1, world) for c in configs):
        parser.error(f"each configuration runs 1 process or {world} (the largest asked for)")
    if args.device == "cuda" and world > torch.cuda.device_count():
        parser.error(f"{torch.cuda.device_count()} GPU(s) visible: each process needs one")
    rows = []
    for model in args.models:
        with tempfile.TemporaryDirectory() as folder:
            task = Task(model, tuple(configs), args.device, args.rounds, args.steps, free_port(), f"{folder}/out.json")
            rows += summarise(model, configs, measure(task), args.steps)
    print(_table(rows, args.device, args.rounds))
    if args.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
        if args.device == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(0)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
