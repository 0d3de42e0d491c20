"""Supervisor: restarts, retry then dead letter, give-up, strategies, backoff and shutdown."""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from sona.actors import (
    Actor,
    ActorStopped,
    Backoff,
    DeadLettered,
    LoopCrashed,
    LoopRestarted,
    MessageFailed,
    RestartStrategy,
    Supervisor,
    SupervisorGaveUp,
    SupervisorGaveUpEvent,
)

pytestmark = pytest.mark.anyio

NO_WAIT = Backoff(min_s=0.0, max_s=0.0, jitter=0.0)


class Boom(Exception):
    pass


class Flaky(Actor):
    """Raises on a random 10 % of handle calls; records the messages it handled successfully."""

    def __init__(self, rng: random.Random, handled: Counter[int]) -> None:
        self.rng = rng
        self.handled = handled

    async def handle(self, message: int) -> None:
        if self.rng.random() < 0.1:
            raise Boom(f"injected on {message}")
        self.handled[message] += 1


async def test_fault_injection_accounts_for_every_message_exactly_once() -> None:
    n = 100_000
    rng = random.Random(1234)
    handled: Counter[int] = Counter()
    dead: list[int] = []
    sup = Supervisor(max_restarts=1_000_000, within_s=60.0, backoff=NO_WAIT, seed=1)
    ref = sup.spawn(
        lambda: Flaky(rng, handled),
        name="flaky",
        mailbox_size=256,
        on_dead_letter=lambda m, e: dead.append(m),
    )
    crashes = restarts = dead_events = 0
    async with sup.events.subscribe(buffer=1_000_000) as sub:
        async with sup:
            for i in range(n):
                await ref.tell(i)
            await ref.join()
            stats = sup.stats()["flaky"]
        for event in [sub.receive_nowait() for _ in range(sub.pending)]:
            crashes += isinstance(event, LoopCrashed)
            restarts += isinstance(event, LoopRestarted)
            dead_events += isinstance(event, DeadLettered)
    assert not sup.gave_up
    assert max(handled.values()) == 1  # never handled twice after a success
    assert set(handled).isdisjoint(dead)
    assert len(handled) + len(dead) == n
    assert set(handled) | set(dead) == set(range(n))
    # ~10 % crash, ~10 % of their retries crash again and are dead-lettered
    assert 8_000 < stats["crashes"] < 12_000
    assert 500 < len(dead) < 1_600
    assert stats["crashes"] == stats["restarts"] == crashes == restarts
    assert stats["dead_letters"] == dead_events == len(dead)
    assert stats["processed"] == len(handled)
    assert stats["queued"] == 0 and stats["left_at_shutdown"] == 0


class AlwaysFails(Actor):
    async def handle(self, message: Any) -> None:
        raise Boom(f"cannot handle {message!r}")


async def test_gives_up_past_the_limit_with_a_plain_clear_error() -> None:
    sup = Supervisor(max_restarts=3, within_s=60.0, backoff=NO_WAIT)
    ref = sup.spawn(AlwaysFails, name="bad")
    stopped: list[str] = []
    other = sup.spawn(lambda: Recorder("other", stopped), name="other")
    async with sup.events.subscribe(buffer=100) as sub:
        with pytest.raises(SupervisorGaveUp) as info:
            async with sup:
                for i in range(10):
                    await ref.tell(i)
                await anyio.sleep_forever()  # cancelled by the give-up
        events = [sub.receive_nowait() for _ in range(sub.pending)]
    error = info.value
    assert type(error) is SupervisorGaveUp  # not an exception group
    assert isinstance(error.cause, Boom) and error.__cause__ is error.cause
    assert error.child == "bad"
    assert "max_restarts=3" in str(error) and "'bad'" in str(error)
    assert sup.gave_up and sup.cause is not None
    assert sup.stats()["bad"]["restarts"] == 3
    assert sup.stats()["bad"]["crashes"] == 4
    assert stopped == ["start other", "stop other"]
    assert [type(e) for e in events].count(SupervisorGaveUpEvent) == 1
    with pytest.raises(SupervisorGaveUp):
        await ref.tell("late")
    with pytest.raises(SupervisorGaveUp):
        other.tell_nowait("late")
    assert ref.gave_up


async def test_give_up_without_raising_into_the_host() -> None:
    sup = Supervisor(max_restarts=1, within_s=60.0, backoff=NO_WAIT, raise_on_give_up=False)
    ref = sup.spawn(AlwaysFails, name="bad")
    async with sup:
        await ref.tell(1)
        with pytest.raises(SupervisorGaveUp):
            await ref.ask(2)  # dead-lettered or failed by the give-up, never hangs
        await ref.join()  # returns once the child stopped for good
        assert sup.gave_up
        with pytest.raises(SupervisorGaveUp):
            await ref.tell(3)
    assert sup.cause is not None and isinstance(sup.cause.cause, Boom)


async def test_a_give_up_answers_queued_asks_at_once() -> None:
    """A child waiting on a sibling's answer must not hold the give-up up for the whole grace
    period: the sibling, busy when the supervisor gives up, will never handle the ask."""
    seen: list[str] = []

    class Busy(Actor):
        async def handle(self, message: Any) -> str:
            await anyio.sleep(0.2)
            return "answer"

    class Asker(Actor):
        async def handle(self, message: Any) -> None:
            try:
                await busy.ask("question")
            except SupervisorGaveUp:
                seen.append("gave up")
                raise

    sup = Supervisor(max_restarts=0, within_s=60.0, backoff=NO_WAIT, shutdown_timeout_s=5.0)
    busy = sup.spawn(Busy, name="busy")
    asker = sup.spawn(Asker, name="asker")
    bad = sup.spawn(AlwaysFails, name="bad")
    with anyio.fail_after(2):  # the grace period is 5 s
        with pytest.raises(SupervisorGaveUp):
            async with sup:
                await busy.tell("keep busy")
                await anyio.sleep(0.01)
                await asker.tell("go")
                await anyio.sleep(0.01)  # the ask is queued behind the busy message
                await bad.tell(1)
                await anyio.sleep_forever()
    assert seen == ["gave up"]


class Once(Actor):
    """Raises the first time it sees a message in ``fail_once``, always on ``fail_always``."""

    def __init__(self, seen: list[Any], failed: set[Any]) -> None:
        self.seen = seen
        self.failed = failed

    async def handle(self, message: Any) -> Any:
        if isinstance(message, str) and message.startswith("always"):
            raise Boom(message)
        if isinstance(message, str) and message.startswith("once") and message not in self.failed:
            self.failed.add(message)
            raise Boom(message)
        self.seen.append(message)
        return f"ok {message}"


async def test_failing_message_is_retried_once_then_dead_lettered_and_queue_survives() -> None:
    seen: list[Any] = []
    failed: set[Any] = set()
    sup = Supervisor(max_restarts=100, backoff=NO_WAIT)
    ref = sup.spawn(lambda: Once(seen, failed), name="once")
    async with sup.events.subscribe() as sub, sup:
        for m in [1, "once-a", 2, "always-b", 3, 4]:
            await ref.tell(m)
        assert await ref.ask("once-c") == "ok once-c"
        with pytest.raises(MessageFailed) as info:
            await ref.ask("always-d")
        assert isinstance(info.value.__cause__, Boom)
        await ref.join()
        stats = sup.stats()["once"]
        dead = [
            e
            for e in [sub.receive_nowait() for _ in range(sub.pending)]
            if isinstance(e, DeadLettered)
        ]
    assert seen == [1, "once-a", 2, 3, 4, "once-c"]
    assert [e.message for e in dead] == ["'always-b'", "'always-d'"]
    assert all(e.actor == "once" and e.error_type == "Boom" for e in dead)
    assert stats["crashes"] == 2 + 2 * 2 and stats["dead_letters"] == 2


async def test_ask_timeout_and_plain_exceptions_from_the_body() -> None:
    class Slow(Actor):
        async def handle(self, message: Any) -> None:
            await anyio.sleep(10)

    sup = Supervisor(shutdown_timeout_s=0.05)
    ref = sup.spawn(Slow, name="slow")
    with pytest.raises(ValueError, match="body"):
        async with sup:
            with pytest.raises(TimeoutError, match="'slow'"):
                await ref.ask("x", timeout=0.01)
            raise ValueError("body")


async def test_an_answer_there_when_the_asker_resumes_is_not_turned_into_a_timeout() -> None:
    """The loop is held up by a synchronous step (a kernel, say) while the handler's wake-up
    and then the asker's deadline fall due: the handler answers before the asker runs, yet the
    deadline has cancelled the asker's wait. The message was handled and its answer is there;
    a TimeoutError would tell the asker it may not have been."""
    handled: list[str] = []
    answering = anyio.Event()

    class Late(Actor):
        async def handle(self, message: str) -> str:
            answering.set()
            await anyio.sleep(0.05)  # due before the asker's deadline
            handled.append(message)
            return f"answer to {message}"

    async def hold_the_loop() -> None:
        await answering.wait()
        time.sleep(0.5)  # past the handler's wake-up and the deadline: both due at once

    sup = Supervisor()
    ref = sup.spawn(Late, name="late")
    async with sup, anyio.create_task_group() as tg:
        tg.start_soon(hold_the_loop)
        outcome: object
        try:
            outcome = await ref.ask("q", timeout=0.2)
        except TimeoutError as exc:
            outcome = exc
    assert handled == ["q"]
    assert outcome == "answer to q"


class Recorder(Actor):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def on_start(self) -> None:
        self.log.append(f"start {self.name}")

    async def handle(self, message: Any) -> None:
        if message == "crash":
            raise Boom(self.name)

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")


@pytest.mark.parametrize("strategy", list(RestartStrategy))
async def test_restart_strategies(strategy: RestartStrategy) -> None:
    log: list[str] = []
    sup = Supervisor(strategy=strategy, backoff=NO_WAIT)
    refs = {n: sup.spawn(functools.partial(Recorder, n, log), name=n) for n in "abcd"}
    async with sup:
        assert log == ["start a", "start b", "start c", "start d"]
        log.clear()
        await refs["b"].tell("crash")
        for _ in range(3):  # the retry crashes too
            for ref in refs.values():
                await ref.join()
        after_crash = list(log)
        log.clear()
    if strategy is RestartStrategy.ONE_FOR_ONE:
        assert after_crash == ["start b", "start b"]
    else:
        cycle = ["stop d", "stop c", "start b", "start c", "start d"]
        assert after_crash == cycle + cycle
    assert log == ["stop d", "stop c", "stop b", "stop a"]  # reverse start order
    stats = sup.stats()
    assert stats["a"]["restarts"] == 0
    assert stats["b"]["restarts"] == 2
    expected_later = 2 if strategy is RestartStrategy.REST_FOR_ONE else 0
    assert stats["c"]["restarts"] == stats["d"]["restarts"] == expected_later


async def test_backoff_doubles_is_capped_and_resets_after_a_success() -> None:
    backoff = Backoff(min_s=0.001, max_s=0.004, jitter=0.0)
    assert [backoff.delay(k) for k in range(1, 6)] == [0.001, 0.002, 0.004, 0.004, 0.004]
    jittered = Backoff(min_s=1.0, max_s=10.0, jitter=0.2)
    rng = random.Random(0)
    samples = [jittered.delay(2, rng) for _ in range(200)]
    assert all(1.6 <= s <= 2.4 for s in samples) and len(set(samples)) > 100
    with pytest.raises(ValueError):
        Backoff(min_s=2.0, max_s=1.0)

    sup = Supervisor(max_restarts=100, backoff=backoff)
    seen: list[Any] = []
    ref = sup.spawn(lambda: Once(seen, set()), name="x")
    async with sup.events.subscribe() as sub, sup:
        for m in ["always-1", "always-2", 1, "always-3"]:
            await ref.tell(m)
        await ref.join()
        delays = [
            e.backoff_s
            for e in [sub.receive_nowait() for _ in range(sub.pending)]
            if isinstance(e, LoopRestarted)
        ]
    # always-1 twice, always-2 twice (4 in a row), success on 1 resets, always-3 twice
    assert delays == [0.001, 0.002, 0.004, 0.004, 0.001, 0.002]


async def test_crash_in_on_start_is_restarted() -> None:
    attempts: list[int] = []

    class StartsLate(Actor):
        async def on_start(self) -> None:
            attempts.append(1)
            if len(attempts) < 3:
                raise Boom("not yet")

        async def handle(self, message: Any) -> Any:
            return message

    sup = Supervisor(backoff=NO_WAIT)
    ref = sup.spawn(StartsLate, name="late")
    async with sup:
        assert await ref.ask("hi") == "hi"
    assert len(attempts) == 3 and sup.stats()["late"]["restarts"] == 2


class Sleepy(Actor):
    def __init__(self, delay: float, log: list[Any]) -> None:
        self.delay = delay
        self.log = log

    async def handle(self, message: Any) -> None:
        if message == "forever":
            await anyio.sleep_forever()
        await anyio.sleep(self.delay)
        self.log.append(message)

    async def on_stop(self) -> None:
        self.log.append("stopped")


async def test_shutdown_drains_full_mailboxes() -> None:
    log: list[Any] = []
    sup = Supervisor(shutdown_timeout_s=30.0)
    ref = sup.spawn(lambda: Sleepy(0.0001, log), name="s", mailbox_size=50)
    async with sup:
        for i in range(50):
            ref.tell_nowait(i)
        assert ref.qsize() >= 49
    assert log == [*range(50), "stopped"]
    assert sup.stats()["s"]["left_at_shutdown"] == 0
    with pytest.raises(ActorStopped):
        await ref.tell("late")


async def test_shutdown_past_the_timeout_cancels_and_reports_what_was_left() -> None:
    log: list[Any] = []
    sup = Supervisor(shutdown_timeout_s=0.05)
    ref = sup.spawn(lambda: Sleepy(0.0, log), name="s", mailbox_size=20)
    async with sup:
        await ref.tell("forever")
        await anyio.lowlevel.checkpoint()
        for i in range(10):
            await ref.tell(i)
    stats = sup.stats()["s"]
    assert stats["left_at_shutdown"] == 11  # the interrupted message and the ten behind it
    assert stats["interrupted"] == 1
    assert ref.leftovers() == ["forever", *range(10)]
    assert log == ["stopped"]  # on_stop still ran after the cancellation


async def test_pipeline_drains_through_its_stages_while_outsiders_are_refused() -> None:
    got: list[int] = []

    class Sink(Actor):
        async def handle(self, message: int) -> None:
            await anyio.sleep(0)
            got.append(message)

    class Stage(Actor):
        def __init__(self, to: Any) -> None:
            self.to = to

        async def handle(self, message: int) -> None:
            await self.to.tell(message)

    sup = Supervisor(shutdown_timeout_s=30.0)
    sink = sup.spawn(Sink, name="sink", mailbox_size=10)
    mid = sup.spawn(lambda: Stage(sink), name="mid", mailbox_size=10)
    head = sup.spawn(lambda: Stage(mid), name="head", mailbox_size=100)
    async with sup:
        for i in range(100):
            await head.tell(i)
    assert got == list(range(100))


async def test_drain_lets_a_sibling_through_behind_a_refused_outsider() -> None:
    """An outsider blocked on a full mailbox is refused once the drain starts; the sibling
    blocked behind it must still get the slot and its message be handled, not left over."""
    release = anyio.Event()
    got: list[str] = []

    class Sink(Actor):
        async def handle(self, message: str) -> None:
            if message == "first":
                await release.wait()
            got.append(message)

    class Feeder(Actor):
        async def handle(self, message: str) -> None:
            await sink.tell(message)

    sup = Supervisor(shutdown_timeout_s=0.5)
    sink = sup.spawn(Sink, name="sink", mailbox_size=1)
    feeder = sup.spawn(Feeder, name="feeder")
    refused: list[str] = []

    async def outsider() -> None:
        try:
            await sink.tell("outside")
        except ActorStopped:
            refused.append("outside")

    async with anyio.create_task_group() as tg, sup:
        await sink.tell("first")
        await anyio.wait_all_tasks_blocked()
        await sink.tell("fill")
        tg.start_soon(outsider)
        await anyio.wait_all_tasks_blocked()
        await feeder.tell("inside")
        await anyio.wait_all_tasks_blocked()  # outsider, then feeder, wait for room
        release.set()  # the drain starts before the sink gets to run
    assert refused == ["outside"]
    assert got == ["first", "fill", "inside"]
    assert sup.stats()["feeder"]["left_at_shutdown"] == 0


async def test_a_crash_during_another_childs_backoff_is_not_held_up_by_it() -> None:
    """ONE_FOR_ONE: each child waits its own backoff. A child in a long crash loop (its backoff
    grown large) must not delay the restart of a sibling that crashes meanwhile."""
    a_starts: list[int] = []

    class StartsLate(Actor):
        async def on_start(self) -> None:
            a_starts.append(1)
            if len(a_starts) <= 9:
                raise Boom("not ready")

    seen: list[Any] = []
    failed: set[Any] = set()
    sup = Supervisor(max_restarts=100, backoff=Backoff(min_s=0.001, max_s=10.0, jitter=0.0))
    sup.spawn(StartsLate, name="a")
    b = sup.spawn(lambda: Once(seen, failed), name="b")
    restarted: list[tuple[str, int]] = []
    async with sup.events.subscribe(buffer=1000) as sub, sup:
        async for event in sub:
            if isinstance(event, LoopCrashed) and event.actor == "a" and event.consecutive == 9:
                break  # a now waits 0.256 s before its next start
        await b.tell("once-x")
        async for event in sub:
            if isinstance(event, LoopRestarted):
                restarted.append((event.actor, event.restarts))
                if event.actor == "b" or len(restarted) > 2:
                    break
        assert await b.ask("after") == "ok after"
    assert restarted[0] == ("b", 1)
    assert seen == ["once-x", "after"]


async def test_giving_up_cancels_a_restart_still_in_its_backoff() -> None:
    """A child waiting out a long backoff is never started once the supervisor gave up, and
    the supervisor does not wait for that backoff to end before it stops."""
    sup = Supervisor(
        max_restarts=1,
        within_s=60.0,
        backoff=Backoff(min_s=30.0, max_s=30.0, jitter=0.0),
        raise_on_give_up=False,
    )
    slow = sup.spawn(AlwaysFails, name="slow")
    bad = sup.spawn(AlwaysFails, name="bad")
    with anyio.fail_after(10):  # the backoff is 30 s
        async with sup.events.subscribe(buffer=100) as sub, sup:
            await slow.tell("x")  # crashes; its restart waits 30 s
            async for event in sub:
                if isinstance(event, LoopCrashed):
                    break
            await bad.tell("y")  # the second crash within the window: give up
            async for event in sub:
                if isinstance(event, SupervisorGaveUpEvent):
                    break
    assert sup.gave_up
    assert slow.stats()["restarts"] == 0 and slow.leftovers() == ["x"]
    assert bad.leftovers() == ["y"]


class Hangs(Recorder):
    """Records like Recorder, hangs on "hang", and yields in on_stop so stops could overlap."""

    async def handle(self, message: Any) -> None:
        self.log.append(f"begin {self.name} {message}")
        if message == "hang":
            await anyio.sleep_forever()
        self.log.append(f"end {self.name} {message}")

    async def on_stop(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.log.append(f"stop {self.name}")


@pytest.mark.parametrize("when", ["in the body", "during the drain"])
async def test_cancelling_the_host_stops_in_reverse_order_and_keeps_the_message(
    when: str,
) -> None:
    """The host's cancellation reaches every child at once; on_stop must still run in reverse
    start order, and the message being handled goes back to the mailbox: not lost, and not
    handled a second time."""
    log: list[str] = []
    sup = Supervisor(shutdown_timeout_s=30.0)
    refs = {n: sup.spawn(functools.partial(Hangs, n, log), name=n) for n in "abc"}
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as host:

            async def cancel_once_blocked() -> None:
                await anyio.wait_all_tasks_blocked()
                host.cancel()

            async with sup:
                await refs["b"].tell("hang")
                await refs["b"].tell("next")
                if when == "in the body":
                    await anyio.wait_all_tasks_blocked()
                    host.cancel()
                    await anyio.sleep_forever()
                tg.start_soon(cancel_once_blocked)  # the drain waits on "hang"
    assert log == ["start a", "start b", "start c", "begin b hang", "stop c", "stop b", "stop a"]
    assert refs["b"].leftovers() == ["hang", "next"]
    stats = refs["b"].stats()
    assert stats["interrupted"] == 1 and stats["processed"] == 0 and stats["crashes"] == 0


def test_jitter_spreads_delays_both_ways_below_the_cap_and_never_past_it() -> None:
    backoff = Backoff(min_s=1.0, max_s=2.0, jitter=0.5)
    rng = random.Random(0)
    first = [backoff.delay(1, rng) for _ in range(200)]  # 1.0 s, below the cap
    assert min(first) < 0.8 and max(first) > 1.2  # shortened as often as lengthened
    assert all(0.5 <= d <= 1.5 for d in first)
    at_cap = [backoff.delay(k, rng) for k in (5, 30) for _ in range(200)]  # 16 s, 2**29 s
    assert all(d <= 2.0 for d in at_cap)  # capped again after the jitter
    assert min(at_cap) < 1.5  # and still spread, so crashed siblings do not restart in step
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="jitter"):
            Backoff(jitter=bad)


async def test_restart_intensity_counts_only_crashes_within_the_window() -> None:
    now = [0.0]
    seen: list[Any] = []
    failed: set[Any] = set()
    sup = Supervisor(
        max_restarts=2,
        within_s=10.0,
        backoff=NO_WAIT,
        raise_on_give_up=False,
        clock=lambda: now[0],
    )
    ref = sup.spawn(lambda: Once(seen, failed), name="x")
    async with sup:
        for m in ["once-a", "once-b"]:  # two restarts at t=0: the limit, not past it
            assert await ref.ask(m) == f"ok {m}"
        now[0] = 11.0  # both have left the 10 s window
        for m in ["once-c", "once-d"]:
            assert await ref.ask(m) == f"ok {m}"
        assert not sup.gave_up
        with pytest.raises(SupervisorGaveUp):
            await ref.ask("once-e")  # the third within the window
    assert sup.gave_up
    assert sup.cause is not None and sup.cause.restarts == 3
    assert seen == ["once-a", "once-b", "once-c", "once-d"]


async def test_a_give_up_stops_every_child_in_reverse_start_order() -> None:
    log: list[str] = []
    sup = Supervisor(max_restarts=0, backoff=NO_WAIT, raise_on_give_up=False)
    for n in "abc":
        sup.spawn(functools.partial(Recorder, n, log), name=n)
    bad = sup.spawn(AlwaysFails, name="bad")
    async with sup.events.subscribe() as sub, sup:
        await bad.tell(1)
        async for event in sub:
            if isinstance(event, SupervisorGaveUpEvent):
                break
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_drain_that_timed_out_stops_at_once_without_a_second_grace_period() -> None:
    """The drain took the whole shutdown budget: a handler still running is interrupted then,
    not given another ``shutdown_timeout_s`` to finish."""
    log: list[str] = []

    class Slow(Actor):
        async def handle(self, message: str) -> None:
            await anyio.sleep(1.5)  # past the drain (1 s), within a second grace (2 s)
            log.append(f"finished {message}")

    sup = Supervisor(shutdown_timeout_s=1.0)
    ref = sup.spawn(Slow, name="slow")
    async with sup:
        await ref.tell("m")
        await anyio.wait_all_tasks_blocked()
    assert log == []
    assert ref.stats()["interrupted"] == 1
    assert ref.leftovers() == ["m"]


async def test_a_message_waiting_for_its_retry_counts_as_queued() -> None:
    seen: list[Any] = []
    sup = Supervisor(backoff=Backoff(min_s=30.0, max_s=30.0, jitter=0.0), shutdown_timeout_s=0.05)
    ref = sup.spawn(lambda: Once(seen, set()), name="x")
    async with sup.events.subscribe() as sub, sup:
        await ref.tell("once-a")
        async for event in sub:
            if isinstance(event, LoopCrashed):
                break
        # in the retry slot while the restart waits out its backoff
        assert ref.qsize() == 1 and ref.stats()["queued"] == 1
        assert not ref.idle
    assert seen == []
    assert ref.leftovers() == ["once-a"]


async def test_a_busy_actor_with_an_empty_mailbox_is_not_idle() -> None:
    release = anyio.Event()

    class Waits(Actor):
        async def handle(self, message: Any) -> None:
            await release.wait()

    sup = Supervisor(shutdown_timeout_s=0.05)
    waits = sup.spawn(Waits, name="w")
    async with sup:
        await waits.tell("x")
        await anyio.wait_all_tasks_blocked()
        assert waits.qsize() == 0
        assert not waits.idle  # handling "x"
        release.set()
        await waits.join()
        assert waits.idle


async def test_a_sibling_crashing_while_it_is_stopped_for_a_restart_is_restarted_once() -> None:
    """REST_FOR_ONE: "a" crashes, so "b", started after it, is stopped and restarted with it.
    "b" raises while it is being stopped; that report comes from an incarnation already
    replaced and must not restart "b" a second time."""
    log: list[str] = []
    b_failed: list[str] = []

    class B(Recorder):
        async def handle(self, message: Any) -> None:
            if message == "slow" and not b_failed:
                await anyio.sleep(0.3)  # "a" crashes meanwhile: this instance is being stopped
                b_failed.append(message)
                raise Boom("b, while being stopped")
            log.append(f"handled b {message}")

    seen: list[Any] = []
    failed: set[Any] = set()
    sup = Supervisor(strategy=RestartStrategy.REST_FOR_ONE, backoff=NO_WAIT)
    a = sup.spawn(lambda: Once(seen, failed), name="a")
    b = sup.spawn(lambda: B("b", log), name="b")
    async with sup:
        await b.tell("slow")
        await anyio.wait_all_tasks_blocked()
        await a.tell("once-x")
        await anyio.sleep(0.6)
        for ref in (a, b):
            await ref.join()
        await anyio.sleep(0.05)
        for ref in (a, b):
            await ref.join()
        stats = sup.stats()
    assert b_failed == ["slow"]
    assert stats["b"]["crashes"] == 1
    assert stats["b"]["restarts"] == 1  # with "a", and only then
    assert log.count("start b") == 2 and log.count("handled b slow") == 1
