"""Where the trainer runs: how many threads it may use, on which device, with which fresh seeds."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import torch

from dptrain_api import PodEnv

__all__ = ["configure_threads", "cpu_thread_limit", "fresh_generator", "fresh_seed", "select_device"]

logger = logging.getLogger(__name__)

_CGROUP_V2_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA: Final = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD: Final = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _parse_cpus(text: str) -> float | None:
    """A Kubernetes CPU quantity ("2", "500m", "1.5") or a thread count, in CPUs; None if unparsable."""
    text = text.strip()
    try:
        value = float(text[:-1]) / 1000.0 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _cgroup_cpus(cpu_max: Path, v1_quota: Path, v1_period: Path) -> float | None:
    try:
        quota_text, period_text = cpu_max.read_text().split()[:2]
        if quota_text == "max":
            return None
        return int(quota_text) / int(period_text)
    except (OSError, ValueError):
        pass
    try:
        quota = int(v1_quota.read_text())
        period = int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_thread_limit(
    environ: Mapping[str, str] | None = None,
    *,
    cgroup_cpu_max: Path = _CGROUP_V2_CPU_MAX,
    cgroup_v1_quota: Path = _CGROUP_V1_QUOTA,
    cgroup_v1_period: Path = _CGROUP_V1_PERIOD,
) -> int:
    """Threads to use: DPTRAIN_CPU_LIMIT, else OMP_NUM_THREADS, else the cgroup CPU quota, else the CPU affinity.

    Never more than any of the cgroup quota and the CPUs this process may run on either, and a
    fractional limit rounds down (1.5 CPUs get 1 thread): oversubscribed OpenMP threads are very slow.
    """
    env = os.environ if environ is None else environ
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    limit: float | None = None
    for name in (PodEnv.CPU_LIMIT.value, "OMP_NUM_THREADS"):
        text = env.get(name, "")
        if text.strip():
            limit = _parse_cpus(text)
            if limit is None:
                logger.warning("ignoring %s=%r: not a CPU count", name, text)
            else:
                break
    quota = _cgroup_cpus(cgroup_cpu_max, cgroup_v1_quota, cgroup_v1_period)
    threads = available
    for bound in (limit, quota):
        if bound is not None:
            threads = min(threads, math.floor(bound))
    return max(1, threads)


def configure_threads(environ: Mapping[str, str] | None = None, *, processes: int = 1) -> int:
    """Set torch's intra-op threads to :func:`cpu_thread_limit` ÷ ``processes`` (the training processes sharing
    this machine's CPU limit, at least one thread each); returns the count."""
    threads = max(1, cpu_thread_limit(environ) // max(1, processes))
    torch.set_num_threads(threads)
    return threads


def select_device(device: torch.device | str | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fresh_seed() -> int:
    """63 bits from the OS: DP noise and Poisson sampling never come from the job's seed or a checkpoint."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`fresh_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(fresh_seed())
    return generator
