"""Stopping never leaves the host waiting: however the stop comes (a drain that times out, the
host cancelling meanwhile), the loops stop in the host's task, the directory is released,
every caller gets an answer and every subscription ends."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from runtime_helpers import (
    hold_deep_runs,
    identity_holds,
    rated_samples,
    small_config,
    stall_background,
    target_samples,
)
from sona.actors import ActorStopped, OverflowPolicy

from sona.config import Chaos, SupervisionConfig
from sona.events import SamplesDropped
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.simulator import DomainWorld
from sona.worker_threads import blas_limited

pytestmark = pytest.mark.anyio


def _samples(n: int) -> list[Any]:
    return target_samples(DomainWorld(dim=32, domains=1, seed=2), 0, n)


def _slow_instant(**changes: object) -> tuple[Any, Chaos]:
    """An Instant loop that crashes on every message and restarts after 0.2 s: within a 0.3 s
    shutdown timeout it handles almost nothing, so accepted samples are left over at stop."""
    supervision = SupervisionConfig(
        max_restarts=10_000, backoff_min_s=0.2, backoff_max_s=0.2, jitter=0.0,
        shutdown_timeout_s=0.3,
    )  # fmt: skip
    cfg = small_config(supervision=supervision, **changes)
    return cfg, Chaos(crash_probability=1.0, loops=("instant",), seed=3)


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.mark.parametrize("durable", [False, True])
async def test_a_host_cancelling_during_the_drain_stops_everything_cleanly(
    durable: bool, tmp_path: Path
) -> None:
    """The host's shutdown cancels while ``__aexit__`` drains 3,000 queued samples: the
    cancellation comes out as a plain cancellation, no task of the runtime outlives it, and
    with a checkpoint_dir the directory is free and every accepted sample comes back."""
    samples = _samples(3000)
    state = tmp_path / "state"
    before = _other_tasks()
    body_done = anyio.Event()
    cfg = small_config(max_pending_samples=5000)

    async def service() -> None:
        async with SonaRuntime(cfg, seed=1, checkpoint_dir=state if durable else None) as rt:
            for s in samples:
                rt.submit_nowait(s)
            body_done.set()

    async with anyio.create_task_group() as tg:  # raises if a cancel scope was left open
        tg.start_soon(service)
        await body_done.wait()
        await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    await anyio.sleep(0.05)
    assert _other_tasks() <= before
    if durable:
        with anyio.fail_after(30):
            async with SonaRuntime.restore(state) as rt2:  # the lock was released
                await rt2.drain()
                st = rt2.stats()
        assert st.submitted_count == len(samples) and st.instant_count == len(samples)


async def test_callers_left_waiting_at_stop_are_answered_and_counted() -> None:
    cfg, chaos = _slow_instant()
    rt = SonaRuntime(cfg, seed=1, chaos=chaos)
    answers: list[Any] = []
    dropped: list[SamplesDropped] = []

    async def caller(s: Any) -> None:
        answers.append(await rt.submit(s))

    async def watch(ready: anyio.Event) -> None:
        async with rt.subscribe(kinds=SamplesDropped) as sub:
            ready.set()
            async for ev in sub:  # type: ignore[attr-defined]  # ends when the runtime stops
                dropped.append(ev)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer, rt:
            ready = anyio.Event()
            outer.start_soon(watch, ready)
            await ready.wait()
            for s in _samples(40):
                outer.start_soon(caller, s)
            await anyio.sleep(0.05)
    st = rt.stats()
    assert len(answers) == 40
    left = [a for a in answers if a.notes and "stopped before handling" in a.notes[0]]
    assert left and all(not a.applied for a in left)
    assert st.in_flight == 0 and identity_holds(st)
    assert st.dropped_samples == len(left) == sum(e.count for e in dropped)
    assert {e.stage for e in dropped} == {"shutdown"}
    with anyio.fail_after(1):
        await rt.drain()  # returns at once on a stopped runtime


async def test_with_a_checkpoint_dir_leftovers_stay_in_flight_and_are_handled_after_restore(
    tmp_path: Path,
) -> None:
    cfg, chaos = _slow_instant()
    state = tmp_path / "state"
    rt = SonaRuntime(cfg, seed=1, chaos=chaos, checkpoint_dir=state)
    answers: list[Any] = []

    async def caller(s: Any) -> None:
        answers.append(await rt.submit(s))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer, rt:
            for s in _samples(30):
                outer.start_soon(caller, s)
            await anyio.sleep(0.05)
    st = rt.stats()
    left = [a for a in answers if a.notes and "final checkpoint keeps it" in a.notes[0]]
    assert len(answers) == 30 and left
    assert st.in_flight == len(left) and st.dropped_samples == 0 and identity_holds(st)
    with anyio.fail_after(30):
        async with SonaRuntime.restore(state) as rt2:
            await rt2.drain()
            st2 = rt2.stats()
    assert st2.in_flight == 0 and identity_holds(st2)
    assert st2.instant_count + st2.dead_lettered >= st.instant_count + len(left)


async def test_a_drain_waiting_in_another_task_returns_when_a_durable_runtime_stops(
    tmp_path: Path,
) -> None:
    """With a checkpoint_dir, samples unhandled at stop stay in flight (the final checkpoint
    keeps them): a drain() waiting in another task must still return, as on a runtime without
    one, instead of waiting for samples no loop will handle."""
    cfg, chaos = _slow_instant()
    rt = SonaRuntime(cfg, seed=1, chaos=chaos, checkpoint_dir=tmp_path / "state")
    drained = anyio.Event()

    async def drainer() -> None:
        await rt.drain()
        drained.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            async with rt:
                for s in _samples(30):
                    rt.submit_nowait(s)
                outer.start_soon(drainer)
                await anyio.sleep(0.05)
            with anyio.fail_after(5):  # turned into a failure: the old drain never returned
                await drained.wait()
    st = rt.stats()
    assert st.in_flight > 0 and identity_holds(st)


async def test_submitters_waiting_for_room_get_the_not_running_error() -> None:
    cfg = small_config(
        max_pending_samples=8, background_min_samples=4, overflow=OverflowPolicy.BLOCK
    )
    errors: list[str] = []
    rt = SonaRuntime(cfg, seed=1)

    async def producer(s: Any) -> None:
        try:
            await rt.submit(s)
        except RuntimeError as exc:
            errors.append(str(exc))

    def failing(*args: Any) -> Any:
        time.sleep(0.5)  # still failing when the runtime stops: room never comes
        raise RuntimeError("x")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer, rt:
            rt._background.prepare = failing
            for s in _samples(30):
                outer.start_soon(producer, s)
            await anyio.sleep(0.05)
    assert errors and all("not running" in e for e in errors)
    assert identity_holds(rt.stats())


async def test_a_burst_of_new_task_calls_marks_one_shift() -> None:
    async with SonaRuntime(small_config(), seed=1) as rt:
        before = rt.stats().task_count
        for _ in range(200):
            rt.start_new_task()  # used to fill the Background mailbox and raise Backpressure
        with anyio.fail_after(5):
            while rt.stats().task_count == before:
                await anyio.sleep(0.005)
        await anyio.sleep(0.05)
        assert rt.stats().task_count == before + 1
        rt.start_new_task()  # once that shift began, a call marks the next one
        with anyio.fail_after(5):
            while rt.stats().task_count == before + 1:
                await anyio.sleep(0.005)


async def test_new_task_is_marked_when_the_background_mailbox_is_full_of_requests() -> None:
    """Many host tasks asking for consolidations (or checkpoints) while one runs fill the
    Background mailbox: start_new_task raised the mailbox's Backpressure and the shift was
    lost. The shift now waits for room like those requests do."""
    async with SonaRuntime(small_config(), seed=1) as rt:
        for s in _samples(40):
            await rt.submit(s)
        before = rt.stats().task_count
        gate = stall_background(rt)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(80):
                    tg.start_soon(rt.consolidate)
                while rt.supervisor_stats()["background"]["queued"] < 64:
                    await anyio.sleep(0.001)
                rt.start_new_task()
                rt.start_new_task()  # the same shift
                gate.set()
            while rt.stats().task_count == before:
                await anyio.sleep(0.005)
        await rt.consolidate()
        assert rt.stats().task_count == before + 1


@pytest.mark.parametrize("samples", [None, []])
async def test_a_deep_run_with_nothing_to_look_at_keeps_the_accumulated_quality(
    samples: list[TrainingSample] | None,
) -> None:
    """As in the synchronous engine: before the first consolidation, or on an empty list, a
    Deep run replays nothing and must not reset what the automatic trigger has counted."""
    async with SonaRuntime(small_config(background_interval_ms=60_000), seed=2) as rt:
        for s in rated_samples(4):
            await rt.submit(s)
        before = rt.stats().accumulated_quality
        assert before > 0.0
        result = await rt.deep_optimize(samples)
        assert result.epochs == 0
        assert rt.stats().accumulated_quality == before


@pytest.mark.parametrize("samples", ["abc", 5])
async def test_deep_optimize_refuses_what_is_not_an_iterable_of_samples(samples: object) -> None:
    async with SonaRuntime(small_config(), seed=2) as rt:
        one = rated_samples(1)[0]
        for bad in (samples, one):
            with pytest.raises(TypeError, match="samples must be an iterable"):
                await rt.deep_optimize(bad)  # type: ignore[arg-type]


async def test_the_loops_drain_in_what_is_left_of_the_shutdown_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The runtime drains accepted samples first, then the supervisor drains the loops'
    mailboxes: in what is left of one ``shutdown_timeout_s``, not in a second one. Here the
    first drain times out (an Instant loop that crashes on every message), so the mailboxes
    get no time at all."""
    cfg, chaos = _slow_instant()
    caplog.set_level(logging.WARNING, logger="sona.actors.supervisor")
    async with SonaRuntime(cfg, seed=1, chaos=chaos) as rt:
        for s in _samples(20):
            rt.submit_nowait(s)
        await anyio.sleep(0.05)
    timed_out = [
        r.msg for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "drain_timed_out"
    ]  # fmt: skip
    assert [m["timeout_s"] for m in timed_out] == [0.0]
    assert identity_holds(rt.stats())


async def test_leaving_does_not_wait_for_a_deep_run_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Deep run cannot be stopped in its thread. Past the drain timeout the runtime stops
    without its result, which the state does without (the on-demand caller gets
    ActorStopped), and the thread finishes it for nobody: leaving returns while the run is
    still held in its thread here, and BLAS stays limited to one thread until it ends."""
    entered, release = hold_deep_runs(monkeypatch)
    cfg = small_config(supervision=SupervisionConfig(shutdown_timeout_s=0.2))
    errors: list[BaseException] = []
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async with SonaRuntime(cfg, seed=1) as rt:
                    for s in _samples(50):
                        await rt.submit(s)
                    await rt.consolidate()

                    async def deep() -> None:
                        try:
                            await rt.deep_optimize()
                        except ActorStopped as error:
                            errors.append(error)

                    tg.start_soon(deep)
                    while not entered.is_set():
                        await anyio.sleep(0.01)
                assert not release.is_set()
                assert blas_limited()
    finally:
        release.set()
    with anyio.fail_after(30):
        while blas_limited():
            await anyio.sleep(0.01)
    assert len(errors) == 1
    st = rt.stats()
    assert st.deep_count == 0 and identity_holds(st)
