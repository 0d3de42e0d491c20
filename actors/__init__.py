"""A generic supervised actor runtime on anyio (knows nothing about LoRA).

Actors (:class:`Actor`) run under a :class:`Supervisor` that restarts them when they crash,
within a restart budget, with exponential backoff. Everyone else talks to an actor through an
:class:`ActorRef` whose bounded mailbox applies an :class:`OverflowPolicy` when full. The
supervisor announces crashes, restarts, dead letters, drops and giving up on an
:class:`EventBus`, where slow subscribers lose old events and are told so (:class:`Lagged`).
Every exception that reaches a caller is a single plain exception, never an exception group.
"""

from sona.actors.actor import DECLINED, Actor
from sona.actors.backoff import Backoff
from sona.actors.bus import EventBus, Subscription
from sona.actors.errors import (
    ActorError,
    ActorStopped,
    Backpressure,
    MessageDropped,
    MessageFailed,
    SupervisorGaveUp,
)
from sona.actors.events import (
    ActorEvent,
    DeadLettered,
    Event,
    Lagged,
    LoopCrashed,
    LoopRestarted,
    SamplesDropped,
    SupervisorEvent,
    SupervisorGaveUpEvent,
)
from sona.actors.mailbox import Mailbox, OverflowPolicy
from sona.actors.ref import ActorRef
from sona.actors.supervisor import RestartStrategy, Supervisor

__all__ = [
    "DECLINED",
    "Actor",
    "ActorError",
    "ActorEvent",
    "ActorRef",
    "ActorStopped",
    "Backoff",
    "Backpressure",
    "DeadLettered",
    "Event",
    "EventBus",
    "Lagged",
    "LoopCrashed",
    "LoopRestarted",
    "Mailbox",
    "MessageDropped",
    "MessageFailed",
    "OverflowPolicy",
    "RestartStrategy",
    "SamplesDropped",
    "Subscription",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorGaveUp",
    "SupervisorGaveUpEvent",
]
