"""A small async application embeds the runtime and watches its events."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import numpy as np
import pytest
from event_helpers import buffered
from runtime_helpers import DIM, Q, consolidating, identity_holds, small_config, target_samples

from sona.events import (
    BackgroundCompleted,
    DeepCompleted,
    InstantApplied,
    Lagged,
    TaskBoundary,
)
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.simulator import DomainWorld
from sona.training import TrainingConfig

pytestmark = pytest.mark.anyio


def _check_sequence(events: list[Any]) -> None:
    """seq strictly increases; a gap is exactly what the Lagged event before it reports."""
    for prev, ev in itertools.pairwise(events):
        assert ev.seq > prev.seq
        if isinstance(ev, Lagged):
            assert ev.seq - prev.seq == ev.missed
        else:
            assert ev.seq == prev.seq + 1


async def test_app_receives_loop_events_in_order() -> None:
    world = DomainWorld(dim=32, domains=1, seed=11)
    samples = target_samples(world, 0, 600)
    cfg = small_config(background_interval_ms=10, deep_trigger_threshold=250.0)
    seen: list[Any] = []
    lagging: list[Any] = []
    async with SonaRuntime(cfg, seed=4) as rt:

        async def watch(buffer: int, into: list[Any], stop: anyio.Event) -> None:
            async with rt.subscribe(buffer=buffer) as sub:
                ready.set()
                while not (stop.is_set() and sub.pending == 0):  # type: ignore[attr-defined]
                    with anyio.move_on_after(0.05):
                        into.append(await sub.__anext__())  # type: ignore[attr-defined]
                    if buffer < 100:
                        await anyio.sleep(0.002)  # a slow reader

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            tg.start_soon(watch, 100_000, seen, stop)
            await ready.wait()
            ready = anyio.Event()
            tg.start_soon(watch, 8, lagging, stop)
            await ready.wait()
            for s in samples:  # the application's own request loop
                result = await rt.submit(s)
                assert result.applied and result.sample_id is not None
            await rt.drain()
            await rt.consolidate()
            await rt.deep_optimize()
            await anyio.sleep(0.1)
            stop.set()
        assert identity_holds(rt.stats())
        assert world.quality(0, rt.forward(world.held_out(0), Q)) > world.base_quality(0)
    kinds = {type(e) for e in seen}
    assert {InstantApplied, BackgroundCompleted, DeepCompleted} <= kinds
    assert sum(isinstance(e, InstantApplied) for e in seen) == 600
    _check_sequence(seen)
    assert not any(isinstance(e, Lagged) for e in seen)
    assert any(isinstance(e, Lagged) for e in lagging)
    _check_sequence(lagging)


async def test_forward_reads_a_consistent_published_state() -> None:
    """Readers see consolidated versions only as whole swaps: the version never goes back."""
    world = DomainWorld(dim=32, domains=1, seed=12)
    samples = target_samples(world, 0, 400)
    x = world.held_out(0)[:8]
    async with SonaRuntime(small_config(background_interval_ms=5), seed=4) as rt:
        versions: list[int] = []
        for i, s in enumerate(samples):
            await rt.submit(s)
            if i % 20 == 0:
                pub = rt._background.published
                versions.append(pub.version)
                out = rt.forward(x, Q)
                assert np.isfinite(out).all()
                await anyio.sleep(0.006)
    assert versions == sorted(versions) and versions[-1] > 0


async def test_forward_keeps_what_was_learned_while_a_consolidation_runs() -> None:
    """Between the hand-over and the commit of a consolidation the live adapter starts afresh
    and the handed-over one is not yet published: forward used to drop everything learned
    since the previous consolidation for as long as the consolidation ran."""
    world = DomainWorld(dim=32, domains=1, seed=12)
    samples = target_samples(world, 0, 60)
    x = world.held_out(0)[:8]
    async with SonaRuntime(small_config(background_interval_ms=60_000), seed=4) as rt:
        for s in samples[:30]:
            await rt.submit(s)
        await rt.consolidate()
        for s in samples[30:]:
            await rt.submit(s)
        before = rt.forward(x, Q)
        consolidated = rt._background.published.predict(x, Q)
        assert np.abs(before - consolidated).max() > 1e-4  # the live adapter adds something
        async with consolidating(rt):
            during = rt.forward(x, Q)
        assert rt._instant.unfinished is None
        np.testing.assert_allclose(during, before, rtol=1e-6, atol=1e-7)


async def test_learning_while_a_consolidation_runs_adds_to_what_is_in_transit() -> None:
    """While a consolidation runs, forward is the published state plus the handed-over adapter
    plus the live one, so the live adapter must learn relative to the first two. Learning
    relative to the published state alone re-learns what is in transit, and forward then
    overshoots the targets by about what was handed over."""
    world = DomainWorld(dim=32, domains=1, seed=12)
    samples = target_samples(world, 0, 400)
    x = world.held_out(0)
    ideal = world.target_delta(0, x)

    def error(rt: SonaRuntime) -> float:
        return float(np.linalg.norm(rt.forward(x, Q) - ideal) / np.linalg.norm(ideal))

    cfg = small_config(background_interval_ms=60_000, max_pending_samples=10_000, instant_lr=0.3)
    async with SonaRuntime(cfg, seed=4) as rt:
        for s in samples[:200]:
            await rt.submit(s)
        async with consolidating(rt):
            handed_over = error(rt)
            for s in samples[200:]:
                await rt.submit(s)
            learned_meanwhile = error(rt)
    assert handed_over < 0.9  # something was learned and handed over
    assert learned_meanwhile < handed_over  # more of the same targets: closer, not past them


async def test_bad_kinds_raise_at_subscribe_and_the_runtime_goes_on() -> None:
    """A kind that is not a class is refused at the call, not at the next event (where it
    would fail inside the Instant loop and the supervisor)."""
    world = DomainWorld(dim=32, domains=1, seed=3)
    samples = target_samples(world, 0, 20)
    async with SonaRuntime(small_config(), seed=1) as rt:
        with pytest.raises(TypeError, match="event classes"):
            rt.subscribe(kinds=["InstantApplied"])
        async with rt.subscribe(kinds=InstantApplied) as sub:
            for s in samples:
                assert (await rt.submit(s)).applied
            got = [sub.receive_nowait() for _ in range(len(samples))]  # type: ignore[attr-defined]
        assert all(type(e) is InstantApplied for e in got)
        st = rt.stats()
        assert st.restarts == 0 and not st.gave_up
        assert identity_holds(st)


async def test_completion_events_carry_the_notes_that_say_why_quality_delta_is_none() -> None:
    """A subscriber learns what a caller of consolidate or deep_optimize reads in the
    result's notes: here, a consolidation that closes a task keeps no sample back to measure
    on, and a Deep run with nothing held out cannot be measured either."""
    world = DomainWorld(dim=32, domains=1, seed=3)
    cfg = small_config(background_interval_ms=3_600_000)
    kinds = [BackgroundCompleted, DeepCompleted]
    async with SonaRuntime(cfg, seed=1) as rt, rt.subscribe(kinds=kinds) as sub:
        for s in target_samples(world, 0, 40):
            await rt.submit(s)
        measured = await rt.consolidate()
        for s in target_samples(world, 0, 20):
            await rt.submit(s)
        rt.start_new_task()
        deep = await rt.deep_optimize(target_samples(world, 0, 1))
        with anyio.fail_after(10):
            while sub.pending < 3:
                await anyio.sleep(0.01)
        first, closing, deep_event = buffered(sub)
    assert measured.quality_delta is not None and first.notes == measured.notes
    assert closing.quality_delta is None
    assert any("not measured" in n for n in closing.notes), closing.notes
    assert deep.quality_delta is None and deep_event.quality_delta is None
    assert deep_event.notes == deep.notes
    assert any("no held-out sample" in n for n in deep_event.notes), deep_event.notes


async def test_task_boundaries_found_in_one_consolidation_announce_each_task_count() -> None:
    """Inputs from three separated subspaces in one batch: the consolidation detects two
    boundaries, and each event names the task count it began, in order, as a requested one
    after them does."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(3):
        basis = np.linalg.qr(rng.standard_normal((DIM, 4)))[0]
        for _ in range(150):
            x = (basis @ rng.standard_normal(4)).astype(np.float32)
            y = (0.1 * rng.standard_normal(DIM)).astype(np.float32)
            samples.append(TrainingSample(x, y, 0.9))
    cfg = small_config(
        background_interval_ms=3_600_000,
        background_min_samples=1000,
        max_pending_samples=2000,
        training=TrainingConfig(fisher_samples=20, boundary_detection=True),
    )
    async with SonaRuntime(cfg, seed=0) as rt, rt.subscribe(kinds=TaskBoundary) as sub:
        for s in samples:
            await rt.submit(s)
        await rt.consolidate()
        detected = rt.stats().task_count
        rt.start_new_task()
        with anyio.fail_after(10):
            while sub.pending < detected + 1:
                await anyio.sleep(0.01)
        events = buffered(sub)
    assert detected == 2
    assert [(e.task_count, e.reason) for e in events] == [
        (1, "detected"),
        (2, "detected"),
        (3, "requested"),
    ]
