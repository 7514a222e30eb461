"""The operator's accounting workers: child processes with a time limit and a bounded number of slots."""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dptrain_operator.workers import AccountingTimeout, AccountingWorkers, _child


def test_a_call_returns_its_value_and_reraises_its_error() -> None:
    workers = AccountingWorkers(timeout=30)
    assert workers.call(math.sqrt, 16.0) == 4.0
    with pytest.raises(ValueError, match="math domain error"):
        workers.call(math.sqrt, -1.0)


def test_a_call_past_its_cpu_limit_is_stopped() -> None:
    workers = AccountingWorkers(timeout=1)
    started = time.monotonic()
    with pytest.raises(AccountingTimeout, match=r"longer than 1s"):
        workers.call(sum, range(10**12))  # minutes of CPU
    assert time.monotonic() - started < 20


def test_queued_calls_wait_for_a_slot_without_spending_their_time_limit() -> None:
    """Six 1-second calls through one slot take 6 s in all; waiting for a slot spends none of a call's limit."""
    workers = AccountingWorkers(timeout=3, concurrency=1)
    workers.call(math.sqrt, 1.0)  # start the fork server outside the measurement
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda _: workers.call(time.sleep, 1.0), range(6)))
    assert results == [None] * 6
    assert time.monotonic() - started >= 6  # one at a time


def _allocate(mib: int) -> int:
    return len(bytearray(mib * 2**20))


def test_a_call_past_its_memory_limit_is_stopped_not_oom_killed() -> None:
    """Opacus' PRV accountant once took 24 GB for one plan: a child gets MemoryError at its limit instead."""
    workers = AccountingWorkers(timeout=30, memory_mib=256)
    assert workers.call(_allocate, 64) == 64 * 2**20
    with pytest.raises(AccountingTimeout, match="ran out of memory"):
        workers.call(_allocate, 4096)
    assert workers.call(_allocate, 64) == 64 * 2**20  # the next call gets a fresh child


def _burn(seconds: float) -> float:
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        pass
    return seconds


def _start_slowly_then_compute(connection: Any) -> None:
    _burn(1.5)  # a slow start: 1.5 CPU s before the computation
    _child(connection, (1, 0), _burn, (0.3,), {})


def test_the_cpu_limit_counts_the_computation_not_the_childs_start() -> None:
    """multiprocessing re-runs the main module in each child before the computation; on a busy node that start
    once took the whole 1 s limit of a plan that needed 0.1 s (the flaky bypass e2e test)."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_start_slowly_then_compute, args=(sender,))
    process.start()
    sender.close()
    try:
        assert receiver.poll(30)
        assert receiver.recv() == (True, 0.3)
    finally:
        process.join(10)


def test_the_console_script_imports_nothing_heavy() -> None:
    """Each accounting child re-runs the script: it must not import the operator (kopf: ~0.8 CPU s per child)."""
    code = "import sys, dptrain_operator._entry; print(sorted({'kopf', 'kubernetes', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
