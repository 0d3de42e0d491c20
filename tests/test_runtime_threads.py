"""Threads: the loops' thread work never waits for a slot of the host's default thread
limiter, and the host's threads cannot change the runtime's state behind the event loop.

anyio's default limiter is shared with everything else the host runs through
``to_thread.run_sync``. These tests take all of its slots with a blocking call of the host's
own and check that consolidation, Deep runs and durable-log commits still happen.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from runtime_helpers import identity_holds, small_config, target_samples

from sona.runtime import SonaRuntime
from sona.simulator import DomainWorld

pytestmark = pytest.mark.anyio


async def _host_holds_every_default_slot(tg: anyio.abc.TaskGroup, release: threading.Event) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = 1
    tg.start_soon(anyio.to_thread.run_sync, release.wait)
    with anyio.fail_after(5):
        while limiter.borrowed_tokens < 1:
            await anyio.sleep(0.001)


@pytest.mark.parametrize("durable", [False, True])
async def test_loops_and_log_run_while_the_hosts_threads_are_all_busy(
    durable: bool, tmp_path: Path
) -> None:
    world = DomainWorld(dim=32, domains=1, seed=11)
    samples = target_samples(world, 0, 400)
    cfg = small_config(max_pending_samples=100, deep_trigger_threshold=50.0)
    release = threading.Event()
    async with anyio.create_task_group() as tg:
        await _host_holds_every_default_slot(tg, release)
        try:
            rt = SonaRuntime(cfg, seed=3, checkpoint_dir=tmp_path / "state" if durable else None)
            with anyio.fail_after(30):
                async with rt:
                    for s in samples:  # BLOCK: waits on consolidations beyond 100 pending
                        assert (await rt.submit(s)).applied
                    await rt.deep_optimize()
                    await rt.drain()
                    st = rt.stats()
            assert anyio.to_thread.current_default_thread_limiter().borrowed_tokens == 1
        finally:
            release.set()  # the host's call returns; the task group can end
    assert st.background_count >= 3
    assert st.deep_count >= 1
    assert st.instant_count == len(samples)
    assert identity_holds(st)


async def test_calls_from_another_thread_are_refused_and_the_bridges_work() -> None:
    """The runtime's state belongs to its event loop and has no locks: a worker thread that
    submitted directly raced the loop (the accounting identity broke); it gets a clear error
    instead, and anyio's bridge back to the loop works."""
    world = DomainWorld(dim=32, domains=1, seed=5)
    samples = target_samples(world, 0, 30)
    async with SonaRuntime(small_config(), seed=1) as rt:

        def from_worker() -> list[str]:
            errors = []
            for call in (
                lambda: rt.submit_nowait(samples[0]),
                lambda: rt.start_new_task(),
                lambda: asyncio.run(rt.submit(samples[0])),
                lambda: asyncio.run(
                    rt.instant_adapt(samples[0].input_embedding, samples[0].output_embedding, 0.9)
                ),
            ):
                with pytest.raises(RuntimeError, match="another thread") as info:
                    call()
                errors.append(str(info.value))
            for s in samples[1:]:
                assert anyio.from_thread.run(rt.submit, s).applied
            return errors

        tasks = rt.stats().task_count
        errors = await anyio.to_thread.run_sync(from_worker)
        assert len(errors) == 4
        await rt.drain()
        st = rt.stats()
        assert st.submitted_count == len(samples) - 1 and identity_holds(st)
        assert st.task_count == tasks  # the refused start_new_task changed nothing


async def test_checkpoint_and_drain_from_another_thread_are_refused(tmp_path: Path) -> None:
    """``checkpoint`` and ``drain`` wait on the runtime's own loop: from a worker thread's
    event loop they waited on events that loop was never told about (a checkpoint hung for
    good), so they raise the same clear error as the calls that change state."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=5), 0, 20)
    async with SonaRuntime(small_config(), seed=1, checkpoint_dir=tmp_path / "state") as rt:
        for s in samples:
            await rt.submit(s)

        def from_worker() -> list[str]:
            errors = []
            for call in (
                lambda: asyncio.run(asyncio.wait_for(rt.checkpoint(), 10)),
                lambda: asyncio.run(asyncio.wait_for(rt.checkpoint(tmp_path / "x.sona"), 10)),
                lambda: asyncio.run(asyncio.wait_for(rt.drain(), 10)),
            ):
                with pytest.raises(RuntimeError, match="another thread") as info:
                    call()
                errors.append(str(info.value))
            anyio.from_thread.run(rt.drain)  # the bridge works
            return errors

        with anyio.fail_after(30):
            errors = await anyio.to_thread.run_sync(from_worker)
        assert len(errors) == 3
        assert not (tmp_path / "x.sona").exists()
        with anyio.fail_after(10):
            await rt.checkpoint()  # the refused calls left nothing behind
        assert identity_holds(rt.stats())


async def test_subscribe_from_another_thread_is_refused() -> None:
    """A subscription entered in a worker thread's event loop waited on an event the runtime's
    loop sets from its own thread, which that other loop is never woken for (and its list of
    subscribers changed behind the loop's back): ``subscribe`` raises the same clear error as
    ``checkpoint`` and ``drain``, and anyio's bridge back to the loop works."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=5), 0, 5)
    async with SonaRuntime(small_config(), seed=1) as rt:

        async def first_event() -> object:
            async with rt.subscribe() as events:
                return await events.receive()

        def from_worker() -> str:
            with pytest.raises(RuntimeError, match="another thread") as info:
                rt.subscribe()
            return str(info.value)

        with anyio.fail_after(10):
            error = await anyio.to_thread.run_sync(from_worker)
        assert "event loop" in error
        async with anyio.create_task_group() as tg:
            got: list[object] = []

            async def watch() -> None:
                got.append(await first_event())

            tg.start_soon(watch)
            await anyio.sleep(0.01)
            with anyio.fail_after(10):
                await rt.submit(samples[0])
        assert got


async def test_stats_from_another_thread_is_a_snapshot_taken_on_the_loop() -> None:
    """Read directly from another thread, a consolidation's commit (or a sample handled)
    could land between two counters, and the accounting identities broke in the snapshot;
    the snapshot is taken on the event loop instead."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=5), 0, 40)
    cfg = small_config(background_interval_ms=1, background_min_samples=2)
    async with SonaRuntime(cfg, seed=1) as rt:
        taken_on: list[int] = []
        real = rt._stats

        def spy() -> Any:
            taken_on.append(threading.get_ident())
            return real()

        rt._stats = spy  # type: ignore[method-assign]
        stop = threading.Event()

        def poll() -> list[bool]:
            held = []
            while not stop.is_set() or not held:
                held.append(identity_holds(rt.stats()))
            return held

        async with anyio.create_task_group() as tg:
            results: list[list[bool]] = []

            async def reader() -> None:
                results.append(await anyio.to_thread.run_sync(poll))

            tg.start_soon(reader)
            for i in range(3000):
                await rt.submit(samples[i % len(samples)])
                if i % 50 == 0:
                    await anyio.sleep(0)
            stop.set()
        assert set(taken_on) == {threading.get_ident()}
        assert all(results[0]) and rt.stats().background_count > 1
    assert rt.stats().submitted_count == 3000  # stopped: read directly, from any thread
    assert await anyio.to_thread.run_sync(rt.stats) == rt.stats()


def test_a_runtime_used_from_a_second_event_loop_refuses_with_a_clear_error() -> None:
    """Entered in one ``asyncio.run`` that ended without leaving ``async with``, then called
    from another: its tickets belong to the first loop, so a submit there failed with
    asyncio's 'attached to a different loop' or waited for ever."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=5), 0, 3)
    rt = SonaRuntime(small_config(), seed=1)

    async def enter() -> None:
        await rt.__aenter__()
        await rt.submit(samples[0])

    async def use() -> None:
        with pytest.raises(RuntimeError, match="another event loop"):
            await rt.submit(samples[1])
        with pytest.raises(RuntimeError, match="another event loop"):
            rt.submit_nowait(samples[2])

    asyncio.run(enter())
    asyncio.run(use())
