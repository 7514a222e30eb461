"""The write-ahead privacy journal: every DP-SGD step is charged on disk BEFORE it runs.

File format: ``privacy-journal.jsonl`` in the checkpoint directory, one JSON object per line.

* Line 1 is the header, written atomically when the journal is created (temporary file, fsync,
  rename, fsync of the directory): ``{"type": "header", "version", "jobHash", "mechanisms", "created"}``
  where ``mechanisms`` maps each partition of the dataset ("train": the DP-SGD steps; "holdout": the
  DP releases of held-out metrics) to ``{"noiseMultiplier", "sampleRate", "maxSteps"}``. ``maxSteps``
  is the plan's (or the reservation's) ceiling; the journal refuses to charge beyond it.
* Every other line is an intent, appended with one ``write`` then ``fsync`` before
  :meth:`PrivacyJournal.append_intent` returns: ``{"type": "intent", "seq", "attempt", "partition",
  "noiseMultiplier", "sampleRate", "steps", "startStep", "time"}``. The engine runs the steps (or
  computes the release) only after that, so what ran is always on disk, whatever crashes later.
* ε of the journal: each partition's intents compose sequentially, the two partitions in parallel
  (a record is in one of them only), see ``dptrain_accounting.partitioned_epsilon``.

Torn writes. A crash (power loss, a node dying) in the middle of an append can leave an incomplete
or garbled tail: bytes without a final newline, NUL-filled blocks, or a line that does not parse.
The steps of such an intent never ran if ``fsync`` is honest (``append_intent`` had not returned),
but storage can lie, so the journal assumes the worst: a torn tail is charged as intents for ALL
the steps the header still allows in every partition (``maxSteps`` minus the complete intents) -- the
most any intent could have charged, since the journal never charges beyond ``maxSteps``. A torn write therefore
can only over-charge, and the total never exceeds the plan. Reading a torn journal reports that
charge in memory; :meth:`PrivacyJournal.repair` (run by :meth:`PrivacyJournal.initialise`, i.e.
before any training) makes it durable by atomically replacing the file with the complete lines,
byte for byte, followed by the conservative entry (``"repaired": true``). A crash during the repair
leaves either the old file (still torn, still charged) or the new one, never a file without the
charge. Complete entries are never rewritten or removed. Damage anywhere but the tail (a bad line
followed by a good one) cannot come from a torn append and is refused (:class:`JournalError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from dptrain.errors import CheckpointError, JournalError, PrivacyBudgetError
from dptrain_accounting import MechanismSegment, compact, partitioned_epsilon
from dptrain_api import PodEnv

__all__ = [
    "FORMAT_VERSION",
    "HOLDOUT",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "PARTITIONS",
    "TRAIN",
    "JournalHeader",
    "JournalMirror",
    "JournalView",
    "PrivacyJournal",
    "atomic_write",
    "fsync_directory",
    "summarize",
    "workdir_lock",
]

JOURNAL_NAME: Final = "privacy-journal.jsonl"
LOCK_NAME: Final = ".dptrain.lock"
FORMAT_VERSION: Final = 2
TRAIN: Final = "train"
HOLDOUT: Final = "holdout"
PARTITIONS: Final = (TRAIN, HOLDOUT)

_INTENT_KEYS: Final = ("seq", "attempt", "noiseMultiplier", "sampleRate", "steps", "startStep", "time")


def _now() -> str:
    """The time of an entry, to the minute: per-chunk timestamps to the millisecond would time each chunk's steps,
    and a step takes longer when its Poisson batch is larger (timing is not covered by the guarantee)."""
    return datetime.now(UTC).isoformat(timespec="minutes").replace("+00:00", "Z")


def fsync_directory(directory: Path) -> None:
    """fsync a directory so a file created or renamed in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems refuse fsync on directories; the rename is still atomic
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: temp file in the same directory, fsync, rename, fsync dir."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(path.parent)


def _encode(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()


@dataclass(frozen=True)
class JournalHeader:
    """The journal's first line: whose it is and the most it may ever charge, per partition."""

    job_hash: str
    mechanisms: Mapping[str, MechanismSegment]
    """Partition → (σ, q, the most steps that may ever be charged)."""
    created: str = ""
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "header",
            "version": self.version,
            "jobHash": self.job_hash,
            "mechanisms": {
                partition: {"noiseMultiplier": m.noise_multiplier, "sampleRate": m.sample_rate, "maxSteps": m.steps}
                for partition, m in self.mechanisms.items()
            },
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JournalHeader:
        if d.get("type") != "header":
            raise ValueError("the first line is not a journal header")
        version = d.get("version")
        if version == 1:  # one mechanism, the training partition's
            raw = {TRAIN: d}
        elif version == FORMAT_VERSION:
            raw = d["mechanisms"]
        else:
            raise ValueError(f"unsupported journal version {version!r} (this trainer reads 1 and {FORMAT_VERSION})")
        if not isinstance(raw, Mapping) or TRAIN not in raw or not set(raw) <= set(PARTITIONS):
            raise ValueError(f"the header's mechanisms must be {list(PARTITIONS)}")
        mechanisms = {
            partition: MechanismSegment(m["noiseMultiplier"], m["sampleRate"], m["maxSteps"])
            for partition, m in raw.items()
        }
        job_hash = d["jobHash"]
        if not isinstance(job_hash, str):
            raise ValueError("jobHash must be a string")
        return cls(job_hash=job_hash, mechanisms=mechanisms, created=str(d.get("created", "")), version=int(version))


def _parse_intent(line: bytes) -> dict[str, Any]:
    """One complete intent line, validated (sequence aside); ValueError if it is not one."""
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict) or record.get("type") != "intent":
        raise ValueError("not an intent record")
    missing = [key for key in _INTENT_KEYS if key not in record]
    if missing:
        raise ValueError(f"intent is missing {missing}")
    for key in ("seq", "attempt", "steps", "startStep"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer")
    record.setdefault("partition", TRAIN)  # version 1 intents: DP-SGD steps
    if record["partition"] not in PARTITIONS:
        raise ValueError(f"unknown partition {record['partition']!r}")
    MechanismSegment(record["noiseMultiplier"], record["sampleRate"], record["steps"])  # validates the numbers
    return record


class PrivacyJournal:
    """Reads (on construction) and appends to the journal at ``path``. Not thread-safe; one writer at a time
    (hold :func:`workdir_lock`)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.header: JournalHeader | None = None
        self._entries: list[dict[str, Any]] = []
        self._complete_size = 0  # bytes of the file up to the end of the last valid line
        self._torn: list[dict[str, Any]] = []  # the conservative charges of a torn tail, until repaired
        self._load()

    # --- reading ------------------------------------------------------------------------------------------

    def _load(self) -> None:
        self.header, self._entries, self._complete_size, self._torn = None, [], 0, []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            raise JournalError(f"cannot read the privacy journal {self.path}: {error.strerror}") from None
        if not data:
            raise JournalError(
                f"the privacy journal {self.path} is empty (its header was lost): the privacy spent by earlier "
                "attempts is unknown; refusing to train. Inspect the file; do not delete it to work around this."
            )
        *complete, _remainder = data.split(b"\n")
        if not complete:
            raise JournalError(f"the privacy journal {self.path} has no complete header line; refusing to train")
        try:
            self.header = JournalHeader.from_dict(json.loads(complete[0].decode("utf-8")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise JournalError(
                f"the privacy journal {self.path} has an unreadable header ({error}); refusing"
            ) from None
        offset = len(complete[0]) + 1
        first_bad: int | None = None
        reason = ""
        for number, line in enumerate(complete[1:], start=2):
            try:
                record = _parse_intent(line)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
                if first_bad is None:
                    first_bad, reason = number, str(error)
                continue
            if first_bad is not None:
                raise JournalError(
                    f"the privacy journal {self.path} is damaged at line {first_bad} ({reason}) but has valid entries "
                    "after it: this cannot come from a torn append; refusing to train (ε would be unknown)"
                )
            if record["seq"] != len(self._entries) + 1:
                raise JournalError(
                    f"the privacy journal {self.path} has entry seq {record['seq']} at line {number} where "
                    f"{len(self._entries) + 1} was expected: entries were lost or reordered; refusing to train"
                )
            self._entries.append(record)
            offset += len(line) + 1
        self._complete_size = offset
        if offset < len(data):  # an unterminated or unparsable tail: a torn append
            self._torn = self._conservative_entries()

    def _conservative_entries(self) -> list[dict[str, Any]]:
        """The most a torn intent can have charged: everything the header still allows, in every partition."""
        assert self.header is not None
        last = self._entries[-1] if self._entries else None
        entries: list[dict[str, Any]] = []
        for partition, mechanism in self.header.mechanisms.items():
            remaining = mechanism.steps - self._charged(self._entries, partition)
            if remaining <= 0:
                continue
            entries.append(
                {
                    "type": "intent",
                    "seq": len(self._entries) + len(entries) + 1,
                    "attempt": int(last["attempt"]) if last else 1,
                    "partition": partition,
                    "noiseMultiplier": mechanism.noise_multiplier,
                    "sampleRate": mechanism.sample_rate,
                    "steps": remaining,
                    "startStep": int(last["startStep"]) + int(last["steps"]) if last else 0,
                    "time": _now(),
                    "repaired": True,
                    "note": "conservative charge for a torn append (crash mid-write): all steps the plan still allowed",
                }
            )
        return entries

    @staticmethod
    def _charged(entries: Sequence[Mapping[str, Any]], partition: str) -> int:
        return sum(int(entry["steps"]) for entry in entries if entry.get("partition", TRAIN) == partition)

    @property
    def exists(self) -> bool:
        return self.header is not None

    @property
    def torn(self) -> bool:
        """True if the file ends in a torn append that :meth:`repair` has not yet made durable."""
        return bool(self._torn)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every charge, in order (copies), including the conservative charges of an unrepaired torn tail."""
        return [dict(entry) for entry in [*self._entries, *self._torn]]

    def segments(self, partition: str = TRAIN) -> list[MechanismSegment]:
        """What ``partition`` was charged, one segment per entry (compose with :func:`dptrain_accounting.compact`)."""
        return [
            MechanismSegment(entry["noiseMultiplier"], entry["sampleRate"], entry["steps"])
            for entry in self.entries
            if entry["partition"] == partition
        ]

    def charged(self, partition: str) -> int:
        """Steps (for "holdout": releases) charged to ``partition``, crashed attempts and torn tails included."""
        return self._charged(self.entries, partition)

    @property
    def charged_steps(self) -> int:
        """DP-SGD steps charged (the training partition)."""
        return self.charged(TRAIN)

    @property
    def charged_releases(self) -> int:
        """DP releases of held-out metrics charged (the holdout partition)."""
        return self.charged(HOLDOUT)

    def remaining(self, partition: str = TRAIN) -> int:
        """What the header still allows ``partition`` (0 without a header or without that partition)."""
        if self.header is None or partition not in self.header.mechanisms:
            return 0
        return max(0, self.header.mechanisms[partition].steps - self.charged(partition))

    @property
    def remaining_steps(self) -> int:
        return self.remaining(TRAIN)

    @property
    def attempts(self) -> int:
        """Highest attempt number that charged anything (0 for an empty journal)."""
        return max((int(entry["attempt"]) for entry in self.entries), default=0)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """ε(δ) of everything charged, by ``accountant`` (a valid upper bound for everything that ran): each
        partition composes sequentially, the two in parallel."""
        return partitioned_epsilon(
            compact(self.segments(TRAIN)), compact(self.segments(HOLDOUT)), delta=delta, accountant=accountant
        )

    # --- writing ------------------------------------------------------------------------------------------

    def initialise(self, *, job_hash: str, mechanisms: Mapping[str, MechanismSegment]) -> None:
        """Create the journal (atomically) or check that the existing one belongs to this job and plan.

        ``mechanisms`` maps partitions ("train", and "holdout" when held-out metrics are released) to their
        (σ, q, the most steps ever charged). Repairs a torn tail (durably charging it) before anything else
        can be appended.
        """
        if TRAIN not in mechanisms or not set(mechanisms) <= set(PARTITIONS):
            raise ValueError(f"mechanisms must name the partitions {list(PARTITIONS)} (train at least)")
        wanted = JournalHeader(job_hash=job_hash, mechanisms=dict(mechanisms), created=_now())
        if self.header is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # appeared since we read it: another writer
                raise CheckpointError(
                    f"the privacy journal {self.path} appeared while starting; is another trainer "
                    "using this output directory?"
                )
            atomic_write(self.path, _encode(wanted.to_dict()))
            self._load()
            return
        current = self.header
        if current.job_hash != job_hash:
            raise CheckpointError(
                f"output dir {self.path.parent} holds a different job (its privacy journal was written for another "
                "job spec); use a new --output"
            )
        if dict(current.mechanisms) != dict(wanted.mechanisms):
            raise CheckpointError(
                f"the privacy journal {self.path} was written for the mechanisms {_describe(current.mechanisms)}, "
                f"but the plan now is {_describe(wanted.mechanisms)}; refusing to mix mechanisms in one run "
                "(use a new --output)"
            )
        if self._torn:
            self.repair()

    def repair(self) -> None:
        """Make the conservative charges of a torn tail durable (atomic replace; complete lines kept verbatim)."""
        if not self._torn:
            return
        with self.path.open("rb") as file:
            kept = file.read(self._complete_size)
        if len(kept) != self._complete_size:
            raise JournalError(f"the privacy journal {self.path} shrank while repairing it; refusing")
        atomic_write(self.path, kept + b"".join(_encode(entry) for entry in self._torn))
        self._load()
        if self._torn:
            raise JournalError(f"repairing the privacy journal {self.path} failed; refusing to train")

    def append_intent(self, steps: int, *, attempt: int, start_step: int, partition: str = TRAIN) -> dict[str, Any]:
        """Durably charge ``steps`` of ``partition``'s mechanism (write, flush, fsync) and return the entry.
        Call BEFORE running them.

        Refuses (:class:`PrivacyBudgetError`) to charge beyond the header's ``maxSteps`` for that partition.
        """
        if self.header is None:
            raise JournalError(f"the privacy journal {self.path} has not been initialised")
        if self._torn:
            raise JournalError(f"the privacy journal {self.path} ends in a torn write; repair() it first")
        mechanism = self.header.mechanisms.get(partition)
        if mechanism is None:
            raise PrivacyBudgetError(f"refusing to charge {partition!r}: the journal's plan has no such partition")
        if steps < 1:
            raise ValueError("an intent must charge at least one step")
        if self.charged(partition) + steps > mechanism.steps:
            raise PrivacyBudgetError(
                f"refusing to charge {steps} more {partition} steps: {self.charged(partition)} of the plan's "
                f"{mechanism.steps} are already charged"
            )
        entry = {
            "type": "intent",
            "seq": len(self._entries) + 1,
            "attempt": int(attempt),
            "partition": partition,
            "noiseMultiplier": mechanism.noise_multiplier,
            "sampleRate": mechanism.sample_rate,
            "steps": int(steps),
            "startStep": int(start_step),
            "time": _now(),
        }
        data = _encode(entry)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise JournalError(f"cannot open the privacy journal {self.path}: {error.strerror}") from None
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as error:
            # Part of the line may be on disk: from now on it reads as a torn tail, charged conservatively.
            self._load()
            raise JournalError(
                f"cannot write the privacy journal {self.path}: {error.strerror}; nothing more will run"
            ) from None
        finally:
            os.close(fd)
        self._entries.append(entry)
        self._complete_size += len(data)
        return dict(entry)


class JournalView(Protocol):
    """What the engine reads of a journal: :class:`PrivacyJournal` (rank 0) or a :class:`JournalMirror`."""

    @property
    def exists(self) -> bool: ...

    @property
    def entries(self) -> list[dict[str, Any]]: ...

    @property
    def charged_steps(self) -> int: ...

    @property
    def charged_releases(self) -> int: ...

    @property
    def attempts(self) -> int: ...

    def remaining(self, partition: str = TRAIN) -> int: ...

    def epsilon(self, delta: float, accountant: str = "pld") -> float: ...


@dataclass(frozen=True)
class JournalMirror:
    """Rank 0's journal as it last told the other ranks of a distributed run (they never read or write the file).

    Counts only (a few numbers per chunk, however long the journal grows): the entries stay in rank 0's file.
    ``spent`` is ε as rank 0 composed it, at the plan's δ by the plan's accountant (what :meth:`epsilon` returns).
    """

    charged_steps: int
    charged_releases: int
    attempts: int
    remaining_by_partition: dict[str, int]
    spent: float
    exists: bool = True

    @classmethod
    def of(cls, journal: JournalView, *, delta: float, accountant: str) -> JournalMirror:
        """A snapshot of ``journal`` (composing ε once, on rank 0)."""
        return cls(
            charged_steps=journal.charged_steps,
            charged_releases=journal.charged_releases,
            attempts=journal.attempts,
            remaining_by_partition={partition: journal.remaining(partition) for partition in PARTITIONS},
            spent=journal.epsilon(delta, accountant) if journal.exists else 0.0,
            exists=journal.exists,
        )

    @property
    def entries(self) -> list[dict[str, Any]]:
        """None here: the entries are in rank 0's file (and its report)."""
        return []

    def remaining(self, partition: str = TRAIN) -> int:
        return self.remaining_by_partition.get(partition, 0)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """ε as rank 0 composed it (at the plan's δ and accountant, the only ones the engine asks for)."""
        return self.spent


def _describe(mechanisms: Mapping[str, MechanismSegment]) -> str:
    return ", ".join(
        f"{p}: σ={m.noise_multiplier!r} q={m.sample_rate!r} ≤{m.steps} steps" for p, m in mechanisms.items()
    )


@contextlib.contextmanager
def workdir_lock(workdir: Path, *, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` (one trainer per checkpoint directory).

    A previous trainer may still be stopping (SIGTERM: it finishes its step and checkpoints), so the
    lock is waited for up to ``wait_seconds`` (default: $DPTRAIN_LOCK_WAIT_SECONDS or 60) before a
    CheckpointError."""
    if wait_seconds is None:
        wait_seconds = float(os.environ.get(PodEnv.LOCK_WAIT_SECONDS, "60"))
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise CheckpointError(
                        f"another trainer is using the output directory {workdir} (its lock is held); "
                        "wait for it to stop or use another --output"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def summarize(entries: Sequence[Mapping[str, Any]], partition: str = TRAIN) -> list[dict[str, float | int]]:
    """What ``partition`` was charged, as compacted segments (camelCase dicts), for reports and status."""
    segments = [
        MechanismSegment(e["noiseMultiplier"], e["sampleRate"], e["steps"])
        for e in entries
        if e.get("partition", TRAIN) == partition
    ]
    return [segment.to_dict() for segment in compact(segments)]
