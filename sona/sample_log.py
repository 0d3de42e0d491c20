"""The durable sample log: every accepted sample, on disk before its caller hears back.

An embedded SQLite database (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: a
committed transaction survives a killed process and a power cut. Rows are keyed by the runtime's
sample id, which is also the log sequence number: a checkpoint records the highest id whose
effect it holds, restore replays the rows after it, and rows are deleted only below a
checkpoint that was verified on disk.

A second table, ``outcomes``, records the samples that were logged but then settled without
being handled (dropped, dead-lettered, failed at a give-up): their callers were told so, and a
restore must not replay them. It is created with its first row, so a log in which nothing was
dropped has the layout older versions wrote and read.

Each row also holds a CRC-32 of its id and record (column ``crc``), checked when the row is read
back: SQLite checks the pages of its write-ahead log, but not the rows of its database file, so
without it a flipped bit in a stored sample would be replayed as a different sample. Rows that
versions before it wrote have none (NULL) and are read unchecked; opening such a log to write
adds the column.

Writes never run on the event loop. :class:`LogWriter` collects the samples submitted while the
previous transaction was being written and commits them together in a worker thread (group
commit), so one fsync is shared by every concurrent submitter; each sample is handed on to the
Instant loop only once its transaction has committed.

Readers that must not write (a restore, ``sona inspect``) open the log with
:meth:`SampleLog.reading`, which leaves every file of it as it was, even the ``-shm`` index a
plain read-only SQLite connection writes to.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from sona.checkpoint_store import in_use
from sona.errors import FormatError
from sona.lora_config import TargetModule
from sona.sample import TrainingSample
from sona.sample_codec import decode_sample, encode_sample

__all__ = ["LOG_FILE", "LogWriter", "SampleLog", "SampleLogError", "log_summary"]

LOG_FILE = "samples.sqlite3"
_FORMAT = "sona.sample_log/1"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS samples "
    "(id INTEGER PRIMARY KEY, record BLOB NOT NULL, crc INTEGER)",
)
_ADD_CRC = "ALTER TABLE samples ADD COLUMN crc INTEGER"
_TABLES = frozenset({"meta", "samples"})
_OUTCOMES_TABLE = (
    "CREATE TABLE IF NOT EXISTS outcomes (id INTEGER PRIMARY KEY, outcome TEXT NOT NULL)"
)
# logs written before outcomes were recorded have no such table
_HAS_OUTCOMES = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outcomes'"
OUTCOMES = frozenset({"dropped", "dead_lettered"})
_TRUNCATED = "truncated_through"  # meta key: every row with an id at or below it is deleted
_RECORD_TRUNCATION = (  # never lowered (meta values are TEXT: compare them as numbers)
    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
    "value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))"
)
_T = TypeVar("_T")


class SampleLogError(OSError):
    """The durable log could not be written: the samples concerned were not accepted."""


class SampleLog:
    """Samples keyed by sample id in one SQLite file; thread-safe (one connection, a lock).

    Opening an existing log checks its format and widths; a file that is not such a log is
    refused with a :class:`FormatError` naming it. :meth:`reading` opens one only to read it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        in_features: int,
        out_features: int,
        _connection: sqlite3.Connection | None = None,
    ) -> None:
        self.path = Path(path)
        self.in_features = in_features
        self.out_features = out_features
        self.read_only = _connection is not None
        self._lock = threading.Lock()
        if _connection is None:
            try:
                _connection = sqlite3.connect(
                    str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
                )
            except sqlite3.Error as exc:
                raise FormatError(f"{self.path}: cannot open the sample log: {exc}") from None
        self._db = _connection
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    @contextlib.contextmanager
    def reading(
        cls, path: str | Path, *, in_features: int, out_features: int
    ) -> Iterator[SampleLog]:
        """The existing log at ``path``, opened only to read it: no file beside it is created,
        changed or removed (see :func:`_read_only`), so a restore that reads a directory, or
        a runtime restored but never started, leaves that directory as it found it. Errors
        name ``path``. Its methods that write raise :class:`SampleLogError`."""
        path = Path(path)
        with _read_only(path) as db:
            log = cls(path, in_features=in_features, out_features=out_features, _connection=db)
            try:
                yield log
            finally:
                log.close()

    def _setup(self) -> None:
        """Check the schema before changing anything: a file that is not a sona sample log, or
        one that lost a table, is refused as it is, never repaired into an empty log (which
        would make a restore replay nothing). Read-only, a file without the tables (an empty
        one) is refused too: there is no log to read in it."""
        try:
            tables = self._tables()
            if (tables or self.read_only) and not tables >= _TABLES:
                missing = " and ".join(sorted(_TABLES - tables))
                raise FormatError(
                    f"{self.path}: not a sona sample log, or a damaged one: no {missing} table"
                )
            mode = None  # a reader leaves the journal mode as it is
            if not self.read_only:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._db.execute("PRAGMA synchronous=FULL")
                if not tables or self._blank():
                    self._initialise()
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            self._checked = self._has_crc()
        except sqlite3.Error as exc:
            raise FormatError(f"{self.path}: not a usable sona sample log: {exc}") from None
        if mode is not None and str(mode).lower() != "wal":
            raise FormatError(f"{self.path}: could not switch the sample log to WAL mode")
        if meta.get("format") != _FORMAT:
            raise FormatError(f"{self.path}: not a sona sample log (format {meta.get('format')!r})")
        widths = (meta.get("in_features"), meta.get("out_features"))
        if widths != (str(self.in_features), str(self.out_features)):
            raise FormatError(
                f"{self.path}: the log holds samples of widths {widths}, this runtime uses "
                f"({self.in_features}, {self.out_features})"
            )
        if not self._checked and not self.read_only:  # a log older versions wrote
            try:
                self._db.execute(_ADD_CRC)  # one statement: a transaction of its own
            except sqlite3.Error as exc:
                raise FormatError(
                    f"{self.path}: cannot add CRCs to the sample log: {exc}"
                ) from None
            self._checked = True

    def _has_crc(self) -> bool:
        columns = self._db.execute("PRAGMA table_info(samples)").fetchall()
        return any(column[1] == "crc" for column in columns)

    def _tables(self) -> set[str]:
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {str(name) for (name,) in rows}

    def _blank(self) -> bool:
        """Both tables and nothing in them: older versions created the tables before writing
        the metadata, so a kill in between left this. It holds nothing: claim it as new."""
        row = self._db.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM meta) AND NOT EXISTS (SELECT 1 FROM samples)"
        ).fetchone()
        return bool(row[0])

    def _initialise(self) -> None:
        """Tables and metadata in one transaction, so a killed process leaves either an empty
        file or a complete log, never tables without their metadata."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [
                    ("format", _FORMAT),
                    ("in_features", str(self.in_features)),
                    ("out_features", str(self.out_features)),
                ],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    # ------------------------------------------------------------------ metadata
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._write_sql(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(key, value)]
            )

    # ------------------------------------------------------------------ samples
    def append(
        self, rows: Sequence[tuple[int, bytes]], outcomes: Sequence[tuple[int, str]] = ()
    ) -> None:
        """Commit ``(sample id, record)`` rows and ``(sample id, outcome)`` records (see
        :data:`OUTCOMES`) in one durable transaction; ids already present keep their record
        (a replayed sample logged again) and their first outcome."""
        if not rows and not outcomes:
            return
        statements: list[tuple[str, Sequence[tuple[Any, ...]] | None]] = []
        if rows:
            statements.append(
                (
                    "INSERT OR IGNORE INTO samples (id, record, crc) VALUES (?, ?, ?)",
                    [(sid, record, record_crc(sid, record)) for sid, record in rows],
                )
            )
        if outcomes:
            statements.append((_OUTCOMES_TABLE, None))
            statements.append(
                ("INSERT OR IGNORE INTO outcomes (id, outcome) VALUES (?, ?)", outcomes)
            )
        with self._lock:
            self._write_many(statements)

    def append_samples(
        self, items: Sequence[tuple[int, TrainingSample, TargetModule | None]]
    ) -> None:
        self.append([(sid, encode_sample(s, m)) for sid, s, m in items])

    def records_after(self, sequence: int) -> list[tuple[int, bytes]]:
        """Raw rows with an id above ``sequence``, in id order.

        Rows no runtime writes are refused with a FormatError naming the file and row, whatever
        ``sequence`` is: an id below 1 (sample ids start at 1, so the row was never a sample
        anyone was told is logged; passing over it, as an id at or below ``sequence`` is, would
        hide that the log was altered), a record SQLite does not hold as a BLOB (text or a
        number is not the bytes that were logged, and would reach the decoder as something
        else, or not at all for text that is not UTF-8), and a row whose CRC does not match.
        """
        crc = "crc" if self._checked else "NULL"
        with self._lock:
            rows = self._rows(
                f"SELECT id, typeof(record), CAST(record AS BLOB), {crc} FROM samples "
                "WHERE id > ? OR id < 1 ORDER BY id",
                (int(sequence),),
            )
        out = []
        for sid, kind, record, stored in rows:
            if sid < 1:
                raise FormatError(
                    f"{self.path} (sample {sid}): not a sample id (sample ids start at 1)"
                )
            if kind != "blob":
                raise FormatError(
                    f"{self.path} (sample {sid}): the record is stored as SQLite {kind}, "
                    "expected a blob"
                )
            if stored is not None and stored != record_crc(sid, record):
                raise FormatError(
                    f"{self.path} (sample {sid}): the row does not match its CRC; the log is "
                    "damaged"
                )
            out.append((int(sid), bytes(record)))
        return out

    def samples_after(
        self, sequence: int, *, modules: Collection[TargetModule]
    ) -> list[tuple[int, TrainingSample, TargetModule | None]]:
        """Decoded rows above ``sequence``; a FormatError naming the file and row if any is bad.

        A sample naming a module outside ``modules`` (the adapter's target modules) is bad too,
        as it is in a checkpoint: the runtime refuses such a module at the call, so no sample
        naming one was ever logged.
        """
        out = []
        for sid, record in self.records_after(sequence):
            what = f"{self.path} (sample {sid})"
            sample, module = decode_sample(
                record, in_features=self.in_features, out_features=self.out_features, what=what
            )
            if module is not None and module not in modules:
                raise FormatError(f"{what}: names module {module.value}, not targeted")
            out.append((sid, sample, module))
        return out

    def outcomes_after(self, sequence: int) -> dict[int, str]:
        """The recorded outcomes of samples with an id above ``sequence``; a FormatError naming
        the file and row for an id below 1 or an outcome no runtime records."""
        with self._lock:
            if not self._rows(_HAS_OUTCOMES, ()):
                return {}
            rows = self._rows(
                "SELECT id, outcome FROM outcomes WHERE id > ? OR id < 1 ORDER BY id",
                (int(sequence),),
            )
        out = {}
        for sid, outcome in rows:
            if sid < 1:
                raise FormatError(
                    f"{self.path} (outcome of sample {sid}): not a sample id (they start at 1)"
                )
            if outcome not in OUTCOMES:
                raise FormatError(f"{self.path} (sample {sid}): unknown outcome {outcome!r}")
            out[sid] = str(outcome)
        return out

    def truncated_through(self) -> int:
        """The highest id through which rows have been deleted (0 if none, or for a log
        written before this was recorded): a checkpoint whose log sequence is below it needs
        rows the log no longer holds."""
        value = self.get_meta(_TRUNCATED)
        if value is None:
            return 0
        try:
            return int(value)
        except ValueError:
            raise FormatError(f"{self.path}: {_TRUNCATED} is {value!r}, not an id") from None

    def truncate_through(self, sequence: int, *, chunk: int = 256) -> int:
        """Delete the rows (and recorded outcomes) with an id at or below ``sequence``; how
        many rows went. Each transaction also records how far the log is truncated
        (:meth:`truncated_through`), so a restore can tell when it lacks rows it needs.

        In transactions of at most ``chunk`` ids (about 3 ms each for 2 KB rows, against ~70 ms
        for 4096), pausing between them, so appends (and the submitters waiting on them) never
        wait behind a long delete. Call it from a worker thread.
        """
        removed = 0
        first_pass = True
        while True:
            if not first_pass:
                time.sleep(0.001)  # let a waiting append take the lock
            first_pass = False
            with self._lock:
                try:
                    outcomes = self._db.execute(_HAS_OUTCOMES).fetchone() is not None
                    row = self._db.execute(
                        "SELECT MIN(m) FROM (SELECT MIN(id) AS m FROM samples UNION ALL "
                        "SELECT MIN(id) FROM outcomes)"
                        if outcomes
                        else "SELECT MIN(id) FROM samples"
                    ).fetchone()
                    first = row[0] if row else None
                    if first is None or first > sequence:
                        return removed
                    upto = min(int(sequence), int(first) + chunk - 1)
                    self._db.execute("BEGIN IMMEDIATE")
                    cur = self._db.execute("DELETE FROM samples WHERE id <= ?", (upto,))
                    if outcomes:
                        self._db.execute("DELETE FROM outcomes WHERE id <= ?", (upto,))
                    self._db.execute(_RECORD_TRUNCATION, (_TRUNCATED, upto))
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._rollback()
                    raise SampleLogError(f"{self.path}: truncating the log failed: {exc}") from None
                removed += int(cur.rowcount)

    def last_id(self) -> int:
        with self._lock:
            (last,) = self._rows("SELECT MAX(id) FROM samples", ())[0]
        return 0 if last is None else int(last)

    def highest_id(self) -> int:
        """The highest sample id the log holds a row or a recorded outcome of; 0 if none."""
        with self._lock:
            (last,) = self._rows("SELECT MAX(id) FROM samples", ())[0]
            if self._rows(_HAS_OUTCOMES, ()):
                (settled,) = self._rows("SELECT MAX(id) FROM outcomes", ())[0]
                last = max(last or 0, settled or 0)
        return 0 if last is None else int(last)

    def count(self) -> int:
        with self._lock:
            (count,) = self._rows("SELECT COUNT(*) FROM samples", ())[0]
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers
    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """Every row of a query, fetched inside the error mapping: SQLite reports a damaged page
        only when a fetch reaches it."""
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise FormatError(f"{self.path}: reading the sample log failed: {exc}") from None

    def _write_sql(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        self._write_many([(sql, rows)])

    def _write_many(
        self, statements: Sequence[tuple[str, Sequence[tuple[Any, ...]] | None]]
    ) -> None:
        """Statements (with their rows, or None for one without parameters) in one transaction."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, rows in statements:
                if rows is None:
                    self._db.execute(sql)
                else:
                    self._db.executemany(sql, rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise SampleLogError(f"{self.path}: writing the sample log failed: {exc}") from None

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def record_crc(sample_id: int, record: bytes) -> int:
    """CRC-32 of a row's id (8 bytes, little-endian, signed) and record."""
    return zlib.crc32(record, zlib.crc32(sample_id.to_bytes(8, "little", signed=True)))


def log_summary(path: str | Path, after: int = 0) -> tuple[int, int, int, int]:
    """(rows, first id, last id, rows above ``after`` without a recorded outcome, which a
    restore would replay) of a sample log, read without creating, changing or removing any file
    (see :func:`_read_only`)."""
    p = Path(path)
    try:
        with _read_only(p) as db:
            row = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM samples").fetchone()
            sql = "SELECT COUNT(*) FROM samples WHERE id > ?"
            if db.execute(_HAS_OUTCOMES).fetchone():
                sql += " AND id NOT IN (SELECT id FROM outcomes)"
            above = db.execute(sql, (int(after),)).fetchone()
    except sqlite3.Error as exc:
        raise FormatError(f"{p}: not a readable sona sample log: {exc}") from None
    return int(row[0]), int(row[1] or 0), int(row[2] or 0), int(above[0])


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection reading the log at ``path`` that creates, changes and removes no file
    beside it.

    SQLite alone does not promise that: a ``mode=ro`` connection to a WAL database writes to
    its ``-shm`` index (read marks, and the whole index after a crash), creates the ``-wal`` and
    ``-shm`` files when they are missing and cannot remove them when it closes. So:

    - while a runtime holds the directory (:func:`~sona.checkpoint_store.in_use`) it may be
      writing, and the log is read through SQLite's index like any reader's (``mode=ro``):
      that writes only to the ``-shm`` file the runtime keeps rewriting anyway;
    - otherwise, without a ``-wal`` file or with an empty one, the main file holds every
      committed row (the last connection to close checkpoints the log into it), and it is
      read as immutable, which needs neither file;
    - otherwise (a runtime was killed, or the files were copied) the rows the ``-wal`` holds
      are read from a copy of the main file and the ``-wal`` in a temporary directory
      (``TMPDIR``), which costs a copy of the log. If either file changed while it was copied,
      or the copy cannot be made, the log is read through the index as above.
    """
    wal = Path(f"{path}-wal")
    with contextlib.ExitStack() as stack:
        busy = in_use(path.parent)
        target, query = path, "mode=ro"
        if not busy and _size(wal) == 0:
            query = "mode=ro&immutable=1"
        elif not busy:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sona-log-")))
            target = _copy_quiescent(path, wal, tmp) or path
        db = _connect(path, target, query)
        stack.callback(db.close)
        yield db


def _connect(path: Path, target: Path, query: str) -> sqlite3.Connection:
    """A read-only connection to ``target`` (``path`` or a copy of it); errors name ``path``."""
    try:
        return sqlite3.connect(
            f"{target.resolve().as_uri()}?{query}",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
            timeout=30.0,
        )
    except sqlite3.Error as exc:
        raise FormatError(f"{path}: cannot open the sample log: {exc}") from None


def _copy_quiescent(path: Path, wal: Path, into: Path) -> Path | None:
    """A copy of the log at ``path`` and its ``wal`` in ``into``, or None when either file
    changed while it was copied (a writer is busy) or could not be copied. Unchanged files
    copied one after the other are the state a crash at that moment would have left, which
    SQLite recovers like any crash."""
    before = (_identity(path), _identity(wal))
    copy = into / path.name
    try:
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, f"{copy}-wal")
    except OSError:
        return None
    if (_identity(path), _identity(wal)) != before or in_use(path.parent):
        return None
    return copy


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written or replaced: inode, size, modification time."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _size(path: Path) -> int:
    """Bytes in ``path``; 0 when there is no such file."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class LogWriter(Generic[_T]):
    """Group commit on top of a :class:`SampleLog`, driven by :meth:`run` in a task group.

    :meth:`put` never waits: it queues a sample with an opaque ``token``. :meth:`run` takes
    everything queued, encodes and commits it in a worker thread, then calls ``on_logged`` with
    the tokens in submission order, or ``on_failed`` with them and the error. A transaction in
    progress is finished even if the task is cancelled, so a sample is never half-handled.
    :meth:`record` queues an outcome the same way; it goes into the next transaction. The
    outcomes of a transaction that failed go again with the next one, which only new samples or
    outcomes start (a log that keeps failing is not retried in a loop).
    """

    def __init__(
        self,
        log: SampleLog,
        on_logged: Callable[[list[_T]], None],
        on_failed: Callable[[list[_T], BaseException], None],
        *,
        max_batch: int = 4096,
    ) -> None:
        self.log = log
        self._on_logged = on_logged
        self._on_failed = on_failed
        self._max_batch = max_batch
        self._queue: deque[tuple[int, TrainingSample, TargetModule | None, _T]] = deque()
        self._outcomes: list[tuple[int, str]] = []
        self._held: list[tuple[int, str]] = []  # from a failed transaction, for the next one
        self.recorded_total = 0
        self.recorded_done = 0
        self._wake: anyio.Event | None = None
        self._progress: anyio.Event | None = None
        self.queued_total = 0
        self.done_total = 0
        self.batches = 0
        self.write_ns = 0  # time spent encoding and committing, in worker threads
        self._thread = anyio.CapacityLimiter(1)  # not a slot of the host's default limiter

    def put(
        self, sample_id: int, sample: TrainingSample, module: TargetModule | None, token: _T
    ) -> None:
        self._queue.append((sample_id, sample, module, token))
        self.queued_total += 1
        if self._wake is not None:
            self._wake.set()

    def record(self, sample_id: int, outcome: str) -> None:
        """Queue the outcome of a sample that was put here (see :data:`OUTCOMES`)."""
        self._outcomes.append((sample_id, outcome))
        self.recorded_total += 1
        if self._wake is not None:
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Samples put but not yet committed (or failed)."""
        return self.queued_total - self.done_total

    async def run(self) -> None:
        queue = self._queue
        while True:
            while not queue and not self._outcomes:
                self._wake = anyio.Event()
                await self._wake.wait()
                self._wake = None
            n = min(len(queue), self._max_batch)
            batch = [queue.popleft() for _ in range(n)]
            new = len(self._outcomes)
            outcomes = self._held + self._outcomes
            self._held, self._outcomes = [], []
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(
                        self._write, batch, outcomes, limiter=self._thread
                    )
                except Exception as exc:
                    self._held = outcomes
                    self._finish(n, new)
                    self._on_failed([item[3] for item in batch], exc)
                    continue
                self._finish(n, new)
                self._on_logged([item[3] for item in batch])

    def _finish(self, n: int, recorded: int) -> None:
        self.done_total += n
        self.recorded_done += recorded
        self.batches += 1
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _write(
        self,
        batch: list[tuple[int, TrainingSample, TargetModule | None, _T]],
        outcomes: list[tuple[int, str]],
    ) -> None:
        t0 = time.perf_counter_ns()
        try:
            rows = [(sid, encode_sample(s, m)) for sid, s, m, _ in batch]
            self.log.append(rows, outcomes)
        finally:
            self.write_ns += time.perf_counter_ns() - t0

    async def flush(self) -> None:
        """Wait until everything put or recorded so far is committed (or failed)."""
        target = self.queued_total
        recorded = self.recorded_total
        while self.done_total < target or self.recorded_done < recorded:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()
