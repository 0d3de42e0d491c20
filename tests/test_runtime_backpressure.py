"""max_pending_samples with a stalled Background loop: each overflow policy at ingress."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from event_helpers import buffered
from runtime_helpers import (
    crash_instant_once,
    identity_holds,
    rated_samples,
    small_config,
    stall_background,
)
from sona.actors import Backpressure, OverflowPolicy, SamplesDropped

from sona import checkpoint as ckpt
from sona.events import InstantApplied
from sona.lora import AdaptFeedback
from sona.runtime import _INLINE_BUDGET, SonaRuntime

pytestmark = pytest.mark.anyio

LIMIT = 100
STALLED = 3_600_000  # ms: no periodic tick; consolidation only under pressure, and it hangs


def _config(policy: OverflowPolicy) -> object:
    return small_config(max_pending_samples=LIMIT, overflow=policy, background_interval_ms=STALLED)


async def test_block_suspends_submitters_until_background_drains() -> None:
    samples = rated_samples(LIMIT + 20)
    async with SonaRuntime(_config(OverflowPolicy.BLOCK), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        for s in samples[:LIMIT]:
            assert (await rt.submit(s)).applied
        assert rt.stats().pending_samples == LIMIT
        finished: list[int] = []

        async def submitter(i: int) -> None:
            await rt.submit(samples[LIMIT + i])
            finished.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(submitter, i)
            await anyio.sleep(0.2)
            assert finished == []  # really suspended: nothing got in
            assert rt.stats().submitted_count == LIMIT
            gate.set()  # the Background loop catches up and makes room
            await rt.consolidate()
        assert sorted(finished) == list(range(20))
        await rt.drain()
        st = rt.stats()
        assert st.dropped_samples == 0
        assert st.submitted_count == st.instant_count + st.skipped_count + st.dead_lettered
        assert identity_holds(st)


async def test_drop_newest_drops_and_announces_each_incoming_sample() -> None:
    samples = rated_samples(LIMIT + 37)
    async with SonaRuntime(_config(OverflowPolicy.DROP_NEWEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        async with rt.subscribe(kinds=[SamplesDropped], buffer=1000) as sub:
            results = [await rt.submit(s) for s in samples]
            await rt.drain()
            gate.set()
            dropped_events = sum(ev.count for ev in buffered(sub) if isinstance(ev, SamplesDropped))
        assert [r.applied for r in results[LIMIT:]] == [False] * 37
        assert all("DROP_NEWEST" in r.notes[0] for r in results[LIMIT:])
        assert all(r.applied for r in results[:LIMIT])
        st = rt.stats()
        assert st.dropped_samples == 37 == dropped_events
        assert st.submitted_count == (
            st.instant_count + st.skipped_count + st.dropped_samples + st.dead_lettered
        )
        assert identity_holds(st)


async def test_drop_oldest_drops_unhandled_samples_first() -> None:
    samples = rated_samples(LIMIT + 10)
    async with SonaRuntime(_config(OverflowPolicy.DROP_OLDEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        async with rt.subscribe(kinds=[SamplesDropped], buffer=1000) as sub:
            # An idle Instant loop handles each sample in the submitting task. After a crash
            # it is not idle: until it has restarted, samples wait in its mailbox, and the
            # oldest of those are the ones dropped (the first, being retried, among them).
            crash_instant_once(rt)
            for s in samples:
                rt.submit_nowait(s)
            assert rt.stats().dropped_samples == 10
            await rt.drain()
            stages = _drops_by_stage(sub)
        st = rt.stats()
        gate.set()
        assert st.dropped_samples == 10 and st.evicted_samples == 0
        assert stages == {"ingress": 10}
        assert st.instant_count == LIMIT and st.pending_samples == LIMIT
        assert identity_holds(st)


async def test_drop_oldest_drops_exactly_the_oldest_waiting_samples() -> None:
    """Which samples go matters, not only how many: the oldest accepted and not yet handled
    (ids 1-10, the first one held for its retry), never the newest waiting ones."""
    samples = rated_samples(LIMIT + 10)
    async with SonaRuntime(_config(OverflowPolicy.DROP_OLDEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        async with rt.subscribe(kinds=[InstantApplied], buffer=1000) as sub:
            crash_instant_once(rt)  # from here on, samples wait in the mailbox
            for s in samples:
                rt.submit_nowait(s)
            await rt.drain()
            applied = [e.sample_id for e in buffered(sub) if isinstance(e, InstantApplied)]
        gate.set()
    assert applied == list(range(11, LIMIT + 11))


async def test_drop_oldest_takes_back_the_message_of_each_sample_it_drops() -> None:
    """Far more samples than the Instant mailbox's margin over the bound arrive while the loop
    restarts: each drop takes its message out of the mailbox, so no caller ever gets
    Backpressure (the mailbox is BLOCK), and the mailbox holds no more than the bound."""
    samples = rated_samples(LIMIT + 300)
    async with SonaRuntime(_config(OverflowPolicy.DROP_OLDEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        crash_instant_once(rt)
        for s in samples:
            rt.submit_nowait(s)
        assert rt._instant_ref.qsize() <= LIMIT + 1  # and the message held for its retry
        await rt.drain()
        st = rt.stats()
        gate.set()
        assert st.dropped_samples == 300 and st.instant_count == LIMIT
        assert identity_holds(st)


async def test_drop_oldest_evicts_the_oldest_sample_not_yet_handed_over() -> None:
    samples = rated_samples(LIMIT + 20)
    async with SonaRuntime(_config(OverflowPolicy.DROP_OLDEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)  # its first hand-over (near the bound) hangs
        async with rt.subscribe(kinds=[SamplesDropped], buffer=1000) as sub:
            for s in samples:
                assert (await rt.submit(s)).applied
            await rt.drain()
            stages = _drops_by_stage(sub)
        st = rt.stats()
        gate.set()
        assert st.evicted_samples == 20 and st.dropped_samples == 0
        assert stages == {"consolidation": 20}
        assert st.pending_samples == LIMIT
        assert identity_holds(st)


async def test_evicted_samples_give_their_room_back() -> None:
    """An evicted sample is out of the buffer: once the consolidation that was stalled has
    run, a buffer's worth less one fits again without a single further eviction."""
    samples = rated_samples(2 * LIMIT + 20)
    async with SonaRuntime(_config(OverflowPolicy.DROP_OLDEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        for s in samples[: LIMIT + 20]:
            await rt.submit(s)
        assert rt.stats().evicted_samples == 20
        gate.set()
        while rt.stats().pending_samples:
            await rt.consolidate()
        for s in samples[LIMIT + 20 : 2 * LIMIT + 19]:
            assert (await rt.submit(s)).applied
        await rt.drain()
        st = rt.stats()
        assert st.evicted_samples == 20 and st.dropped_samples == 0
        assert identity_holds(st)


async def test_skipped_samples_take_no_room_in_the_buffer() -> None:
    """A skipped sample changed nothing and is never consolidated: it must not count against
    ``max_pending_samples``, or after a buffer's worth of them REJECT refuses (and BLOCK
    waits for ever) with nothing pending."""
    x = rated_samples(1)[0].input_embedding
    async with SonaRuntime(_config(OverflowPolicy.REJECT), seed=0) as rt:  # type: ignore[arg-type]
        for _ in range(3 * LIMIT):
            assert not (await rt.adapt(x, AdaptFeedback.from_quality(0.5))).applied
        st = rt.stats()
        assert st.skipped_count == 3 * LIMIT and st.pending_samples == 0
        for s in rated_samples(LIMIT - 1, seed=1):
            assert (await rt.submit(s)).applied
        assert rt.stats().pending_samples == LIMIT - 1


async def test_drop_oldest_drops_the_newcomer_when_all_pending_is_being_consolidated() -> None:
    """Samples already handed over to a consolidation under way cannot be evicted: the bound
    still holds, by dropping the incoming sample, counted and announced like any drop."""
    samples = rated_samples(LIMIT + 5)
    cfg = small_config(
        max_pending_samples=LIMIT,
        overflow=OverflowPolicy.DROP_OLDEST,
        background_interval_ms=STALLED,
        background_min_samples=LIMIT,  # the first hand-over takes every pending sample
    )
    async with SonaRuntime(cfg, seed=0) as rt:
        gate = stall_background(rt)
        async with rt.subscribe(kinds=[SamplesDropped], buffer=1000) as sub:
            for s in samples[:LIMIT]:
                assert (await rt.submit(s)).applied
            with anyio.fail_after(5):
                while rt._instant.unfinished is None:  # handed over, hanging in its thread
                    await anyio.sleep(0.001)
            assert len(rt._instant.unfinished.samples) == LIMIT
            late = [await rt.submit(s) for s in samples[LIMIT:-1]]
            rt.submit_nowait(samples[-1])
            stages = _drops_by_stage(sub)
        st = rt.stats()
        gate.set()
        assert not any(r.applied for r in late)
        assert all("every pending sample is in a consolidation" in r.notes[0] for r in late)
        assert st.dropped_samples == 5 and st.evicted_samples == 0
        assert stages == {"ingress": 5}
        assert st.pending_samples == LIMIT
        assert identity_holds(st)


async def test_a_restored_consolidation_under_way_still_counts_against_the_bound(
    tmp_path: Path,
) -> None:
    """A checkpoint taken while a consolidation holds every pending sample: restored, those
    samples are still pending until that consolidation commits, so the buffer is full and
    REJECT refuses the next sample."""
    cfg = small_config(
        max_pending_samples=LIMIT,
        overflow=OverflowPolicy.REJECT,
        background_interval_ms=STALLED,
        background_min_samples=LIMIT,  # the first hand-over takes every pending sample
    )
    samples = rated_samples(LIMIT + 1)
    async with SonaRuntime(cfg, seed=0) as rt:
        gate = stall_background(rt)
        for s in samples[:LIMIT]:
            assert (await rt.submit(s)).applied
        with anyio.fail_after(5):
            while rt._instant.unfinished is None:  # handed over, hanging in its thread
                await anyio.sleep(0.001)
        ckpt.write(rt._durable.capture_now(), tmp_path / "c.sona")
        gate.set()
    again = SonaRuntime.restore(tmp_path / "c.sona")
    gate = stall_background(again)  # the restored hand-over is consolidated first: hold it
    try:
        async with again:
            assert again.stats().pending_samples == LIMIT
            with pytest.raises(Backpressure):
                await again.submit(samples[LIMIT])
            assert again.stats().submitted_count == LIMIT
            gate.set()
    finally:
        gate.set()


async def test_a_restored_runtime_keeps_its_eviction_count(tmp_path: Path) -> None:
    """evicted_samples is a term of instant == consolidated + evicted + pending: a restore
    that lost it would break the identity for the rest of the run."""
    samples = rated_samples(LIMIT + 20)
    async with SonaRuntime(_config(OverflowPolicy.DROP_OLDEST), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        for s in samples:
            assert (await rt.submit(s)).applied
        await rt.drain()
        gate.set()
        path = await rt.checkpoint(tmp_path / "c.sona")
        before = rt.stats()
    st = SonaRuntime.restore(path).stats()
    assert st.evicted_samples == before.evicted_samples == 20
    assert (st.instant_count, st.consolidated_count, st.pending_samples) == (
        before.instant_count,
        before.consolidated_count,
        before.pending_samples,
    )
    assert identity_holds(st)


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_NEWEST, OverflowPolicy.REJECT])
async def test_a_producer_that_never_waits_for_drops_still_lets_other_tasks_run(
    policy: OverflowPolicy,
) -> None:
    """A drop (or a refusal) is answered in the submitting task, like a sample handled
    inline, and spends the same budget: the event loop still turns, once per budget."""
    samples = rated_samples(LIMIT)
    n = 10 * _INLINE_BUDGET
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    async def submit(s: object) -> bool:
        try:
            return (await rt.submit(s)).applied  # type: ignore[arg-type]
        except Backpressure:
            return False

    async with SonaRuntime(_config(policy), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        for s in samples:
            rt.submit_nowait(s)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.sleep(0)
            start, turns = ticks, rt._inline_turn
            results = [await submit(samples[i % LIMIT]) for i in range(n)]
            during, turns = ticks - start, rt._inline_turn - turns
            tg.cancel_scope.cancel()
        gate.set()
        assert not any(results)
        # one turn per budget, not one per drop; other tasks ran in each, many times: with a
        # consolidation in its worker thread (here held there), a turn at a full buffer lasts
        # a while, so that the worker gets the GIL
        assert n // _INLINE_BUDGET - 1 <= turns <= n // _INLINE_BUDGET + 1
        assert during >= 5 * turns
        dropped = n if policy is OverflowPolicy.DROP_NEWEST else 0
        assert rt.stats().dropped_samples == dropped


async def test_drop_newest_recovers_once_the_background_loop_makes_room() -> None:
    """A producer submitting in a loop that never waits, into a full buffer: the Background
    loop gets its turns, and its worker thread the GIL, so it consolidates and samples are
    applied again, a whole buffer of them, rather than every one from the first drop on
    being dropped."""
    samples = rated_samples(LIMIT)
    cfg = small_config(
        max_pending_samples=LIMIT, overflow=OverflowPolicy.DROP_NEWEST, background_interval_ms=5
    )
    async with SonaRuntime(cfg, seed=0) as rt:
        dropped_before = applied_after = 0
        for i in range(5_000_000):  # bounded: without turns this never ends on its own
            result = await rt.submit(samples[i % LIMIT])
            if not result.applied:
                dropped_before += 1
            elif dropped_before:
                applied_after += 1
                if applied_after == LIMIT:
                    break
        await rt.drain()
        assert dropped_before > 0 and applied_after == LIMIT
        assert identity_holds(rt.stats())


def _drops_by_stage(sub: object) -> dict[str, int]:
    stages: dict[str, int] = {}
    for ev in buffered(sub):
        if isinstance(ev, SamplesDropped):
            stages[ev.stage] = stages.get(ev.stage, 0) + ev.count
    return stages


async def test_reject_raises_backpressure_and_counts_nothing() -> None:
    samples = rated_samples(LIMIT + 1)
    async with SonaRuntime(_config(OverflowPolicy.REJECT), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        for s in samples[:LIMIT]:
            await rt.submit(s)
        with pytest.raises(Backpressure):
            await rt.submit(samples[-1])
        with pytest.raises(Backpressure):
            rt.submit_nowait(samples[-1])
        await rt.drain()
        st = rt.stats()
        assert st.submitted_count == LIMIT == st.instant_count
        assert identity_holds(st)
        gate.set()
        await rt.consolidate()
        assert (await rt.submit(samples[-1])).applied  # room again after consolidation


async def test_block_submit_nowait_raises_when_full() -> None:
    samples = rated_samples(LIMIT + 1)
    async with SonaRuntime(_config(OverflowPolicy.BLOCK), seed=0) as rt:  # type: ignore[arg-type]
        gate = stall_background(rt)
        for s in samples[:LIMIT]:
            rt.submit_nowait(s)
        with pytest.raises(Backpressure):
            rt.submit_nowait(samples[-1])
        await rt.drain()
        assert identity_holds(rt.stats())
        gate.set()
