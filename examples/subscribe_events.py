"""Watching the runtime: subscribe to its events while it learns and its loops crash.

Feedback from two simulated domains flows into a ``SonaRuntime`` whose loops are made to crash
at random (``Chaos``). A subscriber prints what happens as it happens — consolidations with
their measured quality delta, detected task boundaries, Deep runs, crashes and restarts,
dead letters — and counts every kind. Per-sample events (``InstantApplied``) are left out of
the subscription: a subscriber that cannot keep up loses its oldest events and is told how
many (``Lagged``), it never slows the runtime down.

Run it as is: ``python examples/subscribe_events.py``; it exits 0.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Any

from sona import (
    AdaptFeedback,
    Chaos,
    MicroLoraConfig,
    SonaLlmConfig,
    SonaRuntime,
    SupervisionConfig,
    TargetModule,
)
from sona.events import (
    BackgroundCompleted,
    DeadLettered,
    DeepCompleted,
    Lagged,
    LoopCrashed,
    LoopRestarted,
    SamplesDropped,
    SupervisorGaveUp,
    TaskBoundary,
    UpdateRejected,
)
from sona.simulator import DomainWorld

DIM = 64
MODULE = TargetModule.Q_PROJ
PER_DOMAIN = 1500
SHOW_PER_KIND = 4  # lines printed per event kind; the rest are only counted
KINDS = (
    BackgroundCompleted,
    DeepCompleted,
    TaskBoundary,
    LoopCrashed,
    LoopRestarted,
    DeadLettered,
    SamplesDropped,
    UpdateRejected,
    SupervisorGaveUp,
)


def describe(event: Any) -> str:
    """One line for an event."""
    if isinstance(event, BackgroundCompleted):
        delta = "n/a" if event.quality_delta is None else f"{event.quality_delta:+.3f}"
        return (
            f"consolidated {event.samples_used} samples in {event.latency_ms:.1f} ms, delta {delta}"
        )
    if isinstance(event, DeepCompleted):
        delta = "n/a" if event.quality_delta is None else f"{event.quality_delta:+.3f}"
        return f"deep run: {event.samples_used} samples, {event.epochs} epochs, delta {delta}"
    if isinstance(event, TaskBoundary):
        return f"task boundary ({event.reason}): task {event.task_count}"
    if isinstance(event, LoopCrashed):
        return f"{event.actor} crashed: {event.error}"
    if isinstance(event, LoopRestarted):
        return f"{event.actor} restarted after {1e3 * event.backoff_s:.1f} ms"
    if isinstance(event, DeadLettered):
        return f"{event.actor} gave up on a {event.message_type}: {event.error}"
    if isinstance(event, Lagged):
        return f"this subscriber fell behind and missed {event.missed} events"
    return f"{type(event).__name__}: {event}"


async def watch(rt: SonaRuntime, counts: Counter[str], ready: asyncio.Event) -> None:
    async with rt.subscribe(KINDS, buffer=1024) as events:
        ready.set()
        async for event in events:
            kind = type(event).__name__
            counts[kind] += 1
            if counts[kind] <= SHOW_PER_KIND:
                print(f"  [{event.seq:5d}] {describe(event)}")
            elif counts[kind] == SHOW_PER_KIND + 1:
                print(f"  (more {kind} events are counted, not printed)")


async def main() -> int:
    world = DomainWorld(dim=DIM, domains=2, shared=2, seed=0)
    config = SonaLlmConfig(
        instant_lr=0.05,
        background_interval_ms=20,
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM, rank=2, target_modules=(MODULE,)),
        supervision=SupervisionConfig(max_restarts=200),  # room for the crashes injected below
    )
    chaos = Chaos(crash_probability=0.01, loops=("instant", "background"), seed=0)
    counts: Counter[str] = Counter()
    async with SonaRuntime(config, seed=0, chaos=chaos) as rt:
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch(rt, counts, ready))
        await ready.wait()
        for domain in (0, 1):
            print(f"feedback from domain {domain}")
            x = world.inputs(domain, PER_DOMAIN)
            targets = world.target_delta(domain, x)
            for i in range(PER_DOMAIN):
                await rt.adapt(x[i], AdaptFeedback.from_quality(1.0).with_target(targets[i]))
                if i % 100 == 99:
                    await asyncio.sleep(0.005)  # a pause in traffic: let the background loop run
        await rt.drain()
    await watcher  # the subscription ends once the runtime has stopped and it read the rest
    stats = rt.stats()
    print("events seen:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"restarts {stats.restarts}, dead-lettered {stats.dead_lettered}, "
          f"task boundaries {stats.task_count}")  # fmt: skip
    holds = stats.submitted_count == (
        stats.instant_count + stats.skipped_count + stats.dropped_samples + stats.dead_lettered
    )
    print(
        f"accounting: submitted {stats.submitted_count} == applied {stats.instant_count} + "
        f"skipped {stats.skipped_count} + dropped {stats.dropped_samples} + "
        f"dead-lettered {stats.dead_lettered}: {'holds' if holds else 'DOES NOT HOLD'}"
    )
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
