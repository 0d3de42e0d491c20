"""Events the runtime publishes on its bus (one msgspec tagged union with the actors' events).

Every event has ``at`` and ``seq``, filled in by the bus: ``seq`` is strictly increasing, and a
subscriber sees gaps only where a ``Lagged`` event reports them.
"""

from __future__ import annotations

from sona.actors.events import (
    DeadLettered,
    Event,
    Lagged,
    LoopCrashed,
    LoopRestarted,
    SamplesDropped,
    SupervisorGaveUpEvent,
)

__all__ = [
    "BackgroundCompleted",
    "CheckpointWritten",
    "DeadLettered",
    "DeepCompleted",
    "Event",
    "InstantApplied",
    "InstantSkipped",
    "Lagged",
    "LoopCrashed",
    "LoopRestarted",
    "SamplesDropped",
    "SonaEvent",
    "SupervisorGaveUp",
    "SupervisorGaveUpEvent",
    "TaskBoundary",
    "UpdateRejected",
]

SupervisorGaveUp = SupervisorGaveUpEvent


class InstantApplied(Event, frozen=True, kw_only=True):
    sample_id: int
    latency_us: float
    quality: float


class InstantSkipped(Event, frozen=True, kw_only=True):
    sample_id: int
    reason: str


class BackgroundCompleted(Event, frozen=True, kw_only=True):
    samples_used: int
    strategy: str
    quality_delta: float | None
    latency_ms: float


class DeepCompleted(Event, frozen=True, kw_only=True):
    samples_used: int
    epochs: int
    quality_delta: float | None
    latency_ms: float
    installed: bool


class TaskBoundary(Event, frozen=True, kw_only=True):
    task_count: int
    reason: str  # "detected" or "requested"


class UpdateRejected(Event, frozen=True, kw_only=True):
    loop: str
    reason: str


class CheckpointWritten(Event, frozen=True, kw_only=True):
    path: str
    bytes: int
    log_sequence: int = 0


SonaEvent = (
    InstantApplied
    | InstantSkipped
    | BackgroundCompleted
    | DeepCompleted
    | TaskBoundary
    | UpdateRejected
    | SamplesDropped
    | DeadLettered
    | LoopCrashed
    | LoopRestarted
    | SupervisorGaveUpEvent
    | Lagged
    | CheckpointWritten
)
