"""Run one function on several gloo ranks of this machine (forked processes) and return rank 0's result: how an
audit exercises the distributed DP-SGD path without a cluster."""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from dptrain.distributed import Group
from dptrain.errors import AuditError

__all__ = ["run_ranks"]

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank(work: Callable[[Group], Any], rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = work(Group(rank=rank, world_size=world, local_rank=rank, local_world_size=world))
        if rank == 0:
            torch.save({"result": result}, out / "result.pt")
    except BaseException:
        (out / f"{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0)  # no interpreter teardown in a forked child (torch.distributed's destructors can abort)


def run_ranks(work: Callable[[Group], T], *, world: int, timeout: float = 3600.0) -> T:
    """``work(group)`` on ``world`` forked processes in one gloo group on 127.0.0.1; rank 0's (picklable) result."""
    context = multiprocessing.get_context("fork")
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        processes = [context.Process(target=_rank, args=(work, rank, world, port, out)) for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout)
        for process in processes:
            if process.is_alive():
                process.kill()
        errors = sorted(out.glob("*.error"))
        if errors or not (out / "result.pt").exists():
            detail = errors[0].read_text() if errors else "no result"
            raise AuditError(f"a rank of the distributed audit failed:\n{detail}")
        result: T = torch.load(out / "result.pt", weights_only=False)["result"]
        return result
