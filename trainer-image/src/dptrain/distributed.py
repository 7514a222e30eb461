"""Data-parallel DP-SGD: where the processes come from, and the few collectives the engine needs.

* :class:`Topology` reads the gang's shape from the pod environment (``PET_*``, Kubeflow's conventions, see
  :class:`dptrain_api.DistributedEnv`) or from ``dptrain run --nproc N`` (one machine, N processes).
* :func:`launch` starts the processes with torch.distributed.run's elastic launcher (static rendezvous at
  ``PET_MASTER_ADDR:PET_MASTER_PORT``, this node's rank, no restarts: a failed attempt is the operator's to
  retry, from the checkpoint). Each process runs ``dptrain run`` again and finds itself a worker
  (:func:`is_worker`).
* :class:`Group` is one worker's view of the process group (gloo on CPU, NCCL on CUDA): broadcast from rank 0,
  all-gather, and an agreed OR of a flag. Rank 0 decides (the journal, the checkpoint) and the others follow:
  :func:`from_primary` hands rank 0's result, or its failure, to every rank; :func:`agree` makes every rank fail
  together when one does, so no rank waits forever in a collective for a peer that gave up.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import torch

from dptrain.errors import ConfigurationError, DptrainError, PlanMismatchError
from dptrain_api import DEFAULT_MASTER_PORT, DistributedEnv, ExitCode

__all__ = [
    "SINGLE_PROCESS",
    "Group",
    "PeerFailedError",
    "StopVote",
    "Topology",
    "agree",
    "check_same_plan",
    "from_primary",
    "init_worker",
    "is_worker",
    "launch",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

RENDEZVOUS_TIMEOUT_SECONDS: Final = 900
"""How long node 0 waits for the other pods to join (they may still be pulling the image)."""
_WORKER_MARKER: Final = "TORCHELASTIC_RUN_ID"
"""Set by the elastic agent in every worker's environment (with RANK, WORLD_SIZE, LOCAL_RANK)."""
_PR_SET_PDEATHSIG: Final = 1


class PeerFailedError(DptrainError):
    """Another rank failed: this one stops too, with that rank's exit code (so every rank tells the same story)."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- the gang's shape ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """``nnodes`` machines (pods) × ``nproc_per_node`` processes; this is node ``node_rank``."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def local(cls, nproc: int) -> Topology:
        """One machine, ``nproc`` processes, rendezvous on a free port of 127.0.0.1 (laptops and tests)."""
        if nproc < 1:
            raise ConfigurationError(f"--nproc must be at least 1, got {nproc}")
        return cls(nproc_per_node=nproc, master_port=_free_port())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, nproc: int | None = None) -> Topology:
        """The pod's ``PET_*`` variables, or ``--nproc`` (which must not be combined with them)."""
        env = os.environ if environ is None else environ
        if nproc is not None:
            if env.get(DistributedEnv.NNODES, "").strip():
                raise ConfigurationError(
                    f"--nproc is for one machine, but {DistributedEnv.NNODES} is set (a multi-pod job): use one or "
                    "the other"
                )
            return cls.local(nproc)
        if not env.get(DistributedEnv.NNODES, "").strip():
            return cls()
        topology = cls(
            nnodes=_env_int(env, DistributedEnv.NNODES, 1),
            nproc_per_node=_env_int(env, DistributedEnv.NPROC_PER_NODE, 1),
            node_rank=_env_int(env, DistributedEnv.NODE_RANK, 0),
            master_addr=env.get(DistributedEnv.MASTER_ADDR, "").strip() or "127.0.0.1",
            master_port=_env_int(env, DistributedEnv.MASTER_PORT, DEFAULT_MASTER_PORT),
        )
        topology.check()
        return topology

    def check(self) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ConfigurationError(
                f"{DistributedEnv.NNODES} and {DistributedEnv.NPROC_PER_NODE} must be at least 1, got "
                f"{self.nnodes} and {self.nproc_per_node}"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigurationError(
                f"{DistributedEnv.NODE_RANK}={self.node_rank} is not in [0, {DistributedEnv.NNODES}={self.nnodes})"
            )
        if not 0 < self.master_port < 65536:
            raise ConfigurationError(f"{DistributedEnv.MASTER_PORT}={self.master_port} is not a TCP port")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"{name}={text!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- launching ------------------------------------------------------------------------------------------


def is_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process started by the elastic launcher (torchrun or :func:`launch`)."""
    env = os.environ if environ is None else environ
    return all(env.get(name) for name in (_WORKER_MARKER, DistributedEnv.RANK, DistributedEnv.WORLD_SIZE))


def launch(topology: Topology, command: Sequence[str], *, run_id: str = "dptrain") -> int:
    """Run ``command`` (an executable and its arguments) as this node's ``nproc_per_node`` workers; the exit code.

    torch.distributed.run's launcher (``elastic_launch``): static rendezvous with this node's rank, the workers'
    RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set by the agent, signals forwarded to them (they checkpoint and stop), no
    restarts. The exit code is that of the lowest rank that failed (128 + N for a signal N), 0 when all succeeded.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    executable, *arguments = command
    config = LaunchConfig(
        min_nodes=topology.nnodes,
        max_nodes=topology.nnodes,
        nproc_per_node=topology.nproc_per_node,
        run_id=run_id,
        rdzv_backend="static",
        rdzv_endpoint=f"{topology.master_addr}:{topology.master_port}",
        rdzv_configs={"rank": topology.node_rank, "timeout": RENDEZVOUS_TIMEOUT_SECONDS},
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, executable)(*arguments)
    except ChildFailedError as failed:
        first = min(failed.failures)
        return _exit_status(failed.failures[first].exitcode)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return ExitCode.SUCCEEDED


def _exit_status(code: int) -> int:
    """A process's exit status as a shell reports it (a signal N becomes 128 + N)."""
    return 128 - code if code < 0 else code


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signum`` to this worker when its launcher dies (best effort, Linux only).

    The agent starts workers in their own sessions, so a launcher killed with SIGKILL would leave them
    training on (holding the output folder's lock). SIGTERM makes them checkpoint and stop, as in a pod.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    if os.getppid() == 1:  # the launcher died before prctl: nobody will send the signal
        os.kill(os.getpid(), signum)


# --- one worker's view of the group ----------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Rank ``rank`` of ``world_size`` (``local_rank`` of ``local_world_size`` on its machine), on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def primary(self) -> bool:
        """Global rank 0: it alone owns the journal, the checkpoint, the report, the metrics and the console."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def reports_pod(self) -> bool:
        """The process that writes its pod's termination message: rank 0, or the first process of another pod."""
        return self.local_rank == 0

    def broadcast(self, value: T | None) -> T:
        """Rank 0's ``value`` on every rank (the others pass None). Also a barrier behind rank 0."""
        if not self.distributed:
            assert value is not None
            return value
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (one small all-reduce)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def any_async(self, flag: bool) -> tuple[Any, torch.Tensor]:
        """Start :meth:`any` in the background: (the work to wait for, the tensor that then holds the answer)."""
        import torch.distributed as dist

        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True), tensor

    def close(self) -> None:
        """Leave the process group."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


SINGLE_PROCESS: Final = Group()


class StopVote:
    """Whether any rank was asked to stop, agreed by all: every rank stops after the same step.

    :meth:`poll` is called by every rank at the same points (before each step). Distributed, the OR of the ranks'
    flags is an all-reduce that runs behind the next step (issued at one poll, read at the next), so the vote costs
    no round trip per step; a request is therefore honoured one step later than in a single process, where
    :meth:`poll` returns the flag at once. :meth:`settle` gives the final answer when the loop has ended.
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self.decided = False
        self._pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, flag: bool) -> bool:
        """True (on every rank, at the same call) once the vote says stop; it stays True."""
        if self.decided or not self.group.distributed:
            self.decided = self.decided or flag
            return self.decided
        self.decided = self._collect()
        if not self.decided:
            self._pending = self.group.any_async(flag)
        return self.decided

    def settle(self, flag: bool) -> bool:
        """The final vote, counting ``flag`` too (synchronous); no all-reduce is left running after it."""
        if self.decided or not self.group.distributed:
            self.decided = self.decided or flag
            return self.decided
        self.decided = self._collect() or self.group.any(flag)
        return self.decided

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, tensor = self._pending
        self._pending = None
        work.wait()
        return bool(tensor.item())


def init_worker(environ: Mapping[str, str] | None = None) -> Group:
    """Join the process group the launcher set up: NCCL with one GPU per local rank on CUDA, else gloo on CPU."""
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    rank = _env_int(env, DistributedEnv.RANK, 0)
    world_size = _env_int(env, DistributedEnv.WORLD_SIZE, 1)
    local_rank = _env_int(env, DistributedEnv.LOCAL_RANK, 0)
    local_world_size = _env_int(env, DistributedEnv.LOCAL_WORLD_SIZE, 1)
    device = _worker_device(local_rank, local_world_size)
    die_with_parent()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return Group(
        rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size, device=device
    )


def _worker_device(local_rank: int, local_world_size: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if gpus < local_world_size:
        raise ConfigurationError(
            f"{local_world_size} processes on this machine need a GPU each, but {gpus} are visible; use --nproc "
            f"{gpus} or fewer, or CUDA_VISIBLE_DEVICES= to train on CPU"
        )
    return torch.device("cuda", local_rank)


# --- deciding together --------------------------------------------------------------------------------------


def _describe(error: BaseException) -> tuple[int, str]:
    from dptrain_api import ManifestError

    if isinstance(error, DptrainError):
        code = int(error.exit_code)
    elif isinstance(error, ManifestError):
        code = ExitCode.INVALID_CONFIGURATION
    else:
        code = ExitCode.CRASHED
    return code, f"{type(error).__name__}: {error}"


def from_primary(group: Group, action: Callable[[], T], *, what: str) -> T:
    """Rank 0 runs ``action`` and hands its result to every rank; if it fails, every rank fails with its exit code.

    The result is pickled to the other ranks: keep it small (rank 0 keeps anything else in a closure).
    """
    if not group.distributed:
        return action()
    if not group.primary:
        outcome: tuple[str, Any] = group.broadcast(None)
        if outcome[0] == "failed":
            code, text = outcome[1]
            raise PeerFailedError(f"rank 0 failed {what}: {text}", exit_code=code)
        return outcome[1]  # type: ignore[no-any-return]
    try:
        value = action()
    except Exception as error:
        group.broadcast(("failed", _describe(error)))
        raise
    group.broadcast(("ok", value))
    return value


def agree(group: Group, action: Callable[[], T], *, what: str) -> T:
    """Every rank runs ``action``; if it fails on any rank, it fails on every rank (with the first failure's code)."""
    if not group.distributed:
        return action()
    failure: Exception | None = None
    value: T | None = None
    try:
        value = action()
    except Exception as error:
        failure = error
    outcomes = group.all_gather(None if failure is None else _describe(failure))
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            code, text = outcome
            raise PeerFailedError(f"rank {rank} failed {what}: {text}", exit_code=code)
    return value  # type: ignore[return-value]


def check_same_plan(group: Group, fingerprint: Mapping[str, Any]) -> None:
    """Refuse (:class:`PlanMismatchError`, exit 2, on every rank) unless every rank runs the same plan.

    ``fingerprint``: σ, q, steps, the holdout's σ and releases, the job's hash, the dataset's identity...
    A rank with another plan would add noise or sample at a rate the journal does not charge.
    """
    if not group.distributed:
        return
    prints = group.all_gather(dict(fingerprint))
    reference = prints[0]
    differences = []
    for rank, other in enumerate(prints[1:], start=1):
        changed = sorted(key for key in reference.keys() | other.keys() if reference.get(key) != other.get(key))
        if changed:
            details = ", ".join(f"{key}: {reference.get(key)!r} vs {other.get(key)!r}" for key in changed)
            differences.append(f"rank {rank} ({details})")
    if differences:
        raise PlanMismatchError(
            f"the processes of this job disagree on its plan, rank 0 vs {'; '.join(differences)}: every process must "
            "run the same manifest and reservation; refusing to train (nothing was charged)"
        )
