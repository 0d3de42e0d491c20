"""Messages between the runtime's loop actors (frozen msgspec Structs, one tagged union).

Inside the process they travel by reference: a sample's arrays are never copied or converted.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Process(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Instant: learn from one accepted sample and answer through ``ticket``.

    One per request and never part of a reference cycle: untracked by the cyclic garbage
    collector, so requests do not trigger its collections.
    """

    sample_id: int
    sample: Any  # TrainingSample
    module: Any  # TargetModule | None
    ticket: Any  # sona.runtime.Ticket


class HandOverRequest(msgspec.Struct, frozen=True, tag=True):
    """Instant: give Background the live adapter and the samples behind it, start afresh."""


class Tick(msgspec.Struct, frozen=True, tag=True):
    """Background: consolidate if due (sent every ``background_interval_ms``)."""

    force: bool = False


class DeepSnapshot(msgspec.Struct, frozen=True, tag=True):
    """Background: copy what a Deep run needs (optionally with explicit samples)."""

    samples: Any = None


class InstallDeep(msgspec.Struct, frozen=True, tag=True):
    """Background: install (or re-apply) a finished Deep run."""

    outcome: Any


class RunDeep(msgspec.Struct, frozen=True, tag=True):
    """Deep: run once (triggered by accumulated quality, or on demand with ``samples``)."""

    samples: Any = None
    on_demand: bool = False


class NewTask(msgspec.Struct, frozen=True, tag=True):
    """Background: fold pending learning into the old task, then start a new one."""


LoopMessage = Process | HandOverRequest | Tick | DeepSnapshot | InstallDeep | RunDeep | NewTask
