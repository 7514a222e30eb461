"""Real gloo process groups for the distributed tests: ``spawn(fn, world)`` runs ``fn(group)`` on every rank."""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dptrain.distributed import Group

__all__ = ["free_port", "spawn"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank_main(fn: Callable[[Group], Any], rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores: one thread each
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = Group(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
        result = fn(group)
        torch.save({"result": result}, out / f"{rank}.pt")
    except BaseException:
        (out / f"{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[[Group], Any], world: int = 2, *, timeout: float = 60.0) -> list[Any]:
    """``fn(group)`` on ``world`` forked processes joined in one gloo group; their results (pickled), rank order.

    Forked, not spawned: the children inherit the test's data and closures without re-importing torch.
    """
    context = multiprocessing.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        processes = [context.Process(target=_rank_main, args=(fn, rank, world, port, out)) for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        errors = [(out / f"{rank}.error") for rank in range(world) if (out / f"{rank}.error").exists()]
        if errors or any(process.exitcode != 0 for process in processes):
            details = "\n".join(path.read_text() for path in errors)
            raise AssertionError(f"ranks exited with {[p.exitcode for p in processes]}:\n{details}")
        return [torch.load(out / f"{rank}.pt", weights_only=False)["result"] for rank in range(world)]
