"""Mailbox overflow policies and cancellation safety."""

from __future__ import annotations

import contextvars
import random
from collections import Counter

import anyio
import pytest
from sona.actors import (
    Actor,
    ActorStopped,
    Backpressure,
    MessageDropped,
    OverflowPolicy,
    SamplesDropped,
    Supervisor,
)
from sona.actors.mailbox import Mailbox

pytestmark = pytest.mark.anyio


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()


async def test_block_suspends_the_sender_until_space_frees() -> None:
    box: Mailbox[int] = Mailbox(2, OverflowPolicy.BLOCK)
    await box.put(1)
    await box.put(2)
    finished: list[int] = []

    async def sender() -> None:
        await box.put(3)
        finished.append(3)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await settle()
        assert finished == []  # still suspended: the mailbox is full
        assert box.qsize() == 2
        assert box.get_nowait() == 1
        await settle()
        assert finished == [3]
    assert [box.get_nowait(), box.get_nowait()] == [2, 3]


async def test_a_withdrawn_message_frees_its_place() -> None:
    box: Mailbox[int] = Mailbox(3, OverflowPolicy.BLOCK)
    for i in (1, 2, 3):
        await box.put(i)
    finished: list[int] = []

    async def sender() -> None:
        await box.put(4)
        finished.append(4)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await settle()
        assert finished == []
        assert box.withdraw(lambda m: m % 2 == 0) == 2  # the oldest it accepts, only that one
        assert box.withdraw(lambda m: m > 10) is None
        await settle()
        assert finished == [4]
    assert box.take_all() == [1, 3, 4]


async def test_block_nowait_and_reject_raise_backpressure() -> None:
    for policy in (OverflowPolicy.BLOCK, OverflowPolicy.REJECT):
        box: Mailbox[int] = Mailbox(2, policy)
        assert box.put_nowait(1) and box.put_nowait(2)
        with pytest.raises(Backpressure, match="full"):
            box.put_nowait(3)
        if policy is OverflowPolicy.REJECT:
            with pytest.raises(Backpressure):
                await box.put(4)
        assert list(box._items) == [1, 2]
        assert box.rejected == (2 if policy is OverflowPolicy.REJECT else 1)
        assert box.dropped == 0


async def test_drop_oldest_and_drop_newest_drop_exactly_the_right_items() -> None:
    dropped: list[int] = []
    oldest: Mailbox[int] = Mailbox(3, OverflowPolicy.DROP_OLDEST, on_drop=dropped.append)
    results = [await oldest.put(i) for i in range(1, 6)]
    assert results == [True] * 5
    assert list(oldest._items) == [3, 4, 5]
    assert dropped == [1, 2] and oldest.dropped == 2

    dropped.clear()
    newest: Mailbox[int] = Mailbox(3, OverflowPolicy.DROP_NEWEST, on_drop=dropped.append)
    results = [newest.put_nowait(i) for i in range(1, 6)]
    assert results == [True, True, True, False, False]
    assert list(newest._items) == [1, 2, 3]
    assert dropped == [4, 5] and newest.dropped == 2


class Gate(Actor):
    """Handles nothing until the test opens the gate; records what it handled."""

    def __init__(self, gate: anyio.Event, seen: list[object]) -> None:
        self.gate = gate
        self.seen = seen

    async def handle(self, message: object) -> object:
        await self.gate.wait()
        self.seen.append(message)
        return message


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_OLDEST, OverflowPolicy.DROP_NEWEST])
async def test_actor_drops_are_counted_announced_and_fail_asks(policy: OverflowPolicy) -> None:
    gate = anyio.Event()
    seen: list[object] = []
    dropped: list[object] = []
    sup = Supervisor()
    ref = sup.spawn(
        lambda: Gate(gate, seen), name="g", mailbox_size=3, overflow=policy, on_drop=dropped.append
    )
    async with sup.events.subscribe(buffer=100) as sub, sup:
        await ref.tell("busy")  # taken by the actor, which then waits on the gate
        await settle()
        asks: list[BaseException | object] = []

        async def asker() -> None:
            try:
                asks.append(await ref.ask("asked"))
            except MessageDropped as exc:
                asks.append(exc)

        async with anyio.create_task_group() as tg:
            if policy is OverflowPolicy.DROP_OLDEST:
                tg.start_soon(asker)  # oldest queued: dropped by the later tells
                await settle()
                accepted = [await ref.tell(i) for i in range(5)]
                assert accepted == [True] * 5
            else:
                accepted = [await ref.tell(i) for i in range(3)]
                tg.start_soon(asker)  # arrives to a full mailbox: dropped
                await settle()
                accepted += [await ref.tell(i) for i in range(3, 5)]
                assert accepted == [True, True, True, False, False]
        assert len(asks) == 1 and isinstance(asks[0], MessageDropped)
        gate.set()
        await ref.join()
        stats = sup.stats()["g"]
    if policy is OverflowPolicy.DROP_OLDEST:
        assert seen == ["busy", 2, 3, 4]
        assert dropped == ["asked", 0, 1]
    else:
        assert seen == ["busy", 0, 1, 2]
        assert dropped == ["asked", 3, 4]
    assert stats["dropped"] == 3
    announced = [e for e in sub._buffer if isinstance(e, SamplesDropped)]
    assert sum(e.count for e in announced) == 3
    assert {e.stage for e in announced} == {"g"} and {e.policy for e in announced} == {policy.name}


async def test_cancelled_blocked_senders_enqueue_nothing() -> None:
    box: Mailbox[str] = Mailbox(1, OverflowPolicy.BLOCK)
    await box.put("first")
    done: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def sender(item: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[item] = scope
            await box.put(item)
            done.append(item)

    taken: list[str] = []
    async with anyio.create_task_group() as tg:
        for name in "abc":
            tg.start_soon(sender, name)
        await settle()
        assert done == []
        scopes["b"].cancel()  # cancelled while suspended: must not enqueue
        await settle()
        # Free a slot, which wakes "a", and cancel "a" at once: either its put completed
        # (and "a" is queued) or it did not (and the wake-up reached "c").
        taken.append(box.get_nowait())
        scopes["a"].cancel()
        await settle()
        while box.qsize():
            taken.append(box.get_nowait())
            await settle()
        for scope in scopes.values():
            scope.cancel()
    assert "b" not in done
    assert taken[0] == "first"
    assert Counter(taken[1:]) == Counter(done)
    assert done  # the freed slots were used: no wake-up was lost


async def test_a_sender_refused_by_the_drain_hands_its_wake_up_on() -> None:
    """During the drain, a woken sender that may no longer send must pass the free slot on to
    the next blocked sender, which may (a sibling actor), instead of leaving it waiting."""
    box: Mailbox[str] = Mailbox(1, OverflowPolicy.BLOCK)
    await box.put("first")
    insider: contextvars.ContextVar[bool] = contextvars.ContextVar("insider", default=False)
    refused: list[str] = []

    async def sender(item: str, inside: bool) -> None:
        insider.set(inside)
        try:
            await box.put(item)
        except ActorStopped:
            refused.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender, "outside", False)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(sender, "inside", True)
        await anyio.wait_all_tasks_blocked()
        box.start_draining(insider.get)
        assert box.get_nowait() == "first"  # wakes the outsider, first in line
        await anyio.wait_all_tasks_blocked()
        queued = box.queued()
        tg.cancel_scope.cancel()  # ends the insider if it is still waiting
    assert refused == ["outside"]
    assert queued == ["inside"]


async def test_cancelled_receivers_take_nothing() -> None:
    box: Mailbox[str] = Mailbox(4)
    got: list[str] = []
    scopes: list[anyio.CancelScope] = []

    async def receiver() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            got.append(await box.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        tg.start_soon(receiver)
        await settle()
        box.put_nowait("x")  # wakes the first receiver ...
        scopes[0].cancel()  # ... which is cancelled before it runs
        await settle()
        box.put_nowait("y")
        await settle()
        for scope in scopes:
            scope.cancel()
    assert Counter(got) + Counter(box._items) == Counter(["x", "y"])
    assert len(got) >= 1  # the wake-up was not lost with a cancelled receiver


async def test_random_cancellation_loses_no_accepted_message() -> None:
    rng = random.Random(7)
    box: Mailbox[int] = Mailbox(5, OverflowPolicy.BLOCK)
    accepted: list[int] = []
    received: list[int] = []
    senders_left = 4

    async def sender(base: int) -> None:
        nonlocal senders_left
        for i in range(300):
            with anyio.move_on_after(rng.choice([0, 0.00005, 0.001])):
                await box.put(base + i)
                accepted.append(base + i)
            if rng.random() < 0.3:
                await anyio.lowlevel.checkpoint()
        senders_left -= 1

    async def receiver() -> None:
        while senders_left or box.qsize():
            with anyio.move_on_after(rng.choice([0, 0.00005, 0.001])):
                received.append(await box.get())

    async with anyio.create_task_group() as tg:
        for s in range(4):
            tg.start_soon(sender, s * 1000)
        for _ in range(2):
            tg.start_soon(receiver)
    leftover = list(box._items)
    assert Counter(accepted) == Counter(received + leftover)
    assert len(set(accepted)) == len(accepted)
    assert accepted  # the test exercised real traffic


async def test_actor_tell_blocks_under_block_and_raises_under_reject() -> None:
    gate = anyio.Event()
    seen: list[object] = []
    sup = Supervisor()
    blocking = sup.spawn(lambda: Gate(gate, seen), name="b", mailbox_size=2)
    rejecting = sup.spawn(
        lambda: Gate(gate, seen), name="r", mailbox_size=1, overflow=OverflowPolicy.REJECT
    )
    sent: list[int] = []
    async with sup:
        await blocking.tell(0)  # taken by the actor, which waits on the gate
        await rejecting.tell(0)
        await settle()
        await blocking.tell(1)
        await blocking.tell(2)
        with pytest.raises(Backpressure):
            blocking.tell_nowait(3)
        await rejecting.tell(1)
        with pytest.raises(Backpressure):
            await rejecting.tell(2)

        async def sender() -> None:
            await blocking.tell(3)
            sent.append(3)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await settle()
            assert sent == []
            assert blocking.qsize() == 2
            gate.set()
        assert sent == [3]
        await blocking.join()
        await rejecting.join()
    assert sorted(m for m in seen if isinstance(m, int)) == [0, 0, 1, 1, 2, 3]
    assert sup.stats()["r"]["rejected"] == 1
    assert sup.stats()["b"]["rejected"] == 1


async def test_spawn_while_running() -> None:
    sup = Supervisor()
    async with sup:
        ref = sup.spawn(lambda: Gate(_open(), []), name="late")
        assert await ref.ask("hello") == "hello"


def _open() -> anyio.Event:
    event = anyio.Event()
    event.set()
    return event


async def test_a_sender_woken_after_its_cancellation_hands_the_free_slot_on() -> None:
    """A blocked sender whose cancellation arrived before the slot it was woken for: it raises
    without enqueuing, and the next blocked sender must get that slot instead of waiting on
    with room free."""
    box: Mailbox[str] = Mailbox(1, OverflowPolicy.BLOCK)
    await box.put("first")
    scopes: dict[str, anyio.CancelScope] = {}
    done: list[str] = []

    async def sender(item: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[item] = scope
            await box.put(item)
            done.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender, "a")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(sender, "b")
        await anyio.wait_all_tasks_blocked()
        scopes["a"].cancel()  # delivered to "a" while it still waits ...
        assert box.get_nowait() == "first"  # ... and then the slot wakes it, first in line
        await anyio.wait_all_tasks_blocked()
        queued = box.queued()
        tg.cancel_scope.cancel()
    assert done == ["b"]
    assert queued == ["b"]
