"""Faults a user's own actors can cause, and misuse of the public API, meet clear behaviour."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import anyio
import pytest
from sona.actors import (
    Actor,
    Backoff,
    DeadLettered,
    LoopCrashed,
    MessageFailed,
    Supervisor,
)

pytestmark = pytest.mark.anyio

NO_WAIT = Backoff(min_s=0.0, max_s=0.0, jitter=0.0)


class AwaitsCancelledFuture(Actor):
    """Awaits a future someone else cancelled: CancelledError in a task nobody cancels."""

    async def handle(self, message: Any) -> object:
        if message == "bad":
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
        return message


async def test_a_stray_cancelled_error_in_a_handler_is_a_crash_not_a_cancellation() -> None:
    sup = Supervisor(backoff=NO_WAIT, shutdown_timeout_s=1.0)
    ref = sup.spawn(AwaitsCancelledFuture, name="a")
    reached = False
    async with sup, sup.events.subscribe(buffer=100) as sub:
        await ref.tell("next")
        with pytest.raises(MessageFailed) as failed:
            await ref.ask("bad", timeout=5)
        assert isinstance(failed.value.__cause__, asyncio.CancelledError)
        # The actor was restarted and still serves its mailbox; the host body goes on.
        assert await ref.ask("after", timeout=5) == "after"
        reached = True
        events = [sub.receive_nowait() for _ in range(sub.pending)]
    assert reached
    stats = ref.stats()
    assert stats["crashes"] == 2 and stats["restarts"] == 2 and stats["dead_letters"] == 1
    assert stats["processed"] == 2 and stats["left_at_shutdown"] == 0
    assert [e.error_type for e in events if isinstance(e, LoopCrashed)] == ["CancelledError"] * 2
    assert [e.actor for e in events if isinstance(e, DeadLettered)] == ["a"]


async def test_a_stray_cancelled_error_in_on_start_is_a_crash() -> None:
    starts = 0

    class FailsFirstStart(Actor):
        async def on_start(self) -> None:
            nonlocal starts
            starts += 1
            if starts == 1:
                raise asyncio.CancelledError

        async def handle(self, message: Any) -> object:
            return message

    sup = Supervisor(backoff=NO_WAIT)
    ref = sup.spawn(FailsFirstStart, name="s")
    async with sup:
        assert await ref.ask("hi", timeout=5) == "hi"
    assert starts == 2 and ref.stats()["crashes"] == 1


async def test_a_real_cancellation_still_stops_a_handler() -> None:
    class Hangs(Actor):
        async def handle(self, message: Any) -> None:
            await anyio.sleep_forever()

    sup = Supervisor(shutdown_timeout_s=0.05)
    ref = sup.spawn(Hangs, name="h")
    async with sup:
        await ref.tell(1)
        await ref.tell(2)
        await anyio.sleep(0.01)
    stats = ref.stats()
    assert stats["crashes"] == 0 and stats["interrupted"] == 1
    assert ref.leftovers() == [1, 2]


class Echo(Actor):
    async def handle(self, message: Any) -> object:
        return message


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_restarts": True}, ValueError, "max_restarts"),
        ({"within_s": "30"}, ValueError, "within_s"),
        ({"within_s": None}, ValueError, "within_s"),
        ({"shutdown_timeout_s": "5"}, ValueError, "shutdown_timeout_s"),
        # A wrong backoff used to fail only at the first crash, out of the control task.
        ({"backoff": None}, TypeError, "backoff must be a Backoff"),
        ({"backoff": 0.5}, TypeError, "backoff must be a Backoff"),
        ({"events": "bus"}, TypeError, "events must be an EventBus"),
        ({"name": 3}, TypeError, "name must be a str"),
        ({"clock": 0.0}, TypeError, "clock must be a callable"),
    ],
)
def test_supervisor_refuses_bad_arguments_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Supervisor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": 5}, TypeError, "name must be a non-empty str"),
        ({"name": ""}, TypeError, "name must be a non-empty str"),
        ({"mailbox_size": True}, ValueError, "capacity"),
        ({"on_drop": 3}, TypeError, "on_drop must be callable"),
        ({"on_dead_letter": "log"}, TypeError, "on_dead_letter must be callable"),
    ],
)
def test_spawn_refuses_bad_arguments_and_registers_nothing(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    sup = Supervisor()
    with pytest.raises(error, match=match):
        sup.spawn(Echo, **{"name": "e", **kwargs})
    assert sup.stats() == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"min_s": "0.1"}, "min_s must be a number"), ({"jitter": None}, "jitter must be a number")],
)
def test_backoff_refuses_non_numbers(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        Backoff(**kwargs)


@pytest.mark.parametrize("timeout", [0, -1, -0.5, math.nan, "1", True])
async def test_ask_refuses_a_timeout_that_could_never_be_met_and_sends_nothing(
    timeout: Any,
) -> None:
    sup = Supervisor()
    ref = sup.spawn(Echo, name="e")
    async with sup:
        with pytest.raises(ValueError, match="ask timeout must be None or a number > 0"):
            await ref.ask("lost?", timeout=timeout)
        await ref.join()
        assert await ref.ask("ok", timeout=math.inf) == "ok"
    assert ref.stats()["processed"] == 1
