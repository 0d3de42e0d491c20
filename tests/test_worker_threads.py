"""Loop work in worker threads holds BLAS to one thread, and gives the setting back."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from sona.worker_threads import LoopThread, blas_limited, single_blas

T = TypeVar("T")


def run_single_blas(fn: Callable[[], T]) -> T:
    with single_blas():
        return fn()


def _blas_threads() -> int:
    infos = ThreadpoolController().select(user_api="blas").info()
    if not infos:
        pytest.skip("numpy's BLAS exposes no thread pool here")
    return int(infos[0]["num_threads"])


def test_limit_holds_during_the_call_and_is_restored() -> None:
    np.ones((4, 4)) @ np.ones((4, 4))  # make sure BLAS is loaded
    before = _blas_threads()
    seen = run_single_blas(_blas_threads)
    assert seen == 1
    assert _blas_threads() == before
    assert not blas_limited()


def test_restored_after_an_exception() -> None:
    before = _blas_threads()

    def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError):
        run_single_blas(boom)
    assert _blas_threads() == before
    assert not blas_limited()


def test_overlapping_workers_keep_the_limit_until_the_last_one_ends() -> None:
    before = _blas_threads()
    first_in = threading.Event()
    release_first = threading.Event()
    seen: dict[str, int] = {}

    def first() -> None:
        first_in.set()
        release_first.wait(5)
        seen["first_end"] = _blas_threads()

    def second() -> None:
        seen["second"] = _blas_threads()

    t = threading.Thread(target=run_single_blas, args=(first,))
    t.start()
    assert first_in.wait(5)
    run_single_blas(second)  # starts and ends while the first is still running
    assert blas_limited()
    release_first.set()
    t.join(5)
    assert seen == {"second": 1, "first_end": 1}
    assert _blas_threads() == before
    assert not blas_limited()


@pytest.mark.anyio
async def test_runtime_loops_work_with_blas_limited_and_give_the_setting_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside a consolidation (limit set from the event loop) and a Deep run (set in its
    thread) BLAS has one thread; between them, the host's setting."""
    from runtime_helpers import small_config, target_samples

    from sona import runtime as runtime_module
    from sona.background import BackgroundLoop
    from sona.runtime import SonaRuntime
    from sona.simulator import DomainWorld

    np.ones((4, 4)) @ np.ones((4, 4))
    before = _blas_threads()
    if before == 1:
        pytest.skip("BLAS runs one thread already: a limit would not show")
    seen: dict[str, list[int]] = {"background": [], "deep": []}
    prepare = BackgroundLoop.prepare
    run_deep = runtime_module.run_deep

    def watched_prepare(self: BackgroundLoop, *args: object, **kw: object) -> object:
        seen["background"].append(_blas_threads())
        return prepare(self, *args, **kw)  # type: ignore[arg-type]

    def watched_deep(job: object) -> object:
        seen["deep"].append(_blas_threads())
        return run_deep(job)  # type: ignore[arg-type]

    monkeypatch.setattr(BackgroundLoop, "prepare", watched_prepare)
    monkeypatch.setattr(runtime_module, "run_deep", watched_deep)
    world = DomainWorld(dim=32, domains=1, seed=4)
    async with SonaRuntime(small_config(), seed=1) as rt:
        for s in target_samples(world, 0, 64):
            await rt.submit(s)
        await rt.consolidate()
        assert _blas_threads() == before and not blas_limited()
        await rt.deep_optimize()
        assert _blas_threads() == before and not blas_limited()
    assert seen["background"] and set(seen["background"]) == {1}
    assert seen["deep"] == [1]


@pytest.mark.anyio
async def test_free_memory_is_handed_back_after_each_deep_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runtime_helpers import small_config, target_samples

    from sona import worker_threads
    from sona.runtime import SonaRuntime
    from sona.simulator import DomainWorld

    real_trim = worker_threads._malloc_trim
    if real_trim is None:
        pytest.skip("not glibc: nothing to hand back")
    pads: list[int] = []

    def trim(pad: int) -> int:  # the C call itself, not only the counter beside it
        pads.append(pad)
        return real_trim(pad)

    monkeypatch.setattr(worker_threads, "_malloc_trim", trim)
    world = DomainWorld(dim=32, domains=1, seed=3)
    before = worker_threads.trims
    async with SonaRuntime(small_config(), seed=1) as rt:
        for s in target_samples(world, 0, 64):
            await rt.submit(s)
        await rt.consolidate()  # the replay buffer fills at consolidation
        await rt.deep_optimize()
        await rt.deep_optimize()
        assert rt.stats().deep_count == 2
    assert worker_threads.trims - before == 2
    assert pads == [0, 0]


@pytest.mark.anyio
async def test_runtime_looks_up_blas_at_start_not_in_its_first_consolidation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runtime_helpers import small_config

    from sona import worker_threads
    from sona.runtime import SonaRuntime

    monkeypatch.setattr(worker_threads, "_controller", None)
    async with SonaRuntime(small_config(), seed=1) as rt:
        assert worker_threads._controller is not None
        assert rt.stats().background_count == 0  # found before any loop work ran
    found = worker_threads._controller
    run_single_blas(lambda: None)
    assert worker_threads._controller is found  # looked up once, then reused


@pytest.mark.anyio
async def test_loop_thread_starts_the_work_before_the_event_loop_goes_round() -> None:
    """The work is queued in the caller's own step: a busy event loop goes round rarely, and
    a consolidation must not wait for it to start."""
    thread = LoopThread("sona-test")
    started = threading.Event()
    coro = thread.run(started.set)
    try:
        pending = coro.send(None)  # the caller's first step; the event loop does not turn
        assert started.wait(2)  # the thread started while the event loop was held here
        while not pending.done():
            await asyncio.sleep(0.001)
        with pytest.raises(StopIteration):
            coro.send(None)
    finally:
        coro.close()
        thread.close()


@pytest.mark.anyio
async def test_loop_thread_runs_in_the_callers_context_and_raises_its_errors() -> None:
    thread = LoopThread("sona-test")
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    var.set("caller")
    try:
        assert await thread.run(var.get) == "caller"
        name = await thread.run(lambda: threading.current_thread().name)
        assert name.startswith("sona-test")

        def boom() -> None:
            raise ValueError("in the thread")

        with pytest.raises(ValueError, match="in the thread"):
            await thread.run(boom)
        assert await thread.run(lambda: 7) == 7  # still serving after an error
    finally:
        thread.close()
    ours = [t for t in threading.enumerate() if t.name == name]
    for t in ours:
        t.join(5)
    assert not any(t.is_alive() for t in ours)


@pytest.mark.anyio
async def test_loop_thread_never_starts_work_for_a_cancelled_caller() -> None:
    thread = LoopThread("sona-test")
    ran: list[int] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        await thread.run(ran.append, 1)
    assert scope.cancelled_caught
    assert ran == []
    thread.close()


@pytest.mark.anyio
async def test_loop_thread_caller_cancelled_meanwhile_waits_for_the_work() -> None:
    """The thread cannot be stopped: a cancelled caller still waits for it to finish, so what
    the work returns or changes is never left behind by a stop."""
    thread = LoopThread("sona-test")
    started = threading.Event()
    finished: list[int] = []

    def work() -> int:
        started.set()
        time.sleep(0.2)
        finished.append(1)
        return 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(thread.run, work)
        while not started.is_set():
            await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert finished == [1]
    thread.close()
