"""Heavy loop work in worker threads, without taking the event loop's core.

The Background and Deep loops run in worker threads beside the event loop that serves the
Instant loop. numpy's OpenBLAS starts its own threads for every level-2/3 call; on a machine
whose cores are already busy (the event loop is one of them) those threads spin and yield
against each other, so a QR of a 4096 × 24 matrix that takes a millisecond alone took 300 ms
while holding the GIL. While a loop's work runs, BLAS is limited to one thread.

The limit is process-wide (OpenBLAS has one setting), so it is counted: set when the first
worker starts, restored when the last one finishes, whichever threads those are. threadpoolctl
lets only the thread that first set an OpenBLAS limit change it again; the loops' work runs on
whichever pool thread is free, so control is released around every change.

The runtime sets the limit for a consolidation on the event loop, around the wait for it
(:func:`single_blas`), not in the worker thread: setting and restoring it are a few foreign
calls, each of which gives the GIL up. In a worker thread beside a busy event loop, each
take-back waited for the loop (measured under sustained ingress: the Background loop reached its
first kernel 1.2 ms after being handed its work, on average, instead of 0.83 ms). A Deep run,
whose wait may be dropped while its thread goes on (``LoopThread.run(shield=False)``), sets it
in its thread, for exactly as long as the run.

No loop, nor the checkpoint writer or the durable log, takes a slot of anyio's default thread
limiter: that one (40 threads) is the host application's too, and a host keeping it busy with its
own blocking calls would hold back consolidations, Deep runs and the log commits every durable
``submit`` waits for. The Background and Deep loops each run on a thread of their own
(:class:`LoopThread`); the checkpoint writer and the log under a capacity limiter of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import threadpoolctl
from threadpoolctl import ThreadpoolController

T = TypeVar("T")

_lock = threading.Lock()
_active = 0
_controller: ThreadpoolController | None = None
_limiter: Any = None


@contextlib.contextmanager
def single_blas() -> Iterator[None]:
    """BLAS limited to one thread, process-wide, for the duration of the block."""
    _enter()
    try:
        yield
    finally:
        _exit()


class LoopThread:
    """One loop's worker thread, handed its work without waiting for the event loop.

    ``anyio.to_thread.run_sync`` yields to the event loop twice before it queues the work (its
    checkpoint, then its capacity limiter's). Each such turn runs on the time of whichever
    request yields next: under load, two more slow requests per consolidation. On asyncio the
    work is queued at once, on a thread of this loop's own; other backends take anyio's path
    with a limiter of one. Either way the caller waits, shielded from cancellation, until the
    work is done: the thread cannot be stopped, and what it returns must not be lost. Work
    whose result may be dropped (a Deep run, whose replacement the state does without) passes
    ``shield=False``: a cancelled caller (a shutdown past its drain timeout, a host's own
    timeout) then returns at once, and the thread finishes the work for nobody.

    ``run(..., hand_off=True)`` (on asyncio) also hands the GIL over as it queues the work:
    the event loop waits (GIL released, at most ``HAND_OFF_S``) until the thread has started,
    then for the GIL until the work reaches its first GIL-free kernel. Without it, a thread
    that wakes while the event loop is busy with requests gets the GIL only once the loop
    idles, which under sustained load is once producers reach the pending bound: the
    Background loop's first kernel (:func:`sona.kernels.batch.scan_rows`, about two thirds of
    a consolidation) then ran while every submitter waited, instead of beside them. The loop
    pays the thread's wake-up and the Python before that kernel, once per consolidation.
    """

    HAND_OFF_S = 0.002

    def __init__(self, name: str) -> None:
        self.name = name
        self.busy = 0  # runs in flight
        self._executor: ThreadPoolExecutor | None = None
        self._limiter = anyio.CapacityLimiter(1)

    async def run(
        self, fn: Callable[..., T], *args: Any, hand_off: bool = False, shield: bool = True
    ) -> T:
        """``fn(*args)`` in this loop's thread, in a copy of the caller's context."""
        await anyio.lowlevel.checkpoint_if_cancelled()  # yields only when cancelled
        self.busy += 1
        try:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # another anyio backend
                return await anyio.to_thread.run_sync(
                    fn, *args, limiter=self._limiter, abandon_on_cancel=not shield
                )
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
            ctx = contextvars.copy_context()
            if hand_off:
                started = threading.Event()
                done = loop.run_in_executor(self._executor, ctx.run, _started, started, fn, *args)
                started.wait(self.HAND_OFF_S)
            else:
                done = loop.run_in_executor(self._executor, ctx.run, fn, *args)
            with anyio.CancelScope(shield=shield):
                result = await done
            return result
        finally:
            self.busy -= 1

    def close(self) -> None:
        """Let the thread end once its current work (if any) is done."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def _started(started: threading.Event, fn: Callable[..., T], *args: Any) -> T:
    started.set()
    return fn(*args)


def find_blas() -> None:
    """Look up the process's BLAS libraries now rather than in the first loop's work.

    The look-up resolves the path of every loaded shared library, a few hundred system calls
    that each give the GIL up. Done in a worker thread beside a busy event loop, every one of
    them waits to get the GIL back; the runtime does it once at start, on its own thread."""
    global _controller
    with _lock:
        if _controller is None:
            _controller = ThreadpoolController()


def _enter() -> None:
    global _active, _limiter
    find_blas()
    with _lock:
        _active += 1
        if _active == 1:
            assert _controller is not None
            _release_control()
            _limiter = _controller.limit(limits=1, user_api="blas")
            _release_control()


def _exit() -> None:
    global _active, _limiter
    with _lock:
        _active -= 1
        if _active == 0 and _limiter is not None:
            _release_control()
            _limiter.restore_original_limits()
            _release_control()
            _limiter = None


def _release_control() -> None:
    openblas = getattr(threadpoolctl, "OpenBLASController", None)
    if openblas is not None:
        openblas.clear_controlling_thread(force=True)


def blas_limited() -> bool:
    """Whether a loop's work currently holds BLAS to one thread."""
    return _active > 0


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc (or no C library handle)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_malloc_trim = _find_malloc_trim()
trims = 0  # times free memory was handed back, for tests


def release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc; elsewhere nothing).

    A Deep run stacks its replay samples into a few megabytes of arrays and frees them when it
    ends. glibc keeps memory freed in a worker thread's arena for later, so resident memory rose
    and fell by ~6 MB from one Deep run to the next (``sona bench soak``, width 256) and said
    little about what was alive. Called after each Deep run, in its worker thread: measured over
    four minutes of the soak, anonymous resident memory stayed within 115–124 MB instead of
    125–132 MB.
    """
    global trims
    if _malloc_trim is not None:
        _malloc_trim(0)
        trims += 1
