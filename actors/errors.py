"""The exceptions the actor runtime raises into callers: always single, plain exceptions."""

from __future__ import annotations


class ActorError(Exception):
    """Base of every exception raised by ``sona.actors``."""


class Backpressure(ActorError):
    """A mailbox was full and its policy (REJECT, or BLOCK on a ``*_nowait`` call) refused."""


class ActorStopped(ActorError):
    """The actor is stopping or stopped: the message was not accepted, or never got an answer."""


class MessageDropped(ActorError):
    """An ``ask()`` whose message a DROP_OLDEST or DROP_NEWEST mailbox dropped."""


class MessageFailed(ActorError):
    """An ``ask()`` whose message raised twice (first try and retry) and was dead-lettered.

    The handler's last exception is attached as ``__cause__``.
    """


class SupervisorGaveUp(ActorError):
    """Children crashed more than ``max_restarts`` times within ``within_s`` seconds.

    ``cause`` is the exception of the crash that crossed the limit (also ``__cause__``) and
    ``child`` the name of the child that raised it.
    """

    def __init__(
        self,
        message: str,
        *,
        child: str | None = None,
        cause: BaseException | None = None,
        restarts: int = 0,
    ) -> None:
        super().__init__(message)
        self.child = child
        self.cause = cause
        self.restarts = restarts
        self.__cause__ = cause

    def copy(self) -> SupervisorGaveUp:
        """A fresh instance for one more raise, so tracebacks do not pile up on a shared one."""
        return SupervisorGaveUp(
            str(self), child=self.child, cause=self.cause, restarts=self.restarts
        )
