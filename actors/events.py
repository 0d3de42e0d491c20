"""The events the supervisor and the mailboxes announce on an :class:`~sona.actors.EventBus`.

Every event is a frozen msgspec Struct in one tagged union (the tag is the class name unless set),
so a stream of them can be encoded and decoded losslessly. ``at`` (``time.time()``) and ``seq``
are filled in by :meth:`EventBus.publish`: build events with the defaults and let the bus number
them. Other layers define their own events by subclassing :class:`Event`.
"""

from __future__ import annotations

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Base of every bus event; ``seq`` is strictly increasing per bus, 0 until published.

    Events hold plain values, never cycles: untracked by the cyclic garbage collector, so a
    stream of them does not trigger its collections.
    """

    at: float = 0.0
    seq: int = 0


class LoopCrashed(Event, frozen=True, kw_only=True):
    """An actor's ``on_start`` or ``handle`` raised; the supervisor will restart it or give up."""

    actor: str
    error_type: str
    error: str
    consecutive: int  # crashes since the actor last handled a message successfully


class LoopRestarted(Event, frozen=True, kw_only=True):
    """A fresh actor instance took over the mailbox after ``backoff_s`` seconds."""

    actor: str
    restarts: int  # of this child, including this one
    backoff_s: float
    cause: str  # the child whose crash triggered the restart (differs under REST_FOR_ONE)


class SupervisorGaveUpEvent(Event, frozen=True, kw_only=True, tag="SupervisorGaveUp"):
    """The restart limit was crossed: every child has been stopped, nothing will restart."""

    actor: str  # the child whose crash crossed the limit
    error_type: str
    error: str
    restarts: int  # restarts counted inside the window when it gave up
    within_s: float


class DeadLettered(Event, frozen=True, kw_only=True):
    """A message raised on its first try and on its retry; it is set aside, never handled."""

    actor: str
    message_type: str
    message: str  # a bounded repr
    error_type: str
    error: str


class SamplesDropped(Event, frozen=True, kw_only=True):
    """``count`` messages or samples were dropped; ``stage`` says where: a full mailbox (its
    name), or, in sona's runtime, ingress and consolidation (the overflow ``policy``), log (the
    durable log failed), gave_up and shutdown (accepted samples nothing will handle)."""

    count: int
    stage: str
    policy: str = ""


class Lagged(Event, frozen=True, kw_only=True):
    """Delivered in-band to one subscriber that fell behind: ``missed`` events were lost.

    Its ``seq`` is that of the last event missed, so seqs stay strictly increasing in what the
    subscriber sees and the gap before this event is exactly ``missed`` events of the bus.
    """

    missed: int


SupervisorEvent = LoopCrashed | LoopRestarted | SupervisorGaveUpEvent | DeadLettered
"""The union a decoder needs for what the supervisor publishes (plus drops and lag)."""

ActorEvent = (
    LoopCrashed | LoopRestarted | SupervisorGaveUpEvent | DeadLettered | SamplesDropped | Lagged
)
