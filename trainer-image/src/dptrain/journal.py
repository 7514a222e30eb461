"""The write-ahead privacy journal: every DP-SGD step is charged on disk BEFORE it runs.

File format: ``privacy-journal.jsonl`` in the checkpoint directory, one JSON object per line.

* Line 1 is the header, written atomically when the journal is created (temporary file, fsync,
  rename, fsync of the directory): ``{"type": "header", "version", "jobHash", "noiseMultiplier",
  "sampleRate", "maxSteps", "created"}``. ``maxSteps`` is the plan's (or the reservation's) step
  ceiling; the journal refuses to charge beyond it.
* Every other line is an intent, appended with one ``write`` then ``fsync`` before
  :meth:`PrivacyJournal.append_intent` returns: ``{"type": "intent", "seq", "attempt",
  "noiseMultiplier", "sampleRate", "steps", "startStep", "time"}``. The engine runs the steps only
  after that, so a step that ran is always on disk, whatever crashes later.

Torn writes. A crash (power loss, a node dying) in the middle of an append can leave an incomplete
or garbled tail: bytes without a final newline, NUL-filled blocks, or a line that does not parse.
The steps of such an intent never ran if ``fsync`` is honest (``append_intent`` had not returned),
but storage can lie, so the journal assumes the worst: a torn tail is charged as an intent for ALL
the steps the header still allows (``maxSteps`` minus the complete intents) -- the most any intent
could have charged, since the journal never charges beyond ``maxSteps``. A torn write therefore
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
from typing import Any, Final

from dptrain.errors import CheckpointError, JournalError, PrivacyBudgetError
from dptrain_accounting import MechanismSegment, compact, compute_epsilon

__all__ = [
    "FORMAT_VERSION",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "JournalHeader",
    "PrivacyJournal",
    "atomic_write",
    "fsync_directory",
    "summarize",
    "workdir_lock",
]

JOURNAL_NAME: Final = "privacy-journal.jsonl"
LOCK_NAME: Final = ".dptrain.lock"
FORMAT_VERSION: Final = 1

_INTENT_KEYS: Final = ("seq", "attempt", "noiseMultiplier", "sampleRate", "steps", "startStep", "time")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    """The journal's first line: whose it is and the most it may ever charge."""

    job_hash: str
    noise_multiplier: float
    sample_rate: float
    max_steps: int
    created: str = ""
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "header",
            "version": self.version,
            "jobHash": self.job_hash,
            "noiseMultiplier": self.noise_multiplier,
            "sampleRate": self.sample_rate,
            "maxSteps": self.max_steps,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JournalHeader:
        if d.get("type") != "header":
            raise ValueError("the first line is not a journal header")
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported journal version {version!r} (this trainer reads {FORMAT_VERSION})")
        segment = MechanismSegment(d["noiseMultiplier"], d["sampleRate"], d["maxSteps"])
        job_hash = d["jobHash"]
        if not isinstance(job_hash, str):
            raise ValueError("jobHash must be a string")
        return cls(
            job_hash=job_hash,
            noise_multiplier=segment.noise_multiplier,
            sample_rate=segment.sample_rate,
            max_steps=segment.steps,
            created=str(d.get("created", "")),
        )


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
        self._torn: dict[str, Any] | None = None  # the conservative charge for a torn tail, until repaired
        self._load()

    # --- reading ------------------------------------------------------------------------------------------

    def _load(self) -> None:
        self.header, self._entries, self._complete_size, self._torn = None, [], 0, None
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
            self._torn = self._conservative_entry()

    def _conservative_entry(self) -> dict[str, Any]:
        assert self.header is not None
        complete_steps = sum(int(entry["steps"]) for entry in self._entries)
        last = self._entries[-1] if self._entries else None
        return {
            "type": "intent",
            "seq": len(self._entries) + 1,
            "attempt": int(last["attempt"]) if last else 1,
            "noiseMultiplier": self.header.noise_multiplier,
            "sampleRate": self.header.sample_rate,
            # The most the torn intent can have charged: everything the header still allows.
            "steps": max(0, self.header.max_steps - complete_steps),
            "startStep": int(last["startStep"]) + int(last["steps"]) if last else 0,
            "time": _now(),
            "repaired": True,
            "note": "conservative charge for a torn append (crash mid-write): all steps the plan still allowed",
        }

    @property
    def exists(self) -> bool:
        return self.header is not None

    @property
    def torn(self) -> bool:
        """True if the file ends in a torn append that :meth:`repair` has not yet made durable."""
        return self._torn is not None

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every charge, in order (copies), including the conservative charge of an unrepaired torn tail."""
        entries = [dict(entry) for entry in self._entries]
        if self._torn is not None:
            entries.append(dict(self._torn))
        return entries

    def segments(self) -> list[MechanismSegment]:
        """The charged mechanism, one segment per entry (compose with :func:`dptrain_accounting.compact`)."""
        return [
            MechanismSegment(entry["noiseMultiplier"], entry["sampleRate"], entry["steps"]) for entry in self.entries
        ]

    @property
    def charged_steps(self) -> int:
        return sum(int(entry["steps"]) for entry in self.entries)

    @property
    def remaining_steps(self) -> int:
        """Steps the header still allows (0 without a header)."""
        return 0 if self.header is None else max(0, self.header.max_steps - self.charged_steps)

    @property
    def attempts(self) -> int:
        """Highest attempt number that charged anything (0 for an empty journal)."""
        return max((int(entry["attempt"]) for entry in self.entries), default=0)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """ε(δ) of everything charged, by ``accountant`` (a valid upper bound for every step that ran)."""
        return compute_epsilon(compact(self.segments()), delta=delta, accountant=accountant)

    # --- writing ------------------------------------------------------------------------------------------

    def initialise(self, *, job_hash: str, noise_multiplier: float, sample_rate: float, max_steps: int) -> None:
        """Create the journal (atomically) or check that the existing one belongs to this job and plan.

        Repairs a torn tail (durably charging it) before anything else can be appended.
        """
        wanted = JournalHeader(
            job_hash=job_hash,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            max_steps=int(max_steps),
            created=_now(),
        )
        MechanismSegment(wanted.noise_multiplier, wanted.sample_rate, wanted.max_steps)  # validate
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
        if (current.noise_multiplier, current.sample_rate, current.max_steps) != (
            wanted.noise_multiplier,
            wanted.sample_rate,
            wanted.max_steps,
        ):
            raise CheckpointError(
                f"the privacy journal {self.path} was written for σ={current.noise_multiplier!r}, "
                f"q={current.sample_rate!r}, {current.max_steps} steps, but the plan now is "
                f"σ={wanted.noise_multiplier!r}, q={wanted.sample_rate!r}, {wanted.max_steps} steps; refusing to "
                "mix mechanisms in one run (use a new --output)"
            )
        if self._torn is not None:
            self.repair()

    def repair(self) -> None:
        """Make the conservative charge of a torn tail durable (atomic replace; complete lines kept verbatim)."""
        if self._torn is None:
            return
        with self.path.open("rb") as file:
            kept = file.read(self._complete_size)
        if len(kept) != self._complete_size:
            raise JournalError(f"the privacy journal {self.path} shrank while repairing it; refusing")
        atomic_write(self.path, kept + _encode(self._torn))
        self._load()
        if self._torn is not None:
            raise JournalError(f"repairing the privacy journal {self.path} failed; refusing to train")

    def append_intent(self, segment: MechanismSegment, *, attempt: int, start_step: int) -> dict[str, Any]:
        """Durably charge ``segment`` (write, flush, fsync) and return the entry. Call BEFORE running its steps.

        Refuses (:class:`PrivacyBudgetError`) to charge beyond the header's ``maxSteps`` or another mechanism.
        """
        if self.header is None:
            raise JournalError(f"the privacy journal {self.path} has not been initialised")
        if self._torn is not None:
            raise JournalError(f"the privacy journal {self.path} ends in a torn write; repair() it first")
        if (segment.noise_multiplier, segment.sample_rate) != (self.header.noise_multiplier, self.header.sample_rate):
            raise PrivacyBudgetError(
                f"refusing to charge σ={segment.noise_multiplier!r}, q={segment.sample_rate!r}: the journal's plan is "
                f"σ={self.header.noise_multiplier!r}, q={self.header.sample_rate!r}"
            )
        if segment.steps < 1:
            raise ValueError("an intent must charge at least one step")
        if self.charged_steps + segment.steps > self.header.max_steps:
            raise PrivacyBudgetError(
                f"refusing to charge {segment.steps} more steps: {self.charged_steps} of the plan's "
                f"{self.header.max_steps} are already charged"
            )
        entry = {
            "type": "intent",
            "seq": len(self._entries) + 1,
            "attempt": int(attempt),
            "noiseMultiplier": segment.noise_multiplier,
            "sampleRate": segment.sample_rate,
            "steps": int(segment.steps),
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


@contextlib.contextmanager
def workdir_lock(workdir: Path, *, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` (one trainer per checkpoint directory).

    A previous trainer may still be stopping (SIGTERM: it finishes its step and checkpoints), so the
    lock is waited for up to ``wait_seconds`` (default: $DPTRAIN_LOCK_WAIT_SECONDS or 60) before a
    CheckpointError."""
    if wait_seconds is None:
        wait_seconds = float(os.environ.get("DPTRAIN_LOCK_WAIT_SECONDS", "60"))
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


def summarize(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, float | int]]:
    """The charged mechanism as compacted segments (camelCase dicts), for reports and status."""
    segments = [MechanismSegment(e["noiseMultiplier"], e["sampleRate"], e["steps"]) for e in entries]
    return [segment.to_dict() for segment in compact(segments)]
