"""EventBus: broadcast, numbering, bounded buffers and in-band Lagged."""

from __future__ import annotations

import inspect

import anyio
import msgspec
import pytest
from sona.actors import (
    ActorEvent,
    DeadLettered,
    EventBus,
    Lagged,
    LoopCrashed,
    LoopRestarted,
    SamplesDropped,
    SupervisorGaveUpEvent,
)
from sona.actors.events import Event

pytestmark = pytest.mark.anyio


class Tick(Event, frozen=True, kw_only=True):
    n: int


async def test_publish_numbers_events_and_reaches_every_subscriber() -> None:
    bus = EventBus()
    assert bus.publish(Tick(n=0)) == 0
    async with bus.subscribe() as a, bus.subscribe() as b:
        assert bus.publish(Tick(n=1)) == 2
        assert bus.publish(Tick(n=2)) == 2
        got_a = [a.receive_nowait(), a.receive_nowait()]
        got_b = [b.receive_nowait(), b.receive_nowait()]
    assert got_a == got_b
    assert [e.n for e in got_a] == [1, 2]
    assert [e.seq for e in got_a] == [2, 3]
    assert all(e.at > 0 for e in got_a)


async def test_publish_never_waits_on_a_subscriber_that_never_reads() -> None:
    assert not inspect.iscoroutinefunction(EventBus.publish)
    bus = EventBus()
    async with bus.subscribe(buffer=8) as stuck, bus.subscribe(buffer=100_000) as other:
        for i in range(50_000):
            assert bus.publish(Tick(n=i)) == 2
        assert stuck.pending == 8  # memory stays bounded by the buffer
        assert other.pending == 50_000


async def test_lagging_subscriber_gets_exact_missed_count_then_the_newest() -> None:
    bus = EventBus()
    async with bus.subscribe(buffer=4) as sub:
        for i in range(10):
            bus.publish(Tick(n=i))
        lagged = sub.receive_nowait()
        assert isinstance(lagged, Lagged)
        assert lagged.missed == 6
        assert lagged.seq == 6  # the last one missed
        rest = [sub.receive_nowait() for _ in range(4)]
        assert [e.n for e in rest] == [6, 7, 8, 9]
        with pytest.raises(anyio.WouldBlock):
            sub.receive_nowait()
        # a second lag is reported again, exactly
        for i in range(10, 15):
            bus.publish(Tick(n=i))
        again = sub.receive_nowait()
        assert isinstance(again, Lagged) and again.missed == 1
        assert [sub.receive_nowait().n for _ in range(4)] == [11, 12, 13, 14]
        assert sub.total_missed == 7


async def test_slow_and_fast_subscribers_concurrently() -> None:
    bus = EventBus()
    total = 2000
    seen_fast: list[int] = []
    seen_slow: list[object] = []

    async def fast() -> None:
        async with bus.subscribe(buffer=total) as sub:
            ready.set()
            async for event in sub:
                seen_fast.append(event.seq)

    async def slow() -> None:
        async with bus.subscribe(buffer=16) as sub:
            ready2.set()
            async for event in sub:
                seen_slow.append(event)
                await anyio.sleep(0.0005)

    ready, ready2 = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(fast)
        tg.start_soon(slow)
        await ready.wait()
        await ready2.wait()
        for i in range(total):
            bus.publish(Tick(n=i))
            if i % 100 == 0:
                await anyio.lowlevel.checkpoint()
        bus.close()
    assert seen_fast == list(range(1, total + 1))
    lags = [e for e in seen_slow if isinstance(e, Lagged)]
    ticks = [e for e in seen_slow if isinstance(e, Tick)]
    assert lags, "the slow subscriber should have lagged"
    assert sum(e.missed for e in lags) + len(ticks) == total
    seqs = [e.seq for e in seen_slow]  # type: ignore[attr-defined]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert ticks[-1].n == total - 1  # it ends on the newest


async def test_subscribe_and_leave_at_any_time() -> None:
    bus = EventBus()
    async with bus.subscribe() as early:
        bus.publish(Tick(n=1))
        async with bus.subscribe() as late:
            bus.publish(Tick(n=2))
            assert bus.subscriber_count == 2
        assert bus.subscriber_count == 1
        bus.publish(Tick(n=3))
        assert [early.receive_nowait().n for _ in range(3)] == [1, 2, 3]
        assert late.receive_nowait().n == 2  # what was buffered stays readable
        with pytest.raises(anyio.EndOfStream):
            late.receive_nowait()
    assert bus.subscriber_count == 0


async def test_kinds_filter_and_close_ends_iteration() -> None:
    bus = EventBus()
    async with bus.subscribe(kinds=(LoopCrashed,)) as sub:
        bus.publish(Tick(n=1))
        bus.publish(LoopCrashed(actor="a", error_type="E", error="x", consecutive=1))
        bus.close()
        got = [e async for e in sub]
    assert [type(e) for e in got] == [LoopCrashed]
    assert got[0].seq == 2


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        ("LoopCrashed", "the string"),
        (["LoopCrashed"], "event classes"),
        ((LoopCrashed, None), "event classes"),
        (3, "iterable"),
        ([int], "msgspec Structs"),  # would match nothing, silently
        (dict, "msgspec Structs"),
    ],
)
async def test_kinds_that_are_not_classes_are_refused_at_subscribe(
    kinds: object, message: str
) -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match=message):
        bus.subscribe(kinds=kinds)
    assert bus.subscriber_count == 0
    assert bus.publish(LoopCrashed(actor="a", error_type="E", error="x", consecutive=1)) == 0


@pytest.mark.parametrize("buffer", [0, -1, "8", 2.0, True])
async def test_bad_buffer_is_refused_at_subscribe(buffer: object) -> None:
    with pytest.raises((TypeError, ValueError), match="buffer"):
        EventBus().subscribe(buffer=buffer)  # type: ignore[arg-type]


async def test_one_class_or_any_iterable_of_classes_is_a_filter() -> None:
    bus = EventBus()
    async with bus.subscribe(kinds=LoopCrashed) as one, bus.subscribe(kinds=[Tick]) as listed:
        bus.publish(Tick(n=1))
        bus.publish(LoopCrashed(actor="a", error_type="E", error="x", consecutive=1))
        assert type(one.receive_nowait()) is LoopCrashed
        assert listed.receive_nowait().n == 1
        with pytest.raises(anyio.WouldBlock):
            one.receive_nowait()
        with pytest.raises(anyio.WouldBlock):
            listed.receive_nowait()


async def test_wants_follows_subscriptions_and_kinds() -> None:
    bus = EventBus()
    assert not bus.wants(Tick) and not bus.wants(LoopCrashed)
    async with bus.subscribe(kinds=(LoopCrashed,)):
        assert bus.wants(LoopCrashed) and not bus.wants(Tick)
        assert bus.publish(Tick(n=1)) == 0  # nobody takes it, but it is still numbered
        async with bus.subscribe():
            assert bus.wants(Tick)
            assert bus.publish(Tick(n=2)) == 1
        assert not bus.wants(Tick)  # the catch-all subscriber left
    assert not bus.wants(LoopCrashed)
    assert bus.last_seq == 2


def test_events_are_a_frozen_tagged_union() -> None:
    events = [
        LoopCrashed(actor="a", error_type="E", error="x", consecutive=1, seq=1, at=1.0),
        LoopRestarted(actor="a", restarts=1, backoff_s=0.1, cause="a", seq=2, at=2.0),
        SupervisorGaveUpEvent(actor="a", error_type="E", error="x", restarts=5, within_s=3.0),
        DeadLettered(actor="a", message_type="int", message="1", error_type="E", error="x"),
        SamplesDropped(count=2, stage="a", policy="DROP_OLDEST"),
        Lagged(missed=3),
    ]
    data = msgspec.json.encode(events)
    assert msgspec.json.decode(data, type=list[ActorEvent]) == events
    assert b'"type":"SupervisorGaveUp"' in data
    with pytest.raises(AttributeError):
        events[0].seq = 5  # type: ignore[misc]


async def test_publish_after_close_reaches_nobody_even_a_subscriber_still_inside() -> None:
    bus = EventBus()
    async with bus.subscribe() as sub:
        bus.publish(Tick(n=1))
        bus.close()
        assert bus.publish(Tick(n=2)) == 0
        assert [e.n async for e in sub] == [1]
    async with bus.subscribe() as late:
        assert bus.subscriber_count == 0
        assert [e async for e in late] == []


async def test_a_subscription_used_without_entering_it_raises_instead_of_hanging() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish(Tick(n=1))
    with anyio.fail_after(1), pytest.raises(RuntimeError, match="never entered"):
        await sub.receive()
    with anyio.fail_after(1), pytest.raises(RuntimeError, match="never entered"):
        async for _ in sub:
            pass


async def test_a_subscription_is_entered_only_once() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    async with sub:
        with pytest.raises(RuntimeError, match="only once"):
            await sub.__aenter__()
        bus.publish(Tick(n=1))
        assert sub.pending == 1 and bus.subscriber_count == 1
    with pytest.raises(RuntimeError, match="only once"):
        await sub.__aenter__()
    assert bus.subscriber_count == 0


@pytest.mark.parametrize("event", [3, "crash", {"seq": 0}])
async def test_publish_refuses_what_is_not_an_event_and_takes_no_number(event: object) -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="publish\\(\\) takes a msgspec Struct"):
        bus.publish(event)  # type: ignore[type-var]  # nobody subscribed
    async with bus.subscribe() as sub:
        with pytest.raises(TypeError, match="publish\\(\\) takes a msgspec Struct"):
            bus.publish(event)  # type: ignore[type-var]
        assert bus.last_seq == 0 and sub.pending == 0


async def test_publish_keeps_a_time_the_publisher_set_and_stamps_the_bus_clock_otherwise() -> None:
    bus = EventBus(clock=lambda: 42.0)
    async with bus.subscribe() as sub:
        bus.publish(Tick(n=1, at=7.5))
        bus.publish(Tick(n=2))
        first, second = sub.receive_nowait(), sub.receive_nowait()
    assert (first.at, first.seq) == (7.5, 1)
    assert (second.at, second.seq) == (42.0, 2)
