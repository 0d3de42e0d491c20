"""A checkpoint directory: numbered checkpoint files, the durable sample log and a lock.

Layout of ``checkpoint_dir``::

    checkpoint-000000000007.sona   checkpoints, numbered in the order they were written
    samples.sqlite3 (+ -wal, -shm) the durable sample log (:mod:`sona.sample_log`)
    LOCK                           held (flock) by the one runtime using the directory

Checkpoints are written atomically (temporary file, fsync, rename, fsync of the directory), so
a crash leaves at most a stray temporary file, never a half-written checkpoint. The two newest
checkpoints written or restored are kept; the others are deleted, and the log is truncated
only through the log sequence of the older kept one, so even if the newest checkpoint later
turned out unreadable, the one before it and the log still hold everything.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import IO

from sona.checkpoint import CheckpointState, read
from sona.errors import CheckpointDirError, FormatError

try:  # POSIX advisory locks; elsewhere the directory is simply not locked
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "KEEP",
    "DirectoryLock",
    "checkpoint_name",
    "in_use",
    "list_checkpoints",
    "newest_valid",
    "next_number",
    "remove_temporaries",
]

KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d{12})\.sona$")
_TEMPORARY = re.compile(r"^\.checkpoint-\d{12}\.sona\..*\.tmp$")


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:012d}.sona"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(number, path)`` of the checkpoint files in ``directory``, newest first."""
    found = []
    for entry in directory.iterdir():
        m = _NAME.match(entry.name)
        if m is not None and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found, reverse=True)


def next_number(directory: Path) -> int:
    """One past the highest number of any entry named like a checkpoint, a directory or
    other non-file among them: the next checkpoint must not be written onto one of those."""
    numbers = [int(m.group(1)) for e in directory.iterdir() if (m := _NAME.match(e.name))]
    return max(numbers, default=-1) + 1


def newest_valid(directory: Path) -> tuple[CheckpointState, list[str]]:
    """The newest checkpoint that reads back intact, and why each newer one was passed over."""
    skipped: list[str] = []
    for _, path in list_checkpoints(directory):
        try:
            return read(path), skipped
        except (FormatError, OSError) as exc:
            skipped.append(str(exc))
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    raise FormatError(f"{directory}: no readable checkpoint{detail}")


def remove_temporaries(directory: Path) -> int:
    """Delete temporary files a crash left behind mid-write; how many there were."""
    n = 0
    for entry in directory.iterdir():
        if _TEMPORARY.match(entry.name):
            with contextlib.suppress(OSError):
                entry.unlink()
                n += 1
    return n


def remove_others(directory: Path, keep: set[int]) -> None:
    """Delete every checkpoint file whose number is not in ``keep`` (older checkpoints, and
    unreadable ones a restore passed over)."""
    for number, path in list_checkpoints(directory):
        if number not in keep:
            with contextlib.suppress(OSError):
                path.unlink()


LOCK_FILE = "LOCK"


def in_use(directory: Path) -> bool:
    """Whether a runtime holds ``directory``'s lock (in this process or another), found
    without creating or changing any file: a reader that must not write to the directory
    cannot take the lock itself, but it can tell whether a runtime may be writing meanwhile.
    False when there is no lock file (no runtime ever started there) or locks are not
    supported; True when the lock file cannot be opened, which cannot rule a runtime out.
    The probe holds a shared lock for the moment of the check: a runtime starting in that
    moment is refused as if the directory were in use."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return False
    try:
        fh = open(directory / LOCK_FILE, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    except OSError:
        return True
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


class DirectoryLock:
    """An exclusive advisory lock on ``directory/LOCK``, released on close or process death."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fh: IO[bytes] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "ab")  # noqa: SIM115 - held open for the lock's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise CheckpointDirError(
                    f"{self.path.parent}: checkpoint_dir is in use by another runtime"
                ) from None
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n".encode())
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        fh = self._fh
        self._fh = None
        if fh is not None:
            fh.close()  # closing drops the flock
