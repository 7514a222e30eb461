"""The write-ahead privacy journal: durable before return, never under-charges, even when torn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dptrain import journal as journal_module
from dptrain.errors import CheckpointError, JournalError, PrivacyBudgetError
from dptrain.journal import HOLDOUT, JOURNAL_NAME, TRAIN, PrivacyJournal, workdir_lock
from dptrain_accounting import MechanismSegment, compact, compute_epsilon, partitioned_epsilon

SIGMA = 1.3
RATE = 0.05
MAX_STEPS = 40
JOB = "a" * 64
HOLDOUT_SIGMA = 4.0
RELEASES = 3


def _mechanisms(max_steps: int = MAX_STEPS, *, releases: int = 0) -> dict[str, MechanismSegment]:
    mechanisms = {TRAIN: MechanismSegment(SIGMA, RATE, max_steps)}
    if releases:
        mechanisms[HOLDOUT] = MechanismSegment(HOLDOUT_SIGMA, 1.0, releases)
    return mechanisms


def _journal(tmp_path: Path, *, max_steps: int = MAX_STEPS, releases: int = 0) -> PrivacyJournal:
    journal = PrivacyJournal(tmp_path / JOURNAL_NAME)
    journal.initialise(job_hash=JOB, mechanisms=_mechanisms(max_steps, releases=releases))
    return journal


def _charge(journal: PrivacyJournal, steps: int, *, attempt: int = 1, start: int = 0) -> dict[str, object]:
    return journal.append_intent(steps, attempt=attempt, start_step=start)


def test_new_journal_has_an_atomic_header_and_charges_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced_dirs: list[Path] = []
    real = journal_module.fsync_directory

    def spy(directory: Path) -> None:
        synced_dirs.append(Path(directory))
        real(directory)

    monkeypatch.setattr(journal_module, "fsync_directory", spy)
    journal = _journal(tmp_path)
    lines = (tmp_path / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) == 1
    header = json.loads(lines[0])
    assert header["type"] == "header"
    assert header["version"] == 2
    assert header["mechanisms"] == {"train": {"noiseMultiplier": SIGMA, "sampleRate": RATE, "maxSteps": MAX_STEPS}}
    assert synced_dirs == [tmp_path]  # the directory entry of the new file is durable
    assert journal.entries == []
    assert journal.charged_steps == 0
    assert journal.epsilon(1e-5) == 0.0
    assert [p.name for p in tmp_path.iterdir()] == [JOURNAL_NAME]  # no temp file left behind


def test_append_is_written_and_fsynced_before_it_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _journal(tmp_path)
    path = tmp_path / JOURNAL_NAME
    observed: list[int] = []
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        # At fsync time the whole line must already be in the file (one write, then fsync).
        observed.append(len(path.read_text().splitlines()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    entry = _charge(journal, 5)
    assert observed == [2]  # fsync ran exactly once, after the line was written
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert entry["seq"] == 1
    assert entry["steps"] == 5
    assert entry["startStep"] == 0
    on_disk = PrivacyJournal(path)
    assert on_disk.charged_steps == 5
    assert on_disk.entries[0]["noiseMultiplier"] == SIGMA
    assert set(on_disk.entries[0]) >= {"seq", "attempt", "partition", "noiseMultiplier", "sampleRate", "steps", "time"}
    assert on_disk.entries[0]["partition"] == "train"


def test_epsilon_is_the_composition_of_every_entry(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    _charge(journal, 10, attempt=1, start=0)
    _charge(journal, 10, attempt=1, start=10)
    _charge(journal, 7, attempt=2, start=10)  # a crashed chunk is charged again by the next attempt
    assert journal.charged_steps == 27
    assert journal.attempts == 2
    assert compact(journal.segments()) == [MechanismSegment(SIGMA, RATE, 27)]
    expected = compute_epsilon([MechanismSegment(SIGMA, RATE, 27)], delta=1e-5)
    assert journal.epsilon(1e-5) == expected
    assert PrivacyJournal(tmp_path / JOURNAL_NAME).epsilon(1e-5, "rdp") == compute_epsilon(
        [MechanismSegment(SIGMA, RATE, 27)], delta=1e-5, accountant="rdp"
    )


def test_never_charges_beyond_the_plan_or_another_mechanism(tmp_path: Path) -> None:
    journal = _journal(tmp_path, max_steps=12)
    _charge(journal, 10)
    with pytest.raises(PrivacyBudgetError, match="already charged"):
        _charge(journal, 3)
    with pytest.raises(PrivacyBudgetError, match="no such partition"):
        journal.append_intent(1, attempt=1, start_step=10, partition=HOLDOUT)
    _charge(journal, 2)
    assert journal.charged_steps == 12
    assert journal.remaining_steps == 0
    assert PrivacyJournal(tmp_path / JOURNAL_NAME).charged_steps == 12


def test_complete_entries_are_never_rewritten(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    path = tmp_path / JOURNAL_NAME
    snapshots = [path.read_bytes()]
    for chunk in range(4):
        _charge(journal, 5, start=chunk * 5)
        current = path.read_bytes()
        assert current.startswith(snapshots[-1])  # append-only
        snapshots.append(current)


def _torn_variants(tmp_path: Path) -> list[tuple[str, bytes]]:
    """Tails a crash mid-append can leave: every prefix of the next line, NUL blocks, garbled lines."""
    probe = _journal(tmp_path / "probe")
    _charge(probe, 5)
    line = (tmp_path / "probe" / JOURNAL_NAME).read_bytes().splitlines(keepends=True)[-1]
    variants = [(f"prefix-{k}", line[:k]) for k in range(1, len(line))]  # includes the line without its newline
    variants += [
        ("nul-block", b"\0" * 512),
        ("nul-line", b"\0" * 100 + b"\n"),
        ("garbled-line", line[:20] + b"\0" * 30 + line[50:]),
        ("prefix-then-nul", line[:40] + b"\0" * 4096),
    ]
    return variants


def test_a_torn_tail_is_charged_with_every_step_the_plan_still_allowed(tmp_path: Path) -> None:
    for name, tail in _torn_variants(tmp_path):
        workdir = tmp_path / name
        journal = _journal(workdir)
        _charge(journal, 10)
        _charge(journal, 10, start=10)
        path = workdir / JOURNAL_NAME
        with path.open("ab") as file:
            file.write(tail)
        reread = PrivacyJournal(path)
        assert reread.torn, name
        # The torn intent could have charged at most the remaining 20 steps: all of them are charged.
        assert reread.charged_steps == MAX_STEPS, name
        assert reread.entries[-1]["repaired"] is True
        assert reread.epsilon(1e-5) == compute_epsilon([MechanismSegment(SIGMA, RATE, MAX_STEPS)], delta=1e-5)
        # Never below what any real (complete) next intent could have charged.
        assert reread.charged_steps >= 20 + 5
        with pytest.raises(JournalError, match="torn"):
            _charge(reread, 1)


def test_repair_makes_the_conservative_charge_durable_and_keeps_complete_lines(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    _charge(journal, 10)
    path = tmp_path / JOURNAL_NAME
    complete = path.read_bytes()
    with path.open("ab") as file:
        file.write(b'{"type":"intent","seq":2,"att')
    torn = PrivacyJournal(path)
    torn.initialise(job_hash=JOB, mechanisms=_mechanisms())  # repairs
    repaired = path.read_bytes()
    assert repaired.startswith(complete)
    last = json.loads(repaired.splitlines()[-1])
    assert last["repaired"] is True
    assert last["steps"] == MAX_STEPS - 10
    assert last["seq"] == 2
    again = PrivacyJournal(path)
    assert not again.torn
    assert again.charged_steps == MAX_STEPS
    assert again.remaining_steps == 0


def test_a_crash_during_repair_leaves_the_torn_file_and_its_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _journal(tmp_path)
    _charge(journal, 10)
    path = tmp_path / JOURNAL_NAME
    with path.open("ab") as file:
        file.write(b'{"type":"intent","seq":2,"attempt":1,"noiseMult')
    before = path.read_bytes()

    def crash(*_args: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        PrivacyJournal(path).repair()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert PrivacyJournal(path).charged_steps == MAX_STEPS
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_NAME]


def test_a_failed_write_reads_back_as_torn_and_stays_charged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _journal(tmp_path)
    _charge(journal, 10)
    real_write = os.write

    def half_write(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data)[:17])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_write)
    with pytest.raises(JournalError, match="nothing more will run"):
        _charge(journal, 5, start=10)
    monkeypatch.undo()
    assert journal.torn
    assert PrivacyJournal(tmp_path / JOURNAL_NAME).charged_steps == MAX_STEPS


def test_damage_before_valid_entries_is_refused(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    _charge(journal, 5)
    _charge(journal, 5, start=5)
    path = tmp_path / JOURNAL_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"garbage\n" + lines[2])
    with pytest.raises(JournalError, match="damaged at line 2"):
        PrivacyJournal(path)
    # A valid-JSON line with a wrong sequence number is damage too, not a torn append.
    path.write_bytes(lines[0] + lines[2] + lines[1])
    with pytest.raises(JournalError):
        PrivacyJournal(path)


@pytest.mark.parametrize("content", [b"", b"not json\n", b'{"type":"header","version":1}\n', b'{"type":"head'])
def test_a_journal_without_a_valid_header_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(content)
    with pytest.raises(JournalError):
        PrivacyJournal(path)


def test_another_jobs_or_another_plans_journal_is_refused(tmp_path: Path) -> None:
    _charge(_journal(tmp_path), 5)
    path = tmp_path / JOURNAL_NAME
    with pytest.raises(CheckpointError, match="different job"):
        PrivacyJournal(path).initialise(job_hash="b" * 64, mechanisms=_mechanisms())
    with pytest.raises(CheckpointError, match="plan now is"):
        PrivacyJournal(path).initialise(job_hash=JOB, mechanisms=_mechanisms(41))
    with pytest.raises(CheckpointError, match="plan now is"):
        PrivacyJournal(path).initialise(job_hash=JOB, mechanisms=_mechanisms(releases=2))
    PrivacyJournal(path).initialise(job_hash=JOB, mechanisms=_mechanisms())  # same: fine
    assert PrivacyJournal(path).charged_steps == 5


def test_an_uninitialised_journal_refuses_to_charge(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="not been initialised"):
        PrivacyJournal(tmp_path / JOURNAL_NAME).append_intent(1, attempt=1, start_step=0)


def test_one_trainer_per_directory(tmp_path: Path) -> None:
    with (
        workdir_lock(tmp_path),
        pytest.raises(CheckpointError, match="another trainer"),
        workdir_lock(tmp_path, wait_seconds=0.3),
    ):
        pass
    with workdir_lock(tmp_path):  # released on exit
        pass


_WRITER = textwrap.dedent(
    """
    import sys
    from dptrain.journal import PrivacyJournal
    from dptrain_accounting import MechanismSegment
    journal = PrivacyJournal(sys.argv[1])
    journal.initialise(job_hash="a" * 64, mechanisms={"train": MechanismSegment(1.3, 0.05, 100000)})
    for i in range(100000):
        journal.append_intent(1, attempt=1, start_step=i)
        print(i + 1, flush=True)  # acknowledged: the caller would now run this step
    """
)


def test_every_acknowledged_intent_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    acknowledged = 0
    deadline = time.monotonic() + 60
    while acknowledged < 200 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert acknowledged >= 200, process.stderr.read() if process.stderr else ""
    journal = PrivacyJournal(path)
    # Every step the caller was told it could run is charged (kill -9 cannot lose an fsynced append).
    assert journal.charged_steps >= acknowledged
    if journal.torn:
        assert journal.charged_steps == 100000  # a torn tail takes the whole remaining budget


def test_the_holdout_partition_composes_in_parallel_with_training(tmp_path: Path) -> None:
    journal = _journal(tmp_path, releases=RELEASES)
    _charge(journal, 10)
    journal.append_intent(1, attempt=1, start_step=10, partition=HOLDOUT)
    _charge(journal, 10, start=10)
    journal.append_intent(1, attempt=1, start_step=20, partition=HOLDOUT)
    assert (journal.charged_steps, journal.charged_releases) == (20, 2)
    train, holdout = MechanismSegment(SIGMA, RATE, 20), MechanismSegment(HOLDOUT_SIGMA, 1.0, 2)
    expected = partitioned_epsilon([train], [holdout], delta=1e-5)
    assert (
        journal.epsilon(1e-5)
        == expected
        == max(compute_epsilon([train], delta=1e-5), compute_epsilon([holdout], delta=1e-5))
    )
    journal.append_intent(1, attempt=1, start_step=20, partition=HOLDOUT)
    with pytest.raises(PrivacyBudgetError, match="holdout"):
        journal.append_intent(1, attempt=1, start_step=20, partition=HOLDOUT)  # only the planned releases


def test_a_torn_tail_charges_every_partition_in_full(tmp_path: Path) -> None:
    journal = _journal(tmp_path, releases=RELEASES)
    _charge(journal, 10)
    journal.append_intent(1, attempt=1, start_step=10, partition=HOLDOUT)
    path = tmp_path / JOURNAL_NAME
    with path.open("ab") as file:
        file.write(b'{"type":"intent","seq":3,"partit')
    torn = PrivacyJournal(path)
    assert (torn.charged_steps, torn.charged_releases) == (MAX_STEPS, RELEASES)
    torn.repair()
    assert (PrivacyJournal(path).charged_steps, PrivacyJournal(path).charged_releases) == (MAX_STEPS, RELEASES)


def test_a_version_1_journal_reads_as_the_training_partition(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    header = {"type": "header", "version": 1, "jobHash": JOB, "noiseMultiplier": SIGMA, "sampleRate": RATE,
              "maxSteps": MAX_STEPS, "created": ""}  # fmt: skip
    intent = {"type": "intent", "seq": 1, "attempt": 1, "noiseMultiplier": SIGMA, "sampleRate": RATE, "steps": 5,
              "startStep": 0, "time": ""}  # fmt: skip
    path.write_text(json.dumps(header) + "\n" + json.dumps(intent) + "\n")
    journal = PrivacyJournal(path)
    assert (journal.charged_steps, journal.charged_releases, journal.remaining_steps) == (5, 0, MAX_STEPS - 5)
