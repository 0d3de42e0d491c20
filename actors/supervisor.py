"""Supervision: restart crashed children with backoff within a restart budget, else give up.

Each incarnation of a child runs in its own task of the supervisor's anyio task group; one
control task takes crash reports in order and decides, so that restarts never race each other.
Under ONE_FOR_ONE a restart waits out its backoff in a task of its own, so one child's long
backoff never delays the restart of another.
A crash report carries the incarnation's generation: a report from an incarnation that was
already replaced (a REST_FOR_ONE sibling that crashed while being stopped) is ignored.
"""

from __future__ import annotations

import contextvars
import enum
import math
import random
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
from sona.actors._log import get_logger
from sona.actors.actor import Actor, Ask
from sona.actors.backoff import Backoff, is_number
from sona.actors.bus import EventBus
from sona.actors.child import NOTHING, Child, is_crash
from sona.actors.errors import ActorStopped, SupervisorGaveUp
from sona.actors.events import LoopCrashed, LoopRestarted, SupervisorGaveUpEvent
from sona.actors.mailbox import OverflowPolicy
from sona.actors.ref import ActorRef

_log = get_logger("sona.actors.supervisor")

# Set inside every incarnation task: during the drain, only the supervisor's own actors may
# still send, so a pipeline can finish what it holds while the outside world is refused.
_CURRENT: contextvars.ContextVar[Supervisor | None] = contextvars.ContextVar(
    "sona_actors_supervisor", default=None
)

_NEW, _RUNNING, _DRAINING, _STOPPING, _STOPPED = range(5)


class RestartStrategy(enum.Enum):
    """Which children restart when one crashes."""

    ONE_FOR_ONE = "one_for_one"  # only the crashed child
    REST_FOR_ONE = "rest_for_one"  # the crashed child and every child started after it


class Supervisor:
    """Runs actors as an async context manager, restarting them when they crash.

    Restart budget: at most ``max_restarts`` crashes within any ``within_s`` seconds; the next
    one makes the supervisor give up: it stops every child (reverse start order), fails pending
    asks and refuses new messages with ``SupervisorGaveUp``, publishes a
    ``SupervisorGaveUpEvent``, and, when ``raise_on_give_up`` (the default), cancels the body of
    the ``async with`` and raises ``SupervisorGaveUp`` from ``__aexit__``. With
    ``raise_on_give_up=False`` nothing is raised into the host: ``gave_up`` and ``cause`` say
    what happened and ``__aexit__`` returns normally.

    Graceful stop (``__aexit__``): mailboxes stop accepting messages from outside, children
    drain them (their own sends to each other still pass) for up to ``shutdown_timeout_s``;
    then children stop in reverse start order, each ``on_stop`` bounded by
    ``shutdown_timeout_s``. Past the drain timeout, handlers still running are cancelled and
    ``stats()`` reports what was left (``left_at_shutdown``).
    """

    def __init__(
        self,
        *,
        strategy: RestartStrategy = RestartStrategy.ONE_FOR_ONE,
        max_restarts: int = 5,
        within_s: float = 30.0,
        backoff: Backoff = Backoff(),  # noqa: B008 - frozen, shared safely
        shutdown_timeout_s: float = 5.0,
        events: EventBus | None = None,
        raise_on_give_up: bool = True,
        name: str = "supervisor",
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(strategy, RestartStrategy):
            raise TypeError(f"strategy must be a RestartStrategy, got {strategy!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if not (is_number(within_s) and within_s > 0 and math.isfinite(within_s)):
            raise ValueError(f"within_s must be a finite number > 0, got {within_s!r}")
        if not (
            is_number(shutdown_timeout_s)
            and shutdown_timeout_s >= 0
            and math.isfinite(shutdown_timeout_s)
        ):
            raise ValueError(
                f"shutdown_timeout_s must be a finite number >= 0, got {shutdown_timeout_s!r}"
            )
        # Checked here: a wrong backoff or bus would otherwise fail only at the first crash or
        # event, inside the supervisor's control task, and take the host down with it.
        if not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a Backoff, got {backoff!r}")
        if events is not None and not isinstance(events, EventBus):
            raise TypeError(f"events must be an EventBus or None, got {events!r}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.within_s = within_s
        self.backoff = backoff
        self.shutdown_timeout_s = shutdown_timeout_s
        self._drain_s = shutdown_timeout_s  # the next graceful stop's drain (shorten_drain)
        self.raise_on_give_up = raise_on_give_up
        self.name = name
        self.events = events if events is not None else EventBus()
        self._owns_bus = events is None
        self._rng = random.Random(seed)
        self._clock = clock
        self._children: list[Child] = []
        self._refs: dict[str, ActorRef] = {}
        self._phase = _NEW
        self._tg: Any = None
        self._control_scope: anyio.CancelScope | None = None
        self._delayed: set[anyio.CancelScope] = set()  # ONE_FOR_ONE restarts in their backoff
        self._crashes: deque[tuple[Child, int, BaseException]] = deque()
        self._control_waiter: anyio.Event | None = None
        self._restart_times: deque[float] = deque()
        self._gave_up: SupervisorGaveUp | None = None
        self._log = _log.bind(supervisor=name)

    # -- public surface -----------------------------------------------------------------

    @property
    def gave_up(self) -> bool:
        return self._gave_up is not None

    @property
    def cause(self) -> SupervisorGaveUp | None:
        """The give-up error (its ``cause`` is the crash that crossed the limit), else None."""
        return self._gave_up

    @property
    def running(self) -> bool:
        return self._phase in (_RUNNING, _DRAINING)

    def spawn(
        self,
        factory: Callable[[], Actor],
        *,
        name: str,
        mailbox_size: int = 1000,
        overflow: OverflowPolicy = OverflowPolicy.BLOCK,
        on_drop: Callable[[Any], None] | None = None,
        on_dead_letter: Callable[[Any, BaseException], None] | None = None,
    ) -> ActorRef:
        """Register a child; it starts with the supervisor, or at once if that already runs.

        ``factory`` builds a fresh actor for the first start and every restart. ``on_drop``
        sees each message a DROP_* policy drops, ``on_dead_letter`` each dead-lettered message
        with its error: synchronous callbacks for exact accounting, besides the bus events.
        """
        if self._phase >= _DRAINING:
            raise RuntimeError(f"supervisor {self.name!r} is stopping; cannot spawn {name!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._refs:
            raise ValueError(f"supervisor {self.name!r} already has a child named {name!r}")
        if not callable(factory):
            raise TypeError(f"factory must be a callable returning an Actor, got {factory!r}")
        # The callbacks are called only when a message is dropped or dead-lettered, where a
        # failure is logged and swallowed: a wrong one would silently lose that accounting.
        for label, callback in (("on_drop", on_drop), ("on_dead_letter", on_dead_letter)):
            if callback is not None and not callable(callback):
                raise TypeError(f"{label} must be callable or None, got {callback!r}")
        child = Child(
            name=name,
            factory=factory,
            mailbox_size=mailbox_size,
            overflow=overflow,
            events=self.events,
            on_drop=on_drop,
            on_dead_letter=on_dead_letter,
        )
        self._children.append(child)
        ref = ActorRef(child, self)
        self._refs[name] = ref
        if self._phase == _RUNNING:
            self._tg.start_soon(self._start_child, child)
        return ref

    def ref(self, name: str) -> ActorRef:
        return self._refs[name]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per child name: restarts, crashes, processed (of which inline: handled in the
        sender's task), dead_letters, queued, dropped, rejected, interrupted,
        left_at_shutdown, running (0/1)."""
        return {c.name: c.stats() for c in self._children}

    async def join(self) -> None:
        """Wait until every child is idle with an empty mailbox (or stopped for good)."""
        await self._quiesce()

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        if self._phase != _NEW:
            raise RuntimeError(f"supervisor {self.name!r} can only be entered once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._phase = _RUNNING
        try:
            self._tg.start_soon(self._control, name=f"{self.name} control")
            for child in list(self._children):
                await self._start_child(child)
        except BaseException as exc:
            self._tg.cancel_scope.cancel()
            await self._exit_task_group(exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
        pending = exc
        try:
            if self._gave_up is None:
                if cancelled:
                    await self._stop_now()
                else:
                    await self._shutdown()
        except BaseException as err:  # a cancellation, e.g. the control task gave up
            if pending is None:
                pending = err
            if self._gave_up is None and isinstance(err, anyio.get_cancelled_exc_class()):
                await self._stop_now()  # cancelled during the drain: stop in order all the same
        return await self._exit_task_group(pending, body_exc=exc)

    async def _exit_task_group(
        self, pending: BaseException | None, *, body_exc: BaseException | None = None
    ) -> bool:
        tg = self._tg
        self._stop_control()
        for child in self._children:  # whatever stop was cut short, no child waits its turn
            if child.gate is not None:
                child.gate.set()
        try:
            suppress: bool = await tg.__aexit__(
                type(pending) if pending is not None else None,
                pending,
                pending.__traceback__ if pending is not None else None,
            )
        except BaseExceptionGroup as group:
            error = self._single(group, body_exc)
            raise error from error.__cause__
        finally:
            self._phase = _STOPPED
            for child in self._children:
                if not child.finished:
                    self._finish(child, None)
            if self._owns_bus:
                self.events.close()
        return suppress if body_exc is not None else False

    def _single(
        self, group: BaseExceptionGroup[Any], body_exc: BaseException | None
    ) -> BaseException:
        """The one exception the caller should see out of a task group's group."""
        leaves: list[BaseException] = []

        def walk(g: BaseExceptionGroup[Any]) -> None:
            for e in g.exceptions:
                if isinstance(e, BaseExceptionGroup):
                    walk(e)
                else:
                    leaves.append(e)

        walk(group)
        if body_exc is not None and body_exc in leaves:
            return body_exc
        for leaf in leaves:
            if isinstance(leaf, SupervisorGaveUp):
                return leaf
        for leaf in leaves:
            if not isinstance(leaf, anyio.get_cancelled_exc_class()):
                return leaf
        return leaves[0]

    def shorten_drain(self, seconds: float) -> None:
        """Let the next graceful stop drain for at most ``seconds`` (never longer than
        ``shutdown_timeout_s``): for an owner that already spent part of its own shutdown
        budget draining in front of the mailboxes, so stopping stays within one budget."""
        self._drain_s = min(self.shutdown_timeout_s, max(0.0, seconds))

    async def _shutdown(self) -> None:
        self._phase = _DRAINING

        def may_send() -> bool:
            return _CURRENT.get() is self

        for child in self._children:
            child.mailbox.start_draining(may_send)
        with anyio.move_on_after(self._drain_s) as scope:
            await self._quiesce()
        timed_out = scope.cancelled_caught
        if timed_out:
            self._log.warning(
                "drain_timed_out",
                timeout_s=self._drain_s,
                queued={c.name: c.queued() for c in self._children},
            )
        self._phase = _STOPPING
        self._stop_control()
        await self._stop_children(self._children, grace_s=0.0 if timed_out else None)
        for child in self._children:
            self._finish(child, None)

    async def _stop_now(self) -> None:
        """Stop on cancellation of the host: no drain, shielded so on_stop still runs."""
        self._phase = _STOPPING
        with anyio.CancelScope(shield=True):
            self._stop_control()
            await self._stop_children(self._children, grace_s=0.0)
            for child in self._children:
                self._finish(child, None)

    async def _quiesce(self) -> None:
        """Wait until no child has anything queued and a full pass saw no progress."""
        while True:
            before = self._activity()
            for child in self._children:
                await child.join()
            if self._activity() == before and all(c.quiet() for c in self._children):
                return

    def _activity(self) -> int:
        return sum(
            c.processed + c.dead_letters + c.crashes + c.mailbox.dropped for c in self._children
        )

    # -- children -------------------------------------------------------------------------

    async def _start_child(self, child: Child, restart: tuple[float, str] | None = None) -> None:
        """Start an incarnation and wait until its ``on_start`` returned or raised.

        ``restart`` is (backoff, name of the crashed child) when this replaces a crashed one.
        """
        if child.finished or self._phase >= _STOPPING:
            return
        child.restarting = restart
        child.generation += 1
        child.stop_requested = False
        child.gate = None
        child.running = True
        child.done = anyio.Event()
        started = anyio.Event()
        self._tg.start_soon(
            self._incarnation, child, child.generation, started, name=f"actor {child.name}"
        )
        await started.wait()

    async def _incarnation(self, child: Child, generation: int, started: anyio.Event) -> None:
        _CURRENT.set(self)
        done = child.done
        assert done is not None
        actor: Actor | None = None
        on_start_ok = False
        error: BaseException | None = None
        try:
            with anyio.CancelScope() as scope:
                child.scope = scope
                try:
                    if child.restarting is not None:
                        self._announce_restart(child, *child.restarting)
                        child.restarting = None
                    actor = child.factory()
                    child.actor = actor
                    await actor.on_start()
                except BaseException as exc:
                    if not is_crash(exc):
                        raise
                    error = exc
                else:
                    on_start_ok = True
                    started.set()
                    error = await child.serve(actor)
            child.scope = None
            started.set()
            if error is not None:
                if actor is not None:
                    await self._call_hook(child, "on_failure", actor.on_failure(error))
                self._crashed(child, generation, error)
                return
            gate = child.gate
            if gate is not None:
                await gate.wait()
            if actor is not None and on_start_ok:
                await self._call_hook(child, "on_stop", actor.on_stop())
        except BaseException:
            if actor is not None and on_start_ok and error is None:
                await self._wait_turn_to_stop(child)
                await self._call_hook(child, "on_stop", actor.on_stop())
            raise
        finally:
            started.set()
            child.scope = None
            child.running = False
            child.actor = None
            done.set()

    async def _wait_turn_to_stop(self, child: Child) -> None:
        """Wait, shielded, until ``_stop_children`` lets ``child`` stop (bounded, in case it never
        does): a cancellation from outside, such as the host's, reaches every child at once, and
        their ``on_stop`` would otherwise run in whatever order the cancellation reached them."""
        gate = child.gate
        if gate is None:
            gate = child.gate = anyio.Event()
        with anyio.move_on_after(self.shutdown_timeout_s, shield=True):
            await gate.wait()

    def _announce_restart(self, child: Child, delay: float, cause: str) -> None:
        # Counted and published by the new incarnation itself, before its on_start, so that
        # LoopRestarted always precedes whatever the successor does.
        child.restarts += 1
        self.events.publish(
            LoopRestarted(actor=child.name, restarts=child.restarts, backoff_s=delay, cause=cause)
        )
        self._log.info("actor_restarted", actor=child.name, backoff_s=delay, cause=cause)

    async def _call_hook(self, child: Child, hook: str, coro: Any) -> None:
        """Run a lifecycle hook shielded and bounded; its failure is logged, never raised."""
        with anyio.move_on_after(self.shutdown_timeout_s, shield=True) as scope:
            try:
                await coro
            except BaseException as exc:
                if not is_crash(exc):
                    raise
                self._log.exception("hook_failed", actor=child.name, hook=hook)
        if scope.cancelled_caught:
            self._log.warning(
                "hook_timed_out", actor=child.name, hook=hook, timeout_s=self.shutdown_timeout_s
            )

    def _crashed(self, child: Child, generation: int, error: BaseException) -> None:
        child.crashes += 1
        if child.processed > child.processed_at_crash:
            child.consecutive = 0
        child.consecutive += 1
        child.processed_at_crash = child.processed
        self.events.publish(
            LoopCrashed(
                actor=child.name,
                error_type=type(error).__name__,
                error=str(error),
                consecutive=child.consecutive,
            )
        )
        self._log.warning(
            "actor_crashed", actor=child.name, error=error, consecutive=child.consecutive
        )
        self._crashes.append((child, generation, error))
        waiter = self._control_waiter
        if waiter is not None:
            self._control_waiter = None
            waiter.set()

    async def _stop_children(self, children: list[Child], *, grace_s: float | None) -> None:
        """Stop ``children`` at a message boundary, ``on_stop`` in reverse start order.

        Every child stops taking messages at once; then, from the last started, each is let
        through to ``on_stop`` and waited for. A child still busy after ``grace_s`` (default
        ``shutdown_timeout_s``) is cancelled; the message it was handling goes back to its
        mailbox.
        """
        grace = self.shutdown_timeout_s if grace_s is None else grace_s
        live = [c for c in children if c.running]
        for child in live:
            child.stop_requested = True
            if child.gate is None or child.gate.is_set():
                child.gate = anyio.Event()
            child.mailbox.wake_receivers()
        for child in reversed(live):
            done = child.done
            if child.gate is not None:
                child.gate.set()
            if done is None:
                continue
            with anyio.move_on_after(grace):
                await done.wait()
            if not done.is_set():
                if child.scope is not None:
                    child.scope.cancel()
                await done.wait()

    def _finish(self, child: Child, error: Callable[[], BaseException] | None) -> None:
        """Mark ``child`` stopped for good: refuse messages, fail queued asks, count leftovers."""
        if child.finished:
            return
        child.finished = True
        leftover = child.mailbox.take_all()
        if child.retry is not NOTHING:
            leftover.insert(0, child.retry)
            child.retry = NOTHING
        child.left_at_shutdown = len(leftover)
        child.leftovers = [m.message if type(m) is Ask else m for m in leftover]
        if error is None:

            def error() -> BaseException:
                return ActorStopped(f"actor {child.name!r} has stopped")

        child.mailbox.close(error)
        for item in leftover:
            if type(item) is Ask:
                item.fail(error())
        if leftover:
            self._log.info("left_at_shutdown", actor=child.name, count=len(leftover))
        child.notify_idle()

    # -- control ----------------------------------------------------------------------------

    async def _control(self) -> None:
        with anyio.CancelScope() as scope:
            self._control_scope = scope
            while True:
                while not self._crashes:
                    waiter = self._control_waiter = anyio.Event()
                    await waiter.wait()
                child, generation, error = self._crashes.popleft()
                if generation != child.generation or child.finished or self._phase >= _STOPPING:
                    continue
                now = self._clock()
                times = self._restart_times
                times.append(now)
                while times[0] < now - self.within_s:
                    times.popleft()
                if len(times) > self.max_restarts:
                    await self._give_up(child, error)
                    return
                await self._restart(child)

    def _stop_control(self) -> None:
        """No more restarts: end the control task and every restart waiting out its backoff."""
        if self._control_scope is not None:
            self._control_scope.cancel()
        for scope in self._delayed:
            scope.cancel()

    async def _restart(self, crashed: Child) -> None:
        delay = self.backoff.delay(crashed.consecutive, self._rng)
        if self.strategy is RestartStrategy.ONE_FOR_ONE and delay > 0:
            # Waited out in a task of its own: a sibling that crashes meanwhile is restarted
            # after its own backoff, not after this one too.
            self._tg.start_soon(self._restart_later, crashed, delay)
            return
        if self.strategy is RestartStrategy.REST_FOR_ONE:
            index = self._children.index(crashed)
            group = [c for c in self._children[index:] if not c.finished]
            await self._stop_children(group[1:], grace_s=None)
        else:
            group = [crashed]
        if delay > 0:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()
        for child in group:
            await self._start_child(child, restart=(delay, crashed.name))

    async def _restart_later(self, child: Child, delay: float) -> None:
        with anyio.CancelScope() as scope:
            self._delayed.add(scope)
            try:
                await anyio.sleep(delay)
                await self._start_child(child, restart=(delay, child.name))
            finally:
                self._delayed.discard(scope)

    async def _give_up(self, child: Child, error: BaseException) -> None:
        count = len(self._restart_times)
        gave_up = SupervisorGaveUp(
            f"supervisor {self.name!r} gave up: {count} crashes within {self.within_s} s exceed "
            f"max_restarts={self.max_restarts}; the last was actor {child.name!r}: "
            f"{type(error).__name__}: {error}",
            child=child.name,
            cause=error,
            restarts=count,
        )
        self._gave_up = gave_up
        self._phase = _STOPPING
        for scope in self._delayed:
            scope.cancel()
        for c in self._children:
            c.mailbox.close(gave_up.copy)
            # Nothing queued is handled any more: answer each asker now, not after the others
            # stopped. A child waiting on another's answer (a loop asking a sibling) would
            # otherwise hold the stop up for the whole grace period.
            for item in c.mailbox.queued():
                if type(item) is Ask:
                    item.fail(gave_up.copy())
        await self._stop_children(self._children, grace_s=None)
        for c in self._children:
            self._finish(c, gave_up.copy)
        self.events.publish(
            SupervisorGaveUpEvent(
                actor=child.name,
                error_type=type(error).__name__,
                error=str(error),
                restarts=count,
                within_s=self.within_s,
            )
        )
        self._log.error("supervisor_gave_up", actor=child.name, error=error, restarts=count)
        if self.raise_on_give_up:
            raise gave_up
