"""Events the runtime publishes on its bus (one msgspec tagged union with the actors' events).

Every event has ``at`` and ``seq``, filled in by the bus: ``seq`` is strictly increasing, and a
subscriber sees gaps only where a ``Lagged`` event reports them.
"""

from __future__ import annotations

import msgspec

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
    "CheckpointFailed",
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
    """The Instant loop updated the live adapter from sample ``sample_id`` (its rating
    ``quality``) in ``latency_us`` inside its handler."""

    sample_id: int
    latency_us: float
    quality: float


class InstantSkipped(Event, frozen=True, kw_only=True):
    """The Instant loop handled sample ``sample_id`` and changed nothing; ``reason`` is one of
    ``LearningStats.skip_reasons``' keys (below_quality_threshold, no_direction,
    update_rejected)."""

    sample_id: int
    reason: str


class BackgroundCompleted(Event, frozen=True, kw_only=True):
    """A consolidation committed: ``samples_used`` samples folded in by ``strategy``;
    ``quality_delta`` is measured on held-back samples (None when it cannot be: ``notes``
    says why, as the result's notes do)."""

    samples_used: int
    strategy: str
    quality_delta: float | None
    latency_ms: float
    notes: list[str] = msgspec.field(default_factory=list)


class DeepCompleted(Event, frozen=True, kw_only=True):
    """A Deep run ended: ``epochs`` over ``samples_used`` kept samples (0 and 0 when there was
    nothing to replay); ``installed`` tells whether its result replaced the state."""

    samples_used: int
    epochs: int
    quality_delta: float | None
    latency_ms: float
    installed: bool
    notes: list[str] = msgspec.field(default_factory=list)  # why quality_delta is None, ...


class TaskBoundary(Event, frozen=True, kw_only=True):
    """A new task began (EWC++ anchors what was learned): detected from the inputs or
    requested with ``start_new_task``."""

    task_count: int
    reason: str  # "detected" or "requested"


class UpdateRejected(Event, frozen=True, kw_only=True):
    """An update of ``loop`` was refused before it was applied (it would have made weights
    non-finite or the delta overflow); ``reason`` says which."""

    loop: str
    reason: str


class CheckpointWritten(Event, frozen=True, kw_only=True):
    """A checkpoint of ``bytes`` bytes was written atomically to ``path``; it covers the
    sample log through ``log_sequence`` (0 without a log). The log itself is truncated only
    through the older of the checkpoints kept, so a restore can fall back on that one."""

    path: str
    bytes: int
    log_sequence: int = 0


class CheckpointFailed(Event, frozen=True, kw_only=True):
    """A checkpoint to ``path`` could not be written (``error`` says why: disk full,
    permission denied, ...); the previous checkpoints and the sample log are as they were.
    The periodic and final checkpoints have no caller to raise to: this is how the host hears
    that checkpoints stopped, before the log (kept from the last good one on) fills the disk."""

    path: str
    error: str


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
    | CheckpointFailed
)
