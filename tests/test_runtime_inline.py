"""The Instant loop handles a sample in the submitting task while it is idle, without starving
the other tasks of the event loop, and with its crash semantics unchanged."""

from __future__ import annotations

import anyio
import pytest
from event_helpers import buffered
from runtime_helpers import (
    FailsOnce,
    crash_instant_once,
    identity_holds,
    rated_samples,
    small_config,
)

from sona.events import BackgroundCompleted, InstantApplied, LoopCrashed, LoopRestarted
from sona.live_copies import SNAPSHOT_EVERY
from sona.runtime import _INLINE_BUDGET, SonaRuntime

pytestmark = pytest.mark.anyio


async def test_an_idle_instant_loop_handles_samples_inline() -> None:
    samples = rated_samples(50)
    async with SonaRuntime(small_config(), seed=0) as rt:
        async with rt.subscribe(kinds=[InstantApplied], buffer=100) as sub:
            for s in samples:
                result = await rt.submit(s)
                assert result.applied
            seqs = [e.sample_id for e in buffered(sub)]
        inst = rt.supervisor_stats()["instant"]
        assert inst["inline"] == 50 and inst["processed"] == 50
        assert seqs == sorted(seqs) and len(seqs) == 50
        st = rt.stats()
        assert st.instant_count == 50 and identity_holds(st)


async def _turns_while_submitting(n: int, producers: int) -> tuple[int, int]:
    """(event-loop turns a ticker task saw, samples handled inline) while ``producers`` tasks
    that never wait submit ``n`` samples between them; no Background tick or pressure meanwhile."""
    samples = rated_samples(40)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.sleep(0)

    async def producer(k: int) -> None:
        for i in range(k, n, producers):
            await rt.submit(samples[i % len(samples)])

    cfg = small_config(background_interval_ms=3_600_000, max_pending_samples=10_000)
    async with SonaRuntime(cfg, seed=0) as rt:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.sleep(0)
            start = ticks
            async with anyio.create_task_group() as submitters:
                for k in range(producers):
                    submitters.start_soon(producer, k)
            during = ticks - start
            done = True
        return during, rt.supervisor_stats()["instant"]["inline"]


async def test_a_producer_that_never_waits_still_lets_other_tasks_run() -> None:
    n = 10 * _INLINE_BUDGET
    during, inline = await _turns_while_submitting(n, producers=1)
    assert inline == n
    # one yield per budget: the ticker ran about n / budget times, not zero and not n times
    assert n // _INLINE_BUDGET - 2 <= during <= n // _INLINE_BUDGET + 2


async def test_the_budget_is_shared_by_all_submitters() -> None:
    """With four producers, a turn of the event loop still handles about one budget's worth of
    samples inline, not four: the other tasks run as often as with one producer."""
    n = 20 * _INLINE_BUDGET
    during, inline = await _turns_while_submitting(n, producers=4)
    assert inline == n
    assert during >= n // (_INLINE_BUDGET + 4) - 2


async def test_reaching_the_pressure_mark_lets_the_background_loop_start_at_once() -> None:
    """A producer that never waits still hands over at the pressure mark (a quarter below the
    bound), not a budget's worth of samples later, when the bound would already have stopped
    it."""
    samples = rated_samples(40)
    bound = 400
    cfg = small_config(background_interval_ms=3_600_000, max_pending_samples=bound)
    rt = SonaRuntime(cfg, seed=0)
    async with rt, rt.subscribe(kinds=[BackgroundCompleted], buffer=1000) as sub:
        for i in range(3000):
            await rt.submit(samples[i % len(samples)])
        await rt.drain()
        used = [e.samples_used for e in buffered(sub)]
    assert len(used) >= 5
    # the first hand-over (later ones can wait for a consolidation still in its thread): the
    # samples up to the mark, about a tenth of them held back to measure the consolidation
    # (those after the live adapter's copy nearest that: up to half a gap between copies off)
    mark = bound - bound // 4
    assert used[0] <= mark - mark // 10 + SNAPSHOT_EVERY // 2


async def test_a_crash_while_handling_inline_is_retried_by_the_restarted_loop() -> None:
    samples = rated_samples(5)
    async with SonaRuntime(small_config(), seed=0) as rt:
        async with rt.subscribe(kinds=[LoopCrashed, LoopRestarted], buffer=10) as sub:
            crash_instant_once(rt)
            first = await rt.submit(samples[0])  # raised inline; answered after the retry
            assert first.applied
            rest = [await rt.submit(s) for s in samples[1:]]
            assert all(r.applied for r in rest)
            kinds = [type(e) for e in buffered(sub)]
        await rt.drain()
        st = rt.stats()
        assert kinds == [LoopCrashed, LoopRestarted]
        assert st.restarts == 1 and st.instant_count == 5 and st.dead_lettered == 0
        assert identity_holds(st)
        assert rt.supervisor_stats()["instant"]["inline"] == 4


async def test_an_idle_instant_loop_hands_over_in_the_background_loops_task() -> None:
    """The hand-over is asked inline: no turn of the Instant loop's own task, and none for
    the Background loop to resume in, between the request and the consolidation."""
    samples = rated_samples(50)
    async with SonaRuntime(small_config(), seed=0) as rt:
        for s in samples:
            assert (await rt.submit(s)).applied
        await rt.consolidate()
        inst = rt.supervisor_stats()["instant"]
        assert inst["inline"] == 51 and inst["processed"] == 51  # the samples and the hand-over
        st = rt.stats()
        assert st.background_count == 1 and identity_holds(st)


async def test_a_crash_while_handing_over_inline_is_retried_and_loses_nothing() -> None:
    samples = rated_samples(50)
    async with SonaRuntime(small_config(), seed=0) as rt:
        take = FailsOnce(rt._take_hand_over, RuntimeError("hand-over crashed on purpose"))
        rt._take_hand_over = take  # type: ignore[method-assign]
        for s in samples:
            assert (await rt.submit(s)).applied
        async with rt.subscribe(kinds=[LoopCrashed, LoopRestarted], buffer=10) as sub:
            await rt.consolidate()  # answered by the restarted Instant loop's retry
            events = buffered(sub)
        assert [(type(e), e.actor) for e in events] == [
            (LoopCrashed, "instant"),
            (LoopRestarted, "instant"),
        ]
        assert take.calls == 2
        await rt.drain()
        st = rt.stats()
        assert st.background_count == 1 and st.restarts == 1 and st.dead_lettered == 0
        assert st.consolidated_count + st.pending_samples == 50 and identity_holds(st)
