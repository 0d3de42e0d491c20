"""ask_inline: an idle actor answers in the asker's task, in order, with the crash semantics
of ask(); a busy actor, or one that declines, answers through its mailbox."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from event_helpers import buffered
from sona.actors import (
    DECLINED,
    Actor,
    Backoff,
    DeadLettered,
    LoopCrashed,
    LoopRestarted,
    MessageFailed,
    Supervisor,
)

pytestmark = pytest.mark.anyio

NO_WAIT = Backoff(min_s=0.0, max_s=0.0, jitter=0.0)


class Doubler(Actor):
    """Answers n with 2n, inline unless n < 0; fails on demand; records who answered."""

    def __init__(self, log: list[tuple[str, int, Any]], fail: dict[int, int]) -> None:
        self.log = log
        self.fail = fail  # message -> how many more times it raises

    def _answer(self, how: str, n: int) -> int:
        if self.fail.get(n, 0) > 0:
            self.fail[n] -= 1
            raise RuntimeError(f"boom on {n}")
        self.log.append((how, n, asyncio.current_task()))
        return 2 * n

    def answer_inline(self, message: Any) -> object:
        if message < 0:
            return DECLINED
        return self._answer("inline", message)

    async def handle(self, message: Any) -> object:
        return self._answer("loop", abs(message))


def _spawn(sup: Supervisor, log: list[tuple[str, int, Any]], fail: dict[int, int] | None = None,
           dead: list[Any] | None = None) -> Any:  # fmt: skip
    f = {} if fail is None else fail
    return sup.spawn(
        lambda: Doubler(log, f),
        name="doubler",
        on_dead_letter=None if dead is None else (lambda m, e: dead.append(m)),
    )


async def test_idle_actor_answers_in_the_askers_task() -> None:
    log: list[tuple[str, int, Any]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        me = asyncio.current_task()
        for i in range(3):
            assert await ref.ask_inline(i) == 2 * i
        assert log == [("inline", i, me) for i in range(3)]
        stats = ref.stats()
        assert stats["processed"] == 3 and stats["inline"] == 3


async def test_busy_or_declining_actor_answers_through_its_mailbox_in_order() -> None:
    log: list[tuple[str, int, Any]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        ref.tell_nowait(1)  # queued: the actor is no longer idle
        assert await ref.ask_inline(2) == 4  # answered after 1, by the loop
        assert await ref.ask_inline(-3) == 6  # declined: answered by handle()
        assert [(how, n) for how, n, _ in log] == [("loop", 1), ("loop", 2), ("loop", 3)]
        assert all(task is not asyncio.current_task() for _, _, task in log)
        assert ref.stats()["inline"] == 0


async def test_inline_crash_restarts_the_actor_and_the_asker_gets_the_retry_answer() -> None:
    log: list[tuple[str, int, Any]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log, fail={7: 1})
    async with sup, sup.events.subscribe(buffer=64) as events:
        await ref.join()
        assert await ref.ask_inline(7) == 14
        assert [(how, n) for how, n, _ in log] == [("loop", 7)]  # retried by the successor
        stats = ref.stats()
        assert stats["crashes"] == 1 and stats["restarts"] == 1 and stats["dead_letters"] == 0
        assert [type(e) for e in buffered(events)] == [LoopCrashed, LoopRestarted]
        assert await ref.ask_inline(8) == 16  # idle again, and inline again
        assert log[-1][:2] == ("inline", 8)


async def test_an_ask_failing_inline_and_on_retry_fails_the_asker() -> None:
    log: list[tuple[str, int, Any]] = []
    dead: list[Any] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log, fail={5: 2}, dead=dead)
    async with sup, sup.events.subscribe(buffer=64) as events:
        await ref.join()
        with pytest.raises(MessageFailed) as info:
            await ref.ask_inline(5)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert dead == [5] and log == []
        seen = buffered(events)
        assert any(isinstance(e, DeadLettered) and e.message_type == "int" for e in seen)


async def test_a_bad_timeout_is_refused_before_anything_is_answered() -> None:
    log: list[tuple[str, int, Any]] = []
    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = _spawn(sup, log)
    async with sup:
        await ref.join()
        for bad in (0, -1.0, float("nan"), "1"):
            with pytest.raises(ValueError):
                await ref.ask_inline(1, timeout=bad)  # type: ignore[arg-type]
        assert log == []


async def test_default_actor_answers_through_its_mailbox() -> None:
    class Plain(Actor):
        async def handle(self, message: Any) -> object:
            return message + 1

    sup = Supervisor(backoff=NO_WAIT, seed=0)
    ref = sup.spawn(Plain, name="plain")
    async with sup:
        await ref.join()
        assert await ref.ask_inline(1) == 2
        assert ref.stats()["inline"] == 0
