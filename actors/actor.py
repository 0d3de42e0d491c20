"""The unit of supervised work: subclass :class:`Actor` and override the hooks you need."""

from __future__ import annotations

from typing import Any, Final


class _Declined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DECLINED"


DECLINED: Final = _Declined()
"""What :meth:`Actor.answer_inline` returns to leave a message to :meth:`Actor.handle`."""


class Actor:
    """One incarnation of a supervised actor.

    The supervisor builds a fresh instance from its factory at start and after every crash,
    so state that must survive a crash belongs outside the instance (the mailbox always
    survives). Hooks run one at a time, never concurrently, in the actor's own task
    (``handle_inline`` in the sender's, while the actor is idle).
    """

    async def on_start(self) -> None:
        """Called before the first message; raising here counts as a crash."""

    async def handle(self, message: Any) -> object | None:
        """Handle one message; the return value answers an ``ask()``, and is ignored for a tell.

        Raising crashes this instance: the supervisor restarts the actor, which retries this
        message once, and dead-letters it if it raises again.
        """
        return None

    def handle_inline(self, message: Any) -> bool:
        """Optionally handle a told message synchronously, in the sender's task.

        :meth:`ActorRef.tell_inline` calls this only while the actor is idle (nothing queued,
        nothing to retry, no message in flight), so the message is handled in order and alone,
        exactly as if it had gone through the mailbox, minus the two task switches of the hop.
        Return False to decline: the message is then queued as usual. Raising counts as a crash
        on this message (replayed in the actor's own task, then retried and dead-lettered as
        for :meth:`handle`). It must not await: only handlers that never wait belong here.
        """
        return False

    def answer_inline(self, message: Any) -> object:
        """Optionally answer an asked message synchronously, in the asker's task.

        :meth:`ActorRef.ask_inline` calls this only while the actor is idle, as
        :meth:`ActorRef.tell_inline` calls :meth:`handle_inline`; what it returns is the answer.
        Return :data:`DECLINED` to have the message queued and answered by :meth:`handle`.
        Raising counts as a crash on this message: the actor's own loop retries it, and the
        asker gets that answer or failure, as for :meth:`ActorRef.ask`. It must not await.
        """
        return DECLINED

    async def on_stop(self) -> None:
        """Called once on a graceful stop (after the drain), never after a crash."""

    async def on_failure(self, error: BaseException) -> None:
        """Called on the crashed instance before its successor starts: release what it holds.

        ``on_stop`` is not called after a crash, so that a final action such as a checkpoint
        never runs on state the crash may have left half-updated.
        """


class Ask:
    """Envelope of an ``ask()``: the message plus the slot its answer or failure goes to."""

    __slots__ = ("done", "error", "message", "result")

    def __init__(self, message: Any, done: Any) -> None:
        self.message = message
        self.done = done  # an anyio.Event, created by the asking task
        self.result: object | None = None
        self.error: BaseException | None = None

    def resolve(self, result: object | None) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()
