"""Planning and ledger accounting run in child processes, each with a CPU-time limit.

Calibrating σ and composing a ledger are CPU-bound numpy work. In the operator's own process they would hold
the GIL for as long as they take, and kopf's event loop (watches, /healthz, other jobs) would wait behind them:
one job planning tens of millions of steps once kept /healthz from answering for 30 s. A child process per
call (forked from a server that has the accounting libraries loaded, so it starts in milliseconds) runs the
maths; the handler thread only waits on a pipe. The limit is CPU seconds (RLIMIT_CPU, the kernel stops the
child), not wall time, so a busy node never fails a plan that would have fitted; a wall-clock backstop of ten
times the limit catches a child that waits instead of computing. Memory is bounded too (RLIMIT_AS, the child's
address space beyond what it inherited): Opacus' PRV accountant once took 24 GB for a plan of 866k steps, and a
child the kernel OOM-kills takes the operator's neighbours with it. At most ``concurrency`` children run at once
(one per CPU by default): twenty jobs submitted together queue for a slot instead of sharing two cores twenty
ways.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final, TypeVar

__all__ = ["AccountingTimeout", "AccountingWorkers"]

T = TypeVar("T")
_PRELOAD: Final = ["dptrain_accounting", "dp_accounting.pld.pld_privacy_accountant", "dp_accounting.rdp"]


class AccountingTimeout(Exception):  # noqa: N818 - it is the outcome "timed out", not a bug
    """The computation did not finish within its time or memory limit (its process was stopped)."""


def _address_space() -> int:
    """This process's current virtual memory size in bytes (what a fork inherits)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _child(
    connection: Connection,
    limits: tuple[int, int],
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    cpu_seconds, memory_bytes = limits
    # RLIMIT_CPU counts the process's whole CPU time: the limit is what the computation may use on top of what
    # starting the child took (multiprocessing re-runs the main module in every child: the console script, kept
    # light by dptrain_operator._entry), so that a slow start can never fail a plan that fits.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))  # SIGXCPU at the soft limit
    if memory_bytes > 0:
        limit = _address_space() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # allocations beyond fail with MemoryError
    try:
        connection.send((True, function(*args, **kwargs)))
    except MemoryError:
        connection.send((False, AccountingTimeout(f"{getattr(function, '__name__', function)} ran out of memory")))
    except BaseException as error:  # the parent re-raises it
        connection.send((False, error))
    finally:
        connection.close()


class AccountingWorkers:
    """``call(fn, *args, **kwargs)`` runs ``fn`` in a fresh child process and returns its result (or re-raises its
    exception); past ``timeout`` CPU seconds, or ``memory_mib`` MiB of new address space, the child is stopped and
    :class:`AccountingTimeout` raised (0: no memory limit). ``in_process=True`` calls ``fn`` directly (unit tests)."""

    def __init__(
        self, *, timeout: float, memory_mib: int = 1024, concurrency: int | None = None, in_process: bool = False
    ) -> None:
        self.timeout = timeout
        self.memory_bytes = memory_mib * 2**20
        self.in_process = in_process
        self.concurrency = concurrency or len(os.sched_getaffinity(0)) or 1
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._context: Any = None
        self._lock = threading.Lock()

    def _start_context(self) -> Any:
        with self._lock:
            if self._context is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(_PRELOAD)
                self._context = context
            return self._context

    def call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if self.in_process:
            return function(*args, **kwargs)
        context = self._start_context()
        with self._slots:
            return self._run(context, function, args, kwargs)

    def _run(self, context: Any, function: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        name = getattr(function, "__name__", function)
        receiver, sender = context.Pipe(duplex=False)
        cpu_seconds = max(1, math.ceil(self.timeout))
        process = context.Process(
            target=_child, args=(sender, (cpu_seconds, self.memory_bytes), function, args, kwargs), daemon=True
        )
        process.start()
        sender.close()
        try:
            if not receiver.poll(10 * self.timeout + 30):
                process.kill()
                raise AccountingTimeout(f"{name} did not finish in {10 * self.timeout + 30:g}s of wall time")
            ok, value = receiver.recv()
        except EOFError:
            process.join(timeout=5)
            if process.exitcode == -signal.SIGXCPU:
                raise AccountingTimeout(f"{name} took longer than {self.timeout:g}s") from None
            raise RuntimeError(f"the accounting worker died without an answer (exit {process.exitcode})") from None
        finally:
            receiver.close()
            process.join(timeout=5)
        if not ok:
            raise value
        result: T = value
        return result
