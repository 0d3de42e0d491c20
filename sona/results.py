"""What each loop returns, and the engine's statistics.

``quality_delta`` is always measured: the relative reduction of the step's own objective on
the newest samples the step did not train on, (before − after) / before. When it cannot be
computed it is None and ``notes`` says why.
"""

from __future__ import annotations

import msgspec

from sona.config import ConsolidationStrategy


class AdaptationResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What became of one submitted sample: ``applied`` by the Instant loop, or not, with
    ``notes`` saying why (skipped, declined, dropped, not handled before stop)."""

    applied: bool
    loop: str
    latency_us: float  # time inside the Instant loop's handler
    notes: list[str] = msgspec.field(default_factory=list)
    sample_id: int | None = None


class BackgroundResult(msgspec.Struct, frozen=True, kw_only=True):
    """One consolidation: ``quality_delta`` is the relative improvement of the objective on
    ``evaluated_on`` held-back samples it did not train on, or None with a note."""

    samples_used: int
    strategy: ConsolidationStrategy
    quality_delta: float | None
    latency_ms: float
    notes: list[str] = msgspec.field(default_factory=list)
    task_boundary: bool = False
    evaluated_on: int = 0  # held-back samples behind quality_delta


class DeepResult(msgspec.Struct, frozen=True, kw_only=True):
    """One Deep run: ``epochs`` over ``samples_used`` kept samples, measured like
    :class:`BackgroundResult` on held-out ones; ``installed`` tells whether it replaced the
    consolidated state (the notes say when it was re-applied on top or discarded)."""

    samples_used: int
    epochs: int
    quality_delta: float | None
    latency_ms: float
    notes: list[str] = msgspec.field(default_factory=list)
    installed: bool = True
    evaluated_on: int = 0


class LearningStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of every sample's fate; the accounting identities always hold:

    submitted_count == instant_count + skipped_count + dropped_samples + dead_lettered
                       + in_flight
    instant_count == consolidated_count + evicted_samples + pending_samples
    """

    submitted_count: int = 0
    instant_count: int = 0
    skipped_count: int = 0
    dropped_samples: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    instant_avg_latency_us: float = 0.0
    background_count: int = 0
    deep_count: int = 0
    pending_samples: int = 0
    accumulated_quality: float = 0.0
    restarts: int = 0
    gave_up: bool = False
    evicted_samples: int = 0
    consolidated_count: int = 0
    task_count: int = 0
    updates_rejected: int = 0
    replay_size: int = 0
    pattern_clusters: int = 0
    skip_reasons: dict[str, int] = msgspec.field(default_factory=dict)
