"""tell_inline: an idle actor's synchronous handler runs in the sender's task, in order, with
the usual crash semantics; anything else goes through the mailbox."""

from __future__ import annotations

from typing import Any

import pytest
from event_helpers import buffered
from sona.actors import (
    Actor,
    ActorStopped,
    Backoff,
    DeadLettered,
    LoopCrashed,
    LoopRestarted,
    Supervisor,
)

pytestmark = pytest.mark.anyio

NO_WAIT = Backoff(min_s=0.0, max_s=0.0, jitter=0.0)


class Recorder(Actor):
    """Handles ints inline (unless told not to), records who handled what, fails on demand."""

    def __init__(self, log: list[tuple[str, int]], fail: dict[int, int], failures: list[str]):
        self.log = log
        self.fail = fail  # message -> how many more times it raises
        self.failures = failures

    def _take(self, how: str, message: int) -> None:
        if self.fail.get(message, 0) > 0:
            self.fail[message] -= 1
            raise RuntimeError(f"boom on {message}")
        self.log.append((how, message))

    def handle_inline(self, message: Any) -> bool:
        if message < 0:
            return False  # declined: goes through the mailbox
        self._take("inline", message)
        return True

    async def handle(self, message: Any) -> None:
        self._take("loop", abs(message))

    async def on_failure(self, error: BaseException) -> None:
        self.failures.append(str(error))


def _spawn(
    sup: Supervisor,
    log: list[tuple[str, int]],
    fail: dict[int, int] | None = None,
    failures: list[str] | None = None,
    dead: list[Any] | None = None,
) -> Any:
    f = {} if fail is None else fail
    fl: list[str] = [] if failures is None else failures
    return sup.spawn(
        lambda: Recorder(log, f, fl),
        name="rec",
        on_dead_letter=None if dead is None else (lambda m, e: dead.append(m)),
    )


async def test_idle_actor_handles_in_the_callers_task() -> None:
    log: list[tuple[str, int]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        for i in range(5):
            assert ref.tell_inline(i) is True
            assert log[-1] == ("inline", i)  # done before tell_inline returned
        stats = ref.stats()
        assert stats["processed"] == 5 and stats["inline"] == 5


async def test_queued_messages_keep_their_order() -> None:
    log: list[tuple[str, int]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        ref.tell_nowait(1)  # queued: the loop has not run yet
        assert ref.tell_inline(2) is False  # not idle: queued behind 1
        assert ref.tell_inline(-3) is False  # declined
        await ref.join()
        assert log == [("loop", 1), ("loop", 2), ("loop", 3)]
        assert ref.tell_inline(4) is True
        assert log[-1] == ("inline", 4)
        assert ref.stats()["inline"] == 1


async def test_inline_crash_restarts_the_actor_and_retries_the_message() -> None:
    log: list[tuple[str, int]] = []
    failures: list[str] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log, fail={7: 1}, failures=failures)
    async with sup, sup.events.subscribe(buffer=64) as events:
        await ref.join()
        assert ref.tell_inline(7) is True  # accepted: its crash is replayed in the loop
        assert log == []
        assert ref.tell_inline(8) is False  # a message to retry: no longer idle
        await ref.join()
        assert log == [("loop", 7), ("loop", 8)]  # retried first, by the successor
        assert failures == ["boom on 7"]  # on_failure ran on the crashed incarnation
        stats = ref.stats()
        assert stats["crashes"] == 1 and stats["restarts"] == 1 and stats["dead_letters"] == 0
        assert [type(e) for e in buffered(events)] == [LoopCrashed, LoopRestarted]


async def test_a_message_failing_inline_and_on_retry_is_dead_lettered() -> None:
    log: list[tuple[str, int]] = []
    dead: list[Any] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log, fail={5: 2}, dead=dead)
    async with sup, sup.events.subscribe(buffer=64) as events:
        await ref.join()
        assert ref.tell_inline(5) is True
        await ref.join()
        assert dead == [5]
        assert ref.stats()["dead_letters"] == 1 and ref.stats()["crashes"] == 2
        seen = buffered(events)
        assert any(isinstance(e, DeadLettered) and e.message_type == "int" for e in seen)
        assert ref.tell_inline(6) is True  # idle again, and inline again
        assert log == [("inline", 6)]


async def test_default_actor_declines_inline() -> None:
    handled: list[int] = []

    class Plain(Actor):
        async def handle(self, message: Any) -> None:
            handled.append(message)

    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = sup.spawn(Plain, name="plain")
    async with sup:
        await ref.join()
        assert ref.tell_inline(1) is False
        assert handled == []
        await ref.join()
        assert handled == [1]
        assert ref.stats()["inline"] == 0


async def test_a_stopping_actor_takes_nothing_inline() -> None:
    log: list[tuple[str, int]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
    with pytest.raises(ActorStopped):
        ref.tell_inline(1)
    assert log == []


# ---------------------------------------------------------------------------- call_inline


class Calls:
    """What a sender hands ``call_inline``: a handler doing what the actor's own handling of
    the message does (here, Recorder's), and the builder of the message for a crash."""

    def __init__(self, log: list[tuple[str, int]], fail: dict[int, int]) -> None:
        self.log = log
        self.fail = fail
        self.built: list[int] = []

    def handle(self, message: int) -> str:
        if self.fail.get(message, 0) > 0:
            self.fail[message] -= 1
            raise RuntimeError(f"boom on {message}")
        self.log.append(("call", message))
        return f"handled {message}"

    def crashed(self, message: int) -> tuple[int, str]:
        self.built.append(message)
        return message, f"follow {message}"


async def test_call_inline_runs_the_handler_here_without_a_message() -> None:
    log: list[tuple[str, int]] = []
    calls = Calls(log, {})
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        for i in range(3):
            assert ref.call_inline(calls.handle, (i,), calls.crashed) == f"handled {i}"
        assert log == [("call", 0), ("call", 1), ("call", 2)] and calls.built == []
        stats = ref.stats()
        assert stats["processed"] == 3 and stats["inline"] == 3


async def test_call_inline_declines_while_the_actor_is_not_idle() -> None:
    log: list[tuple[str, int]] = []
    calls = Calls(log, {})
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        ref.tell_nowait(1)  # queued: the loop has not run yet
        assert ref.call_inline(calls.handle, (2,), calls.crashed) is None
        await ref.join()
        assert log == [("loop", 1)] and calls.built == []  # nothing done for the declined one
        assert ref.stats()["inline"] == 0
    # stopped: declined too, and the caller's send is what reports it
    assert ref.call_inline(calls.handle, (3,), calls.crashed) is None
    assert log == [("loop", 1)]


async def test_a_crash_in_call_inline_sends_the_built_message_down_the_crash_path() -> None:
    log: list[tuple[str, int]] = []
    failures: list[str] = []
    calls = Calls(log, {7: 1})
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log, failures=failures)
    async with sup, sup.events.subscribe(buffer=64) as events:
        await ref.join()
        assert ref.call_inline(calls.handle, (7,), calls.crashed) == "follow 7"
        assert calls.built == [7] and log == []
        assert ref.call_inline(calls.handle, (8,), calls.crashed) is None  # a retry is due
        await ref.join()
        assert log == [("loop", 7)]  # the built message, retried by the successor
        assert failures == ["boom on 7"]
        stats = ref.stats()
        assert stats["crashes"] == 1 and stats["restarts"] == 1 and stats["inline"] == 0
        assert [type(e) for e in buffered(events)] == [LoopCrashed, LoopRestarted]


async def test_a_message_failing_in_call_inline_and_on_retry_is_dead_lettered() -> None:
    log: list[tuple[str, int]] = []
    dead: list[Any] = []
    calls = Calls(log, {5: 1})
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log, fail={5: 1}, dead=dead)  # the actor's own handling fails once too
    async with sup:
        await ref.join()
        assert ref.call_inline(calls.handle, (5,), calls.crashed) == "follow 5"
        await ref.join()
        assert dead == [5] and log == []
        assert ref.stats()["dead_letters"] == 1 and ref.stats()["crashes"] == 2
        assert ref.call_inline(calls.handle, (6,), calls.crashed) == "handled 6"
