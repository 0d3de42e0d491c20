"""The handle through which everyone else talks to a supervised actor."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sona.actors.actor import DECLINED, Ask
from sona.actors.backoff import is_number
from sona.actors.child import Child

if TYPE_CHECKING:
    from sona.actors.supervisor import Supervisor

_T = TypeVar("_T")
_R = TypeVar("_R")


class ActorRef:
    """Address of one supervised child; stays valid across its restarts.

    After the supervisor gave up, ``tell``, ``tell_nowait`` and ``ask`` raise
    ``SupervisorGaveUp``; after a graceful stop they raise ``ActorStopped``.
    """

    __slots__ = ("_child", "_mailbox", "_supervisor", "name")

    def __init__(self, child: Child, supervisor: Supervisor) -> None:
        self._child = child
        self._mailbox = child.mailbox
        self._supervisor = supervisor
        self.name = child.name

    def __repr__(self) -> str:
        return f"<ActorRef {self.name!r} queued={self._child.queued()}>"

    async def tell(self, message: Any) -> bool:
        """Send ``message``, obeying the mailbox's overflow policy; never yields if there is room.

        Returns True when the message was queued, False when DROP_NEWEST dropped it. BLOCK waits
        for room; REJECT raises Backpressure.
        """
        return await self._mailbox.put(message)

    def tell_nowait(self, message: Any) -> bool:
        """Send without waiting: as :meth:`tell`, but BLOCK raises Backpressure when full."""
        return self._mailbox.put_nowait(message)

    def tell_inline(self, message: Any) -> bool:
        """Send ``message``, handling it right here when the actor is idle.

        When nothing is queued or in flight and the actor's :meth:`Actor.handle_inline`
        accepts the message, it runs in the caller's task and this returns True; otherwise the
        message is sent as by :meth:`tell_nowait` and this returns False. Either way it is
        handled once, in order, with the usual crash semantics.
        """
        if self._child.handle_inline(message):
            return True
        self._mailbox.put_nowait(message)
        return False

    def call_inline(
        self,
        handle: Callable[..., _T],
        args: tuple[Any, ...],
        crashed: Callable[..., tuple[Any, _R]],
    ) -> _T | _R | None:
        """Handle a message in the caller's task without building it, when the actor is idle.

        For a sender whose message costs a noticeable part of handling it: ``handle(*args)``
        must do exactly what the actor's own handling of that message does, and return
        something other than None. While the actor is idle (as for :meth:`tell_inline`) this
        runs it here and returns what it returns; otherwise it returns None with nothing
        done, and the caller sends the message as usual. If ``handle`` raises,
        ``crashed(*args)`` returns ``(message, instead)``: the message takes
        :meth:`tell_inline`'s crash path (replayed in the actor's own task, retried once,
        dead-lettered), and this returns ``instead``, through which the caller follows that
        message's fate.
        """
        return self._child.call_inline(handle, args, crashed)

    async def ask(self, message: Any, *, timeout: float | None = None) -> object:
        """Send ``message`` and wait for what ``handle`` returns for it.

        ``timeout`` covers both waiting for room and waiting for the answer; on expiry a
        ``TimeoutError`` is raised and the message, if already queued, is still handled. An
        answer (or failure) already there when the asker resumes wins over the expiry. If the
        message is dropped by the overflow policy the asker gets MessageDropped; if it raises
        twice and is dead-lettered, MessageFailed (the handler's error as ``__cause__``); if the
        actor stops first, ActorStopped or SupervisorGaveUp.

        ``timeout`` must be None or a number > 0 (``inf`` waits for ever): zero or a negative
        number could never see an answer, yet would still send the message, so they are refused
        before anything is sent.
        """
        _check_timeout(timeout)
        return await self._answer(Ask(message, anyio.Event()), timeout, send=True)

    async def ask_inline(self, message: Any, *, timeout: float | None = None) -> object:
        """:meth:`ask`, answered right here when the actor is idle.

        When nothing is queued or in flight and the actor's :meth:`Actor.answer_inline` answers,
        the answer comes back in the caller's task without a task switch; otherwise the message
        is asked as by :meth:`ask`. If answering raised, the actor's own loop retries the
        message and this waits for that answer, with the crash semantics of :meth:`ask`.
        """
        _check_timeout(timeout)
        answer, envelope = self._child.answer_inline(message)
        if envelope is not None:
            return await self._answer(envelope, timeout, send=False)
        if answer is not DECLINED:
            return answer
        return await self._answer(Ask(message, anyio.Event()), timeout, send=True)

    async def _answer(self, envelope: Ask, timeout: float | None, *, send: bool) -> object:
        try:
            with anyio.fail_after(timeout):
                if send:
                    await self._mailbox.put(envelope)
                await envelope.done.wait()
        except TimeoutError:
            # When the loop was held up (a long synchronous step), the deadline can cancel this
            # wait and the handler answer before this task runs again: the message was handled,
            # so its outcome is reported, not a timeout that would leave the asker unsure.
            if not envelope.done.is_set():
                raise TimeoutError(
                    f"ask to actor {self.name!r} got no answer within {timeout} s"
                ) from None
        if envelope.error is not None:
            raise envelope.error
        return envelope.result

    def withdraw(self, match: Callable[[Any], bool]) -> Any | None:
        """Take back the oldest queued message ``match`` accepts (None if there is none); one
        already taken by the actor, or held for a retry after a crash, stays where it is."""
        return self._mailbox.withdraw(match)

    def qsize(self) -> int:
        """Messages waiting, including one waiting to be retried after a crash."""
        return self._child.queued()

    @property
    def capacity(self) -> int:
        return self._mailbox.capacity

    @property
    def idle(self) -> bool:
        """True when nothing is queued and the actor waits for a message (or is gone)."""
        return self._child.quiet()

    @property
    def running(self) -> bool:
        return self._child.running

    @property
    def gave_up(self) -> bool:
        return self._supervisor.gave_up

    async def join(self) -> None:
        """Wait until the mailbox is empty and the actor idle, or the actor stopped for good.

        Returns normally in every case; check ``gave_up`` or ``qsize()`` to tell them apart.
        Messages sent meanwhile are waited for too.
        """
        await self._child.join()

    def stats(self) -> dict[str, int]:
        """This child's counters, as in :meth:`Supervisor.stats`."""
        return self._child.stats()

    def leftovers(self) -> list[Any]:
        """Messages still queued when the actor stopped for good (none handled), oldest first."""
        return list(self._child.leftovers)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (not is_number(timeout) or math.isnan(timeout) or timeout <= 0):
        raise ValueError(f"ask timeout must be None or a number > 0, got {timeout!r}")
