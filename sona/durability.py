"""How a :class:`~sona.runtime.SonaRuntime` loses nothing: checkpoints, the sample log, restore.

The runtime calls into this module from a few places: the durable-log step of ``submit``
(:meth:`Durability.log_step`), start (:meth:`Durability.open` and :meth:`Durability.start`),
stop (:meth:`Durability.close`), ``checkpoint`` and ``restore``. Everything else lives here.

Guarantees, with ``checkpoint_dir`` set:

- ``submit`` returns only after the sample is committed to the log; a sample reaches the
  Instant loop only after that, in id order, so every sample the runtime ever learned from is
  in the log or in a checkpoint.
- A checkpoint's log sequence number is the highest id below every sample still waiting to be
  handled: all samples at or below it are in the checkpoint's state, none above it are (those
  waiting are stored in the checkpoint too, and delivered again on restore).
- ``restore(checkpoint_dir)`` takes the newest checkpoint that reads back intact and replays
  the samples it holds as waiting and every sample logged after it was taken, with their
  original ids, before the runtime accepts new samples. Nothing acknowledged is lost, nothing
  consumed is applied twice.
- Every checkpoint in a ``checkpoint_dir`` has the sample log beside it (a checkpoint written
  before the runtime first starts creates it), so a directory without one lost it: the
  samples acknowledged after the checkpoint were only there, and how many is not known.
  Restoring or starting such a directory raises ``CheckpointDirError`` naming the file and
  changes nothing; restoring the checkpoint file itself goes on without them, by choice.
  So does restoring one whose log was truncated past its newest readable checkpoint (a copy
  that missed the newer checkpoints): the samples in between are in neither.
- Restoring writes nothing: the source's log is read without creating, changing or removing
  a file (:meth:`SampleLog.reading`), so a directory restored into another one, or restored
  and never started, stays as it was. The runtime writes into its ``checkpoint_dir`` only once
  started.
- A sample that was logged and then settled without being handled (dropped by
  ``DROP_OLDEST``, dead-lettered, failed at a give-up) is not replayed: its caller was told so.
  A ``DROP_NEWEST`` drop is never logged, but its outcome is, so a restore counts it too.
  Its outcome is recorded in the log's next transaction (a group commit, milliseconds after the
  caller hears), and restore counts it as dropped or dead-lettered. That is the one window: a
  crash after the caller was told and before that commit replays the sample. At a give-up the
  samples failed before the outcomes were recorded are covered by a checkpoint written at once
  instead, so the window there lasts until that checkpoint is on disk.

Without ``checkpoint_dir`` (or restoring from a checkpoint file alone) the loss window is
everything accepted since the last checkpoint.

One thing is not logged: explorations (``forward(x, explore=True)``). A checkpoint keeps those
waiting for their rating, but a quality-only rating replayed from the log whose exploration
happened after the checkpoint is declined like any unexplored rating, with its note.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from sona import checkpoint as ckpt
from sona import container
from sona.actors import SamplesDropped, SupervisorGaveUpEvent
from sona.checkpoint_store import (
    KEEP,
    DirectoryLock,
    checkpoint_name,
    list_checkpoints,
    newest_valid,
    next_number,
    remove_others,
    remove_temporaries,
)
from sona.errors import CheckpointDirError, InvalidInputError
from sona.events import CheckpointFailed, CheckpointWritten
from sona.log import get_logger
from sona.lora_config import TargetModule
from sona.messages import Process
from sona.sample import TrainingSample
from sona.sample_log import LOG_FILE, LogWriter, SampleLog, SampleLogError

if TYPE_CHECKING:
    from sona.config import Chaos, SonaLlmConfig
    from sona.embedding import Embedder
    from sona.runtime import SonaRuntime, Ticket

__all__ = ["Durability", "RestoreInfo", "restore_runtime"]

_log = get_logger("sona.durability")


@dataclass(frozen=True, slots=True)
class RestoreInfo:
    """Where a restored runtime came from and what it replays when it starts.

    ``replayed`` holds the ids of the samples delivered to the Instant loop again at start, in
    order: the ones the checkpoint held as accepted-but-unhandled, and the ones logged after it
    was taken. Samples with an id at or below ``log_sequence`` are in the checkpoint's state;
    any other sample accepted before it was taken and not held as unhandled had been dropped or
    dead-lettered by then, as its counts say. Samples the log records as dropped or
    dead-lettered are not replayed either, and count as such. ``skipped`` says why newer
    checkpoint files were passed over.
    """

    checkpoint: Path
    log_sequence: int
    replayed: tuple[int, ...]
    skipped: tuple[str, ...] = ()


@dataclass(slots=True)
class _Kept:
    seq: int
    path: Path
    log_sequence: int


@dataclass(slots=True)
class _Replay:
    items: list[tuple[int, TrainingSample, TargetModule | None]] = field(default_factory=list)
    unlogged: list[tuple[int, TrainingSample, TargetModule | None]] = field(default_factory=list)


class Durability:
    """The checkpoint directory, the sample log and the replay of one runtime."""

    def __init__(self, rt: SonaRuntime, checkpoint_dir: Any) -> None:
        if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(
                f"checkpoint_dir must be a path or None, got {type(checkpoint_dir).__name__}"
            )
        self.rt = rt
        self.dir = None if checkpoint_dir is None else _directory(checkpoint_dir)
        self.run_id = secrets.token_hex(8)
        self.seq = 1
        self.kept: list[_Kept] = []
        self.log: SampleLog | None = None
        self.writer: LogWriter[Ticket] | None = None
        self._lock: DirectoryLock | None = None
        self._replay = _Replay()
        self._passed_over: set[int] = set()  # newer checkpoints a restore could not read
        self._write_lock: anyio.Lock | None = None
        self._thread = anyio.CapacityLimiter(1)  # not a slot of the host's default limiter
        self._loops_active = False  # between start() and close(): capture inside Background
        self._loops_stopped = False  # the supervisor gave up and every loop has stopped

    # ------------------------------------------------------------------ start
    async def open(self) -> None:
        """Lock the directory, open the log, log what a restore brought along, queue it for
        delivery, and write a first checkpoint if the directory holds none of this run.

        Into a directory this run has no checkpoint in, the first checkpoint is written before
        the restored samples are logged: it holds them as queued, and a start that fails (or
        is killed) before it is on disk leaves the log empty, so the same restore can simply
        be tried again. Logged first, they would make the directory an earlier run's to
        ``_adopt`` while no checkpoint in it could be restored: refused both ways."""
        if self.dir is not None:
            await anyio.to_thread.run_sync(self._open_sync, limiter=self._thread)
        self._enqueue_replay()
        if self.dir is not None and not self.kept:
            try:
                await self.checkpoint()
                await anyio.to_thread.run_sync(self._log_unlogged, limiter=self._thread)
            except BaseException:
                await self._release()
                raise

    def _open_sync(self) -> None:
        directory = self.dir
        assert directory is not None
        if self.kept and not (directory / LOG_FILE).exists():
            # checked before locking, which rewrites LOCK: a refused start changes nothing
            raise _missing_log(directory, self.kept[-1].path)
        lock = _lock_directory(directory)
        try:
            remove_temporaries(directory)
            self._claim(directory)  # before the log is opened: a refused start creates nothing
            log = self._open_log(directory)
            try:
                self._adopt(directory, log)
                if self.kept:  # else after the first checkpoint (see open)
                    log.append_samples(self._replay.unlogged)
                    self._replay.unlogged = []
            except BaseException:
                log.close()
                raise
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        self.log = log
        self.writer = LogWriter(log, self._on_logged, self._on_failed)

    def _log_unlogged(self) -> None:
        """Log what a restore brought along that the log does not hold yet."""
        assert self.log is not None
        self.log.append_samples(self._replay.unlogged)
        self._replay.unlogged = []

    def _open_log(self, directory: Path) -> SampleLog:
        micro = self.rt.config.micro_lora
        return SampleLog(
            directory / LOG_FILE, in_features=micro.in_features, out_features=micro.out_features
        )

    def _adopt(self, directory: Path, log: SampleLog) -> None:
        """Continue this run's directory, or claim a fresh one; never another run's (the
        caller claims the directory first, with :meth:`_claim`)."""
        if self.kept:
            if log.get_meta("run_id") not in (None, self.run_id):
                raise CheckpointDirError(f"{log.path}: the sample log belongs to another run")
            # A runtime restored from the same state started, logged samples and died before
            # any checkpoint: its acknowledged samples hold ids this runtime would hand out
            # again, and their rows would keep this runtime's samples out of the log.
            highest = log.highest_id()
            if highest >= self.rt._ids.value:
                raise CheckpointDirError(
                    f"{directory}: another runtime continued checkpoint_dir after this one "
                    f"was restored (its sample log holds sample {highest}, logged since); "
                    "restore the directory to continue it"
                )
        elif log.count() > 0:
            raise _earlier_run(directory)
        log.set_meta("run_id", self.run_id)

    def _claim(self, directory: Path) -> None:
        """With the directory locked: check that this runtime may write the next checkpoint
        into it, and number that checkpoint after every one the directory holds (and after
        anything else named like one, such as a directory).

        A runtime that has no checkpoint in the directory (it neither restored from it nor
        wrote into it) may claim it only empty. One that has may continue it only if no other
        runtime did meanwhile: a checkpoint newer than this runtime's newest (other than the
        unreadable ones its restore passed over) was written by a runtime that restored the
        directory after this one, and writing there would prune that runtime's checkpoints
        and replace its state with an older one."""
        existing = list_checkpoints(directory)
        if not self.kept:
            if existing:
                raise _earlier_run(directory)
        else:
            own = max(k.seq for k in self.kept)
            newer = [n for n, _ in existing if n > own and n not in self._passed_over]
            if newer:
                raise CheckpointDirError(
                    f"{directory}: another runtime continued checkpoint_dir after this one (it "
                    f"wrote {checkpoint_name(max(newer))}); restore the directory to continue it"
                )
        self.seq = max(self.seq, next_number(directory))

    def _lock_for_write(self) -> DirectoryLock:
        """Lock and claim the directory for one checkpoint written before start or after stop,
        when this runtime does not hold it.

        The first checkpoint in a directory (one written before the runtime ever started)
        gets its sample log beside it, as a runtime's start creates it: every checkpoint in a
        ``checkpoint_dir`` then has a log beside it, so a restore that finds none knows the
        log was lost rather than never written, and refuses to go on without it."""
        assert self.dir is not None
        lock = _lock_directory(self.dir)
        try:
            self._claim(self.dir)
            if not self.kept:
                log = self._open_log(self.dir)
                try:
                    self._adopt(self.dir, log)
                finally:
                    log.close()
        except BaseException:
            lock.release()
            raise
        return lock

    def start(self, tg: Any) -> None:
        """Start the log writer and the periodic checkpoints in the runtime's task group."""
        self._loops_active = True
        tg.start_soon(self._watch_give_up)
        if self.writer is not None:
            tg.start_soon(self.writer.run)
        if self.dir is not None:
            tg.start_soon(self._periodic)

    async def _watch_give_up(self) -> None:
        """The give-up event comes after every loop stopped: from then on, capture directly."""
        async with self.rt.events.subscribe(buffer=4, kinds=(SupervisorGaveUpEvent,)) as sub:
            async for _ in sub:
                self._loops_stopped = True
                break
            else:
                return
        await self._after_give_up()

    async def _after_give_up(self) -> None:
        """At a give-up every sample not yet handled is failed, however far it got: a restore
        must replay none of them. Those still waiting are recorded as dropped, and a checkpoint
        of the stopped state (which holds none of them once they are failed) covers those the
        runtime failed before this ran."""
        writer = self.writer
        if writer is None:
            return
        for sid in self.rt._queued:
            writer.record(sid, "dropped")
        await writer.flush()
        try:
            await self.checkpoint()
        except Exception as exc:  # the final checkpoint at stop tries again
            _log.warning("checkpoint_failed", error=repr(exc))

    def _enqueue_replay(self) -> None:
        """Count what a restore brought back as accepted and not yet handled (so checkpoints
        taken from now on hold it), before it is delivered."""
        from sona.runtime import Ticket

        rt = self.rt
        for sid, sample, module in self._replay.items:
            rt._queued[sid] = Ticket(sid, rt._loop, sample, module)
            rt.submitted += 1
            rt._pending += 1
        self._replay.items = []

    async def replay(self) -> None:
        """Deliver what a restore brought back to the Instant loop, in id order, and wait
        until it has handled it, before the runtime accepts anything new (so the Instant loop
        keeps handling samples in id order).

        Waiting matters under ``DROP_OLDEST``: a new sample finding the pending buffer full
        drops the oldest sample not yet handled, and a replayed one was acknowledged as
        applied before the crash; dropped now, it would never be applied."""
        rt = self.rt
        ref = rt._instant_ref
        assert ref is not None
        replayed = False
        for t in list(rt._queued.values()):
            if not t.done:
                await ref.tell(Process(t.sample_id, t.sample, t.module, t))
                replayed = True
        if replayed:
            await rt.drain()

    # ------------------------------------------------------------------ the durable-log step
    def log_step(self, ticket: Ticket) -> bool:
        """Queue ``ticket``'s sample for the log; True when it will be delivered once logged."""
        writer = self.writer
        if writer is None or ticket.sample is None:
            return False
        writer.put(ticket.sample_id, ticket.sample, ticket.module, ticket)
        return True

    def _on_logged(self, tickets: list[Ticket]) -> None:
        ref = self.rt._instant_ref
        assert ref is not None
        for t in tickets:
            if not t.done:
                try:
                    ref.tell_nowait(Process(t.sample_id, t.sample, t.module, t))
                    continue
                except Exception as exc:
                    self._drop([t], exc)
            # dropped (DROP_OLDEST) or failed while it was being logged, or just now
            self.settled(t.sample_id, "dropped")

    def settled(self, sample_id: int, outcome: str) -> None:
        """Record that an accepted sample ended without being handled (``"dropped"`` or
        ``"dead_lettered"``, as its caller was told), so that a restore does not replay it
        from the log; see the module docstring for the window until the record commits."""
        if self.writer is not None:
            self.writer.record(sample_id, outcome)

    def _on_failed(self, tickets: list[Ticket], error: BaseException) -> None:
        if not isinstance(error, SampleLogError):
            error = SampleLogError(f"the durable sample log failed: {error!r}")
        _log.warning("sample_log_failed", error=str(error), samples=len(tickets))
        self._drop([t for t in tickets if not t.done], error)

    def _drop(self, tickets: list[Ticket], error: BaseException) -> None:
        rt = self.rt
        n = 0
        for t in tickets:
            if rt._queued.pop(t.sample_id, None) is None:
                continue
            rt.dropped += 1
            rt._pending -= 1
            t.fail(error)
            n += 1
        if n:
            rt.events.publish(SamplesDropped(count=n, stage="log", policy=""))
            rt._signal()

    # ------------------------------------------------------------------ checkpoints
    async def _periodic(self) -> None:
        interval = self.rt.config.checkpoint_interval_s
        while True:
            await anyio.sleep(interval)
            try:
                await self.checkpoint()
            except Exception as exc:  # the previous checkpoint and the log still hold it all
                _log.warning("checkpoint_failed", error=repr(exc))

    async def checkpoint(self, path: Any = None) -> Path:
        """Capture, encode, verify and write a checkpoint; into the directory when ``path`` is
        None (then older checkpoints are pruned and the log truncated).

        Writing into the directory needs its lock. A runtime holds it from start to stop;
        before start or after stop it takes the lock for this one checkpoint, and raises
        CheckpointDirError when another runtime holds it or has continued the directory since
        (see :meth:`_claim`): pruning would delete that runtime's checkpoints."""
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a path or None, got {type(path).__name__}")
        if path is None and self.dir is None:
            raise InvalidInputError(
                "checkpoint() needs a path when the runtime has no checkpoint_dir"
            )
        target = None if path is None else container.file_target(path)
        if self._write_lock is None:
            self._write_lock = anyio.Lock()
        async with self._write_lock:
            into_dir = target is None
            borrowed = None
            try:
                if into_dir and self._lock is None:
                    borrowed = await anyio.to_thread.run_sync(
                        self._lock_for_write, limiter=self._thread
                    )
                seq = self.seq
                captured = await self._capture(seq)
                if target is None:
                    assert self.dir is not None
                    target = self.dir / checkpoint_name(seq)
                    self.seq = seq + 1
                size = await anyio.to_thread.run_sync(
                    _write_verified, captured, target, limiter=self._thread
                )
                if into_dir:
                    self.kept.append(_Kept(seq, target, captured.log_sequence))
                    # Shielded: once written, a checkpoint is pruned behind and announced even
                    # when a timeout (the final checkpoint's) expired while it was written.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self._prune, limiter=self._thread)
            except Exception as exc:
                where = target if target is not None else self.dir
                self.rt.events.publish(CheckpointFailed(path=str(where), error=str(exc)))
                raise
            finally:
                if borrowed is not None:
                    borrowed.release()
        self.rt.events.publish(
            CheckpointWritten(path=str(target), bytes=size, log_sequence=captured.log_sequence)
        )
        _log.debug("checkpoint_written", path=str(target), bytes=size)
        return target

    async def _capture(self, seq: int) -> ckpt.Captured:
        ref = self.rt._background_ref
        if self._loops_active and not self._loops_stopped and ref is not None:
            got = await ref.ask(ckpt.CaptureState())
            assert isinstance(got, ckpt.Captured)
            return got
        return self.capture_now(seq)

    def capture_now(self, seq: int | None = None) -> ckpt.Captured:
        """Capture synchronously; only where no loop is mid-turn (Background's turn, or with
        the loops stopped)."""
        return ckpt.capture(
            self.rt,
            run_id=self.run_id,
            checkpoint_seq=self.seq if seq is None else seq,
            undelivered=self._replay.items,
        )

    def _prune(self) -> None:
        """Keep the KEEP newest checkpoints; truncate the log through the older kept one."""
        kept = self.kept
        while len(kept) > KEEP:
            old = kept.pop(0)
            with contextlib.suppress(FileNotFoundError):
                old.path.unlink()
        assert self.dir is not None
        remove_others(self.dir, {k.seq for k in kept})
        if self.log is not None and len(kept) >= KEEP:
            self.log.truncate_through(kept[0].log_sequence)

    # ------------------------------------------------------------------ stop
    async def close(self, *, raise_errors: bool) -> None:
        """The final checkpoint (with a checkpoint_dir), then release the log and the lock."""
        self._loops_active = False
        if self.dir is None:
            return
        timeout = max(self.rt.config.supervision.shutdown_timeout_s, 1.0)
        try:
            # Samples still waiting for the (now stopped) log writer are accepted and unhandled:
            # the checkpoint stores them as queued, so they are not lost either.
            written = None
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(timeout):
                    written = await self.checkpoint()
            if written is None:  # the log still holds every sample since the last checkpoint
                error = f"the final checkpoint did not finish within {timeout:g} s"
                _log.warning("final_checkpoint_timed_out", timeout_s=timeout)
                self.rt.events.publish(CheckpointFailed(path=str(self.dir), error=error))
        except Exception as exc:
            _log.warning("final_checkpoint_failed", error=repr(exc))
            if raise_errors:
                raise
        finally:
            await self._release()

    async def abort(self) -> None:
        """Release the log and the lock after a failed start, without a checkpoint."""
        self._loops_active = False
        await self._release()

    async def _release(self) -> None:
        """Close the log and release the lock, shielded: a stop or failed start inside a
        cancelled scope (a host's timeout) must still release them, or the directory stays
        locked and the log open for the rest of the process. ``anyio.to_thread.run_sync``
        checkpoints before it starts the thread, so unshielded it would never run there."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_sync, limiter=self._thread)

    def _close_sync(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        self.writer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _directory(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """``checkpoint_dir`` as a path, refused at the call when it can never be one: an empty
    string (``Path("")`` is the current directory, which the caller did not name) or a file."""
    if os.fspath(checkpoint_dir) == "":
        raise InvalidInputError("checkpoint_dir must name a directory, got an empty path")
    directory = Path(checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise _not_a_directory(directory)
    return directory


def _lock_directory(directory: Path) -> DirectoryLock:
    """Create ``directory`` if needed and lock it; CheckpointDirError if another runtime holds
    it or a file is in the way."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _not_a_directory(directory) from None
    lock = DirectoryLock(directory)
    lock.acquire()
    return lock


def _earlier_run(directory: Path) -> CheckpointDirError:
    return CheckpointDirError(
        f"{directory}: checkpoint_dir holds the state of an earlier run; continue it "
        "with SonaRuntime.restore(checkpoint_dir) or choose an empty directory"
    )


def _missing_log(directory: Path, checkpoint: Path) -> CheckpointDirError:
    """A checkpoint_dir whose sample log is gone: the samples acknowledged after its newest
    checkpoint were only there, and how many there were is not known, so going on would lose
    them without a count. Naming the way out keeps that a choice the caller makes."""
    return CheckpointDirError(
        f"{directory}: the sample log {LOG_FILE} is missing; it holds every sample "
        f"acknowledged after {checkpoint.name}, and restoring without it would lose them "
        f"uncounted. Put the file back, or, to go on from the checkpoint alone and give up "
        f"those samples, restore the checkpoint file itself: "
        f"SonaRuntime.restore({str(checkpoint)!r}, checkpoint_dir=<an empty directory>)"
    )


def _truncated_past(
    log_path: Path, checkpoint: Path, log_sequence: int, truncated: int
) -> CheckpointDirError:
    """The newest readable checkpoint is older than the log's truncation: the directory was
    copied while it was being pruned (a backup that missed the newer checkpoints), or they
    were deleted. The samples between were only in those checkpoints and the rows deleted."""
    return CheckpointDirError(
        f"{log_path}: the sample log is truncated through sample {truncated}, past the log "
        f"sequence {log_sequence} of {checkpoint.name}, the newest readable checkpoint: the "
        f"samples acknowledged in between are in neither, and restoring would lose them "
        f"uncounted. Put the newer checkpoints back, or, to go on from this one and give "
        f"those samples up, restore the checkpoint file itself: "
        f"SonaRuntime.restore({str(checkpoint)!r}, checkpoint_dir=<an empty directory>)"
    )


def _not_a_directory(directory: Path) -> CheckpointDirError:
    return CheckpointDirError(
        f"checkpoint_dir {directory} is not a directory (a file is in the way)"
    )


def _write_verified(captured: ckpt.Captured, target: Path) -> int:
    """Check that the checkpoint decodes (structure, adapters, ids), then write it atomically."""
    return ckpt.write(captured, target)


# ---------------------------------------------------------------------- restore
_SAME: Any = object()


def restore_runtime(
    cls: type[SonaRuntime],
    path: Any,
    *,
    config: SonaLlmConfig | None = None,
    embedder: Embedder | None = None,
    chaos: Chaos | None = None,
    checkpoint_dir: Any = _SAME,
) -> SonaRuntime:
    """See :meth:`SonaRuntime.restore`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    if os.fspath(path) == "":
        raise InvalidInputError("path must name a checkpoint file or directory, got an empty path")
    source = Path(path)
    skipped: list[str] = []
    log_items: list[tuple[int, TrainingSample, TargetModule | None]] = []
    outcomes: dict[int, str] = {}
    if source.is_dir():
        state, skipped = newest_valid(source)
        log_path = source / LOG_FILE
        if not log_path.exists():
            raise _missing_log(source, Path(state.path))
        micro = state.config.micro_lora
        with SampleLog.reading(
            log_path, in_features=micro.in_features, out_features=micro.out_features
        ) as log:
            owner = log.get_meta("run_id")
            if owner is not None and owner != state.run_id:
                raise CheckpointDirError(
                    f"{log_path}: the sample log belongs to another run than {state.path}"
                )
            log_items = log.samples_after(state.log_sequence, modules=micro.target_modules)
            outcomes = log.outcomes_after(state.log_sequence)
            # read after the rows: a runtime truncating meanwhile has recorded it by then
            truncated = log.truncated_through()
            if truncated > state.log_sequence:
                raise _truncated_past(log_path, Path(state.path), state.log_sequence, truncated)
        if checkpoint_dir is _SAME:
            checkpoint_dir = source
    elif source.is_file():
        state = ckpt.read(source)
        if checkpoint_dir is _SAME:
            checkpoint_dir = None
    elif source.exists():
        raise InvalidInputError(f"{source} is neither a checkpoint file nor a directory")
    else:
        raise InvalidInputError(f"{source}: no such checkpoint file or directory")
    cfg = ckpt.check_config(state, config)
    if skipped:
        _log.warning("checkpoints_skipped", directory=str(source), reasons=skipped)
    logged_ids = {sid for sid, _, _ in log_items}
    queued_ids = {sid for sid, _, _ in state.queued}

    def after_capture(sid: int) -> bool:
        """Waiting when the checkpoint was taken, or accepted after: what the checkpoint's
        state and counts do not hold. Every other sample accepted before it was settled."""
        return sid in queued_ids or sid >= state.next_sample_id

    merged = {sid: (sid, s, m) for sid, s, m in state.queued}
    merged.update({sid: (sid, s, m) for sid, s, m in log_items if after_capture(sid)})
    settled = {sid: outcome for sid, outcome in outcomes.items() if after_capture(sid)}
    items = [merged[sid] for sid in sorted(merged) if sid not in settled]
    rt = cls(cfg, embedder=embedder, seed=state.seed, checkpoint_dir=checkpoint_dir, chaos=chaos)
    ckpt.install(rt, state)
    last = max((*merged, *settled), default=0)
    if last >= state.next_sample_id:
        rt._ids = ckpt.SampleIds(last + 1)
    for outcome in settled.values():  # accepted, and told dropped or dead-lettered
        rt.submitted += 1
        if outcome == "dead_lettered":
            rt.dead_lettered += 1
        else:
            rt.dropped += 1
    d = rt._durable
    d.run_id = state.run_id
    same = checkpoint_dir is not None and source.is_dir() and _same_dir(source, checkpoint_dir)
    if same:
        d.kept = [_Kept(state.checkpoint_seq, Path(state.path), state.log_sequence)]
        d._passed_over = {n for n, _ in list_checkpoints(source) if n > state.checkpoint_seq}
    d._replay = _Replay(items, [it for it in items if not (same and it[0] in logged_ids)])
    rt.restored = RestoreInfo(
        checkpoint=Path(state.path),
        log_sequence=state.log_sequence,
        replayed=tuple(sid for sid, _, _ in items),
        skipped=tuple(skipped),
    )
    return rt


def _same_dir(a: Path, b: Any) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False
