"""One supervised child: its mailbox, counters, and the message loop an incarnation runs.

The loop is the hot path of the whole runtime. It takes messages with a plain ``popleft`` while
any are queued and only awaits the mailbox when it is empty, keeps the message in flight in a
local so a crash knows what to retry, and counts successes so the backoff can be reset lazily at
the next crash instead of on every message.
"""

from __future__ import annotations

import asyncio
import reprlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sona.actors._log import get_logger
from sona.actors.actor import DECLINED, Actor, Ask
from sona.actors.errors import MessageDropped, MessageFailed
from sona.actors.events import DeadLettered, SamplesDropped
from sona.actors.mailbox import Mailbox, OverflowPolicy

if TYPE_CHECKING:
    from sona.actors.bus import EventBus

_log = get_logger("sona.actors.child")
_T = TypeVar("_T")
_R = TypeVar("_R")
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 120
_repr.maxlevel = 2

NOTHING: Any = object()


def stray_cancellation(exc: BaseException) -> bool:
    """True for a cancellation exception that no enclosing cancel scope asked for.

    Awaiting an ``asyncio.Future`` that someone else cancelled, or a handler raising
    ``CancelledError`` itself, raises the backend's cancellation class in a task nobody is
    cancelling. Let through, it would end the actor's task without a crash report (no restart,
    its mailbox never served again) and, on asyncio, cancel the supervisor's whole task group
    and the host's ``async with`` body with it. Such an exception is a bug in the handler and
    is treated as a crash. A real cancellation shows as an expired or cancelled enclosing
    scope (``current_effective_deadline`` is then in the past, ``-inf`` once cancelled) or, on
    asyncio, as a pending ``Task.cancel()`` request.
    """
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        return False
    if anyio.current_effective_deadline() <= anyio.current_time():
        return False
    if isinstance(exc, asyncio.CancelledError):
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not running on asyncio
            task = None
        if task is not None and task.cancelling():
            return False
    return True


def is_crash(exc: BaseException) -> bool:
    """An error of the actor's own (any Exception, or a stray cancellation), as opposed to a
    real cancellation or an interpreter exit, which go on to the caller."""
    return isinstance(exc, Exception) or stray_cancellation(exc)


class Child:
    """State of one child across all its incarnations (the supervisor owns the lifecycle)."""

    def __init__(
        self,
        *,
        name: str,
        factory: Callable[[], Actor],
        mailbox_size: int,
        overflow: OverflowPolicy,
        events: EventBus,
        on_drop: Callable[[Any], None] | None,
        on_dead_letter: Callable[[Any, BaseException], None] | None,
    ) -> None:
        self.name = name
        self.factory = factory
        self.events = events
        self._on_drop = on_drop
        self._on_dead_letter = on_dead_letter
        self.mailbox: Mailbox[Any] = Mailbox(
            mailbox_size, overflow, name=name, on_drop=self._dropped
        )
        self.actor: Actor | None = None
        self.restarting: tuple[float, str] | None = None  # (backoff_s, cause) for the next start
        self.retry: Any = NOTHING  # a message that raised once, handled first by the successor
        self.generation = 0
        self.running = False  # an incarnation task is live
        self.finished = False  # stopped for good: nothing will handle this mailbox again
        self.stop_requested = False
        self.idle = False  # the loop is waiting on an empty mailbox
        self.inline_failure: Exception | None = None  # raised by the loop when it wakes
        self.scope: anyio.CancelScope | None = None
        self.done: anyio.Event | None = None
        self.gate: anyio.Event | None = None  # on_stop waits for it: orders stops in reverse
        self.idle_waiters: list[anyio.Event] = []
        self.leftovers: list[Any] = []
        # counters
        self.processed = 0
        self.inline = 0  # of those, handled in the sender's task (handle_inline)
        self.crashes = 0
        self.restarts = 0
        self.dead_letters = 0
        self.interrupted = 0
        self.left_at_shutdown = 0
        self.consecutive = 0
        self.processed_at_crash = 0

    # -- the message loop ----------------------------------------------------------------

    async def serve(self, actor: Actor) -> BaseException | None:
        """Handle messages until a stop is requested (returns None) or ``handle`` raises.

        On a crash the failing message goes to the retry slot, or is dead-lettered if it was
        already the retry; the exception is returned, not raised, to keep the crash path cheap.
        On cancellation the message in flight is put back at the head of the mailbox.
        """
        mailbox = self.mailbox
        items = mailbox._items
        putters = mailbox._putters
        handle = actor.handle
        item: Any = NOTHING
        from_retry = False
        try:
            if self.retry is not NOTHING and not self.stop_requested:
                item = self.retry
                from_retry = True
                if type(item) is Ask:
                    item.resolve(await handle(item.message))
                else:
                    await handle(item)
                self.retry = NOTHING
                from_retry = False
                self.processed += 1
            while not self.stop_requested:
                if items:
                    item = items.popleft()
                    if putters:
                        putters.popleft().set()
                    if type(item) is Ask:
                        item.resolve(await handle(item.message))
                    else:
                        await handle(item)
                    self.processed += 1
                else:
                    item = NOTHING
                    self.idle = True
                    if self.idle_waiters:
                        self.notify_idle()
                    try:
                        await mailbox.wait_nonempty()
                    finally:
                        self.idle = False
                    failure = self.inline_failure
                    if failure is not None:  # see handle_inline; retry holds the message
                        self.inline_failure = None
                        raise failure
            return None
        except BaseException as exc:
            if not is_crash(exc):
                if item is not NOTHING and not from_retry:
                    self.interrupted += 1
                    mailbox.push_front(item)
                raise
            if item is not NOTHING:
                if from_retry:
                    self.retry = NOTHING
                    self.dead_letter(item, exc)
                else:
                    self.retry = item
            return exc

    def handle_inline(self, message: Any) -> bool:
        """Hand a told message to the idle actor's ``handle_inline`` in the caller's task.

        False when the actor is not idle or declines; the caller then queues it. A message
        whose inline handling raised goes to the retry slot and the exception is raised in the
        actor's own loop, so the crash takes the usual path: ``on_failure``, restart with
        backoff, one retry, dead letter.
        """
        actor = self._inline_actor()
        if actor is None:
            return False
        self.idle = False  # a message the handler sends to this actor is queued, not nested
        try:
            handled = actor.handle_inline(message)
        except Exception as exc:
            self._inline_crashed(message, exc)
            return True
        finally:
            self.idle = True  # the loop is still parked; it clears this when it wakes
        if not handled:
            return False
        self.processed += 1
        self.inline += 1
        return True

    def call_inline(
        self,
        handle: Callable[..., _T],
        args: tuple[Any, ...],
        crashed: Callable[..., tuple[Any, _R]],
    ) -> _T | _R | None:
        """``handle(*args)`` in the caller's task as the idle actor's handling of a told
        message that is built only if it is needed (see :meth:`ActorRef.call_inline`).

        None when the actor is not idle. When ``handle`` raises, ``crashed(*args)`` returns
        the message and what to return instead, and the message takes
        :meth:`handle_inline`'s crash path."""
        if self._inline_actor() is None:
            return None
        self.idle = False  # a message the handler sends to this actor is queued, not nested
        try:
            result = handle(*args)
        except Exception as exc:
            message, instead = crashed(*args)
            self._inline_crashed(message, exc)
            return instead
        finally:
            self.idle = True  # the loop is still parked; it clears this when it wakes
        self.processed += 1
        self.inline += 1
        return result

    def answer_inline(self, message: Any) -> tuple[object, Ask | None]:
        """Hand an asked message to the idle actor's ``answer_inline`` in the caller's task.

        ``(answer, None)`` when it answered; ``(DECLINED, None)`` when the actor is not idle
        or declines, and the caller then asks through the mailbox; ``(DECLINED, envelope)``
        when answering raised: the envelope waits in the retry slot, as for ``handle_inline``,
        and the caller awaits the answer the actor's own loop gives it."""
        actor = self._inline_actor()
        if actor is None:
            return DECLINED, None
        self.idle = False
        try:
            answer = actor.answer_inline(message)
        except Exception as exc:
            envelope = Ask(message, anyio.Event())
            self._inline_crashed(envelope, exc)
            return DECLINED, envelope
        finally:
            self.idle = True
        if answer is not DECLINED:
            self.processed += 1
            self.inline += 1
        return answer, None

    def _inline_actor(self) -> Actor | None:
        """The actor, when it may handle a message in the sender's task: idle, nothing queued
        or to retry, not stopping."""
        actor = self.actor
        if (
            actor is None
            or not self.idle
            or self.mailbox._items
            or self.mailbox._state
            or self.retry is not NOTHING
            or self.stop_requested
            or self.inline_failure is not None
        ):
            return None
        return actor

    def _inline_crashed(self, item: Any, exc: Exception) -> None:
        self.retry = item
        self.inline_failure = exc
        self.mailbox.wake_receivers()

    # -- accounting ----------------------------------------------------------------------

    def dead_letter(self, item: Any, error: BaseException) -> None:
        self.dead_letters += 1
        message = item.message if type(item) is Ask else item
        if type(item) is Ask:
            failure = MessageFailed(
                f"actor {self.name!r} raised {type(error).__name__} on this message twice "
                "(first try and retry); it was dead-lettered"
            )
            failure.__cause__ = error
            item.fail(failure)
        self.events.publish(
            DeadLettered(
                actor=self.name,
                message_type=type(message).__name__,
                message=_repr.repr(message),
                error_type=type(error).__name__,
                error=str(error),
            )
        )
        _log.warning(
            "dead_lettered", actor=self.name, message_type=type(message).__name__, error=error
        )
        if self._on_dead_letter is not None:
            try:
                self._on_dead_letter(message, error)
            except Exception:
                _log.exception("on_dead_letter_failed", actor=self.name)

    def _dropped(self, item: Any) -> None:
        message = item.message if type(item) is Ask else item
        if type(item) is Ask:
            item.fail(
                MessageDropped(
                    f"mailbox {self.name!r} was full and its "
                    f"{self.mailbox.policy.name} policy dropped this message"
                )
            )
        self.events.publish(
            SamplesDropped(count=1, stage=self.name, policy=self.mailbox.policy.name)
        )
        _log.debug("message_dropped", actor=self.name, policy=self.mailbox.policy.name)
        if self._on_drop is not None:
            try:
                self._on_drop(message)
            except Exception:
                _log.exception("on_drop_failed", actor=self.name)

    # -- idleness --------------------------------------------------------------------------

    def quiet(self) -> bool:
        """Nothing queued, nothing to retry, and the loop waiting (or gone for good)."""
        if self.finished:
            return True
        return self.idle and self.running and not self.mailbox._items and self.retry is NOTHING

    def notify_idle(self) -> None:
        waiters, self.idle_waiters = self.idle_waiters, []
        for waiter in waiters:
            waiter.set()

    async def join(self) -> None:
        while not self.quiet():
            waiter = anyio.Event()
            self.idle_waiters.append(waiter)
            await waiter.wait()

    def queued(self) -> int:
        return len(self.mailbox._items) + (self.retry is not NOTHING)

    def stats(self) -> dict[str, int]:
        return {
            "restarts": self.restarts,
            "crashes": self.crashes,
            "processed": self.processed,
            "inline": self.inline,
            "dead_letters": self.dead_letters,
            "queued": self.queued(),
            "dropped": self.mailbox.dropped,
            "rejected": self.mailbox.rejected,
            "interrupted": self.interrupted,
            "left_at_shutdown": self.left_at_shutdown,
            "running": int(self.running),
        }
