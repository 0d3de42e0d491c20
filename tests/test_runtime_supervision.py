"""Chaos on all three loops, and a supervisor that gives up without hurting the host."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from event_helpers import buffered
from runtime_helpers import (
    FailsOnce,
    Q,
    flush_sample_log,
    identity_holds,
    small_config,
    target_samples,
)
from scripted import Script, apply, config, learning, same_outputs
from sona.actors import DeadLettered, LoopCrashed, LoopRestarted, SamplesDropped, SupervisorGaveUp

from sona import background
from sona.config import Chaos, ConsolidationStrategy, SonaLlmConfig, SupervisionConfig
from sona.events import CheckpointWritten, UpdateRejected
from sona.lora_config import MicroLoraConfig
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.simulator import DomainWorld

pytestmark = pytest.mark.anyio


@pytest.mark.slow
async def test_chaos_on_all_loops_keeps_accounting_and_learning() -> None:
    world = DomainWorld(dim=32, domains=1, seed=5)
    samples = target_samples(world, 0, 20_000)
    cfg = small_config(
        deep_trigger_threshold=5_000.0,
        supervision=SupervisionConfig(
            max_restarts=100_000, within_s=10.0, backoff_min_s=0.0, backoff_max_s=0.0005
        ),
    )
    chaos = Chaos(crash_probability=0.02, loops=("instant", "background", "deep"), seed=1)
    held = world.held_out(0)
    base = world.quality(0, np.zeros_like(held))
    restarts: dict[str, int] = {}
    crashes = 0
    async with SonaRuntime(cfg, seed=3, chaos=chaos) as rt:
        async with rt.subscribe(kinds=[LoopCrashed, LoopRestarted], buffer=100_000) as sub:
            for i, s in enumerate(samples):
                await rt.submit(s)
                if i % 5000 == 4999:
                    await anyio.sleep(0.05)  # let Background and Deep run meanwhile
                    assert identity_holds(rt.stats())
            await rt.drain()
            await rt.consolidate()
            await rt.deep_optimize()
            for ev in buffered(sub):
                if isinstance(ev, LoopRestarted):
                    restarts[ev.actor] = restarts.get(ev.actor, 0) + 1
                elif isinstance(ev, LoopCrashed):
                    crashes += 1
        st = rt.stats()
        quality = world.quality(0, rt.forward(held, Q))
    assert not st.gave_up
    assert restarts.get("instant", 0) > 100  # ~2 % of 20,000 handled messages
    assert st.background_count > 0 and st.deep_count > 0
    assert st.restarts == sum(restarts.values()) == crashes
    assert identity_holds(st)
    assert st.in_flight == 0
    assert st.submitted_count == (
        st.instant_count + st.skipped_count + st.dropped_samples + st.dead_lettered
    )
    assert quality > base + 0.05


async def test_supervisor_gives_up_without_disturbing_the_host() -> None:
    world = DomainWorld(dim=32, domains=1, seed=6)
    samples = target_samples(world, 0, 50)
    cfg = small_config(supervision=SupervisionConfig(max_restarts=3, within_s=30.0))
    host_ticks = 0

    async def host_work() -> None:
        nonlocal host_ticks
        for _ in range(50):
            host_ticks += 1
            await anyio.sleep(0.002)

    held = world.held_out(0)[:4]
    rt = SonaRuntime(cfg, seed=1, chaos=Chaos(crash_probability=0.0, loops=("instant",), seed=0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(host_work)
        async with rt:
            for s in samples[:10]:
                assert (await rt.submit(s)).applied
            before = rt.forward(held, Q)
            rt._chaos = Chaos(crash_probability=1.0, loops=("instant",), seed=0)
            with pytest.raises(SupervisorGaveUp):
                for s in samples[10:]:
                    await rt.submit(s)
            with anyio.fail_after(5):
                while not rt.gave_up:
                    await anyio.sleep(0.01)
            assert rt.stats().gave_up
            with pytest.raises(SupervisorGaveUp):
                await rt.submit(samples[-1])
            with pytest.raises(SupervisorGaveUp):
                rt.submit_nowait(samples[-1])
            np.testing.assert_array_equal(rt.forward(held, Q), before)  # still serving
        # __aexit__ returned normally; the host task keeps running to completion
    assert host_ticks == 50
    st = rt.stats()
    assert st.in_flight == 0
    assert st.submitted_count == (
        st.instant_count + st.skipped_count + st.dropped_samples + st.dead_lettered
    )


async def test_crashing_consolidation_restarts_and_loses_no_sample() -> None:
    """A crash after the hand-over keeps it; the restarted loop finishes it first."""
    world = DomainWorld(dim=32, domains=1, seed=7)
    samples = target_samples(world, 0, 200)
    cfg = small_config(background_interval_ms=3_600_000)
    async with SonaRuntime(cfg, seed=2) as rt:
        for s in samples:
            await rt.submit(s)
        bg = rt._background
        flaky = FailsOnce(bg.prepare, RuntimeError("consolidation failed half-way"))
        bg.prepare = flaky  # type: ignore[method-assign]
        result = await rt.consolidate()  # crashes once; the retry after the restart succeeds
        st = rt.stats()
    assert result is not None and result.samples_used > 0
    assert flaky.calls == 2
    assert st.restarts >= 1
    assert st.instant_count == 200
    assert st.consolidated_count + st.pending_samples == 200
    assert identity_holds(st)


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
async def test_a_consolidation_that_failed_half_way_is_retried_as_if_it_never_ran(
    strategy: ConsolidationStrategy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It failed after its inputs were read into the pattern bank and the shift detector: the
    restarted loop's retry reads them in once, so a runtime whose first consolidation failed
    learns what one whose consolidation never failed learns, shifts of the input domain
    detected alike (and, under ENSEMBLE, inputs routed alike)."""
    scripts = Script(5).domain(5), Script(5).domain(5)
    a, b = SonaRuntime(config(strategy), seed=5), SonaRuntime(config(strategy), seed=5)
    pairs = list(zip((a, b), scripts, strict=True))
    async with a, b:
        for rt, script in pairs:
            await apply(rt, script, ("play", 20))
        reported = [await apply(a, scripts[0], ("consolidate", 0))]
        # b's measurement of quality_delta, which comes after the fold, fails once
        failing = FailsOnce(background.measured_delta, RuntimeError("failed after folding"))
        monkeypatch.setattr(background, "measured_delta", failing)
        reported.append(await apply(b, scripts[1], ("consolidate", 0)))
        monkeypatch.undo()
        assert failing.calls == 2 and b.stats().restarts == 1
        assert reported[0] == reported[1]
        for domain in (6, 7):
            for _, script in pairs:
                script.domain(domain)
            for op in (("play", 40), ("consolidate", 0)) * 2:
                reported = [await apply(rt, script, op) for rt, script in pairs]
                assert reported[0] == reported[1], (domain, op)
        assert same_outputs(a, b)
        assert learning(a.stats()) == {**learning(b.stats()), "restarts": 0}
        assert a.stats().task_count > 0  # the shifts were detected


async def test_a_consolidation_that_fails_again_is_given_up_on_and_announced() -> None:
    """Its retry fails too: rather than holding pending samples at the bound for good (BLOCK
    would keep every submitter waiting), its samples stay applied, are counted as evicted and
    announced, and later consolidations go on."""
    world = DomainWorld(dim=32, domains=1, seed=7)
    samples = target_samples(world, 0, 300)
    cfg = small_config(background_interval_ms=3_600_000, max_pending_samples=100)
    async with SonaRuntime(cfg, seed=2) as rt:
        bg = rt._background
        real = bg.prepare
        poisoned: list[Any] = []

        tries = 0

        def failing(hand: Any, *rest: Any) -> Any:
            nonlocal tries
            if not poisoned:
                poisoned.append(hand)
            if hand is poisoned[0]:
                tries += 1
                raise RuntimeError("this hand-over cannot be consolidated")
            return real(hand, *rest)

        bg.prepare = failing  # type: ignore[method-assign]
        async with rt.subscribe(kinds=[SamplesDropped], buffer=100) as sub:
            with anyio.fail_after(60):
                for s in samples:
                    await rt.submit(s)
                await rt.drain()
                await rt.consolidate()
            drops = buffered(sub)
        st = rt.stats()
    assert [(d.stage, d.policy) for d in drops] == [("consolidation", "failed")]
    assert tries == 2  # tried once more by the restarted loop, then given up on
    assert drops[0].count == len(poisoned[0].samples) > 0
    assert st.evicted_samples == drops[0].count
    assert st.instant_count == 300 and st.background_count >= 1
    assert st.consolidated_count == 300 - drops[0].count - st.pending_samples
    assert identity_holds(st)


async def test_a_sample_whose_gradient_overflows_in_consolidation_is_passed_over() -> None:
    """Finite targets near float32's largest value: the Instant loop applies them, and a later
    consolidation passes over the one whose gradient overflows, says so, and goes on, rather
    than failing on it again and again while BLOCK holds every submitter."""
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(16),
        consolidation_strategy=ConsolidationStrategy.QUALITY_WEIGHTED,
        background_min_samples=2,
        background_interval_ms=3_600_000,
        max_pending_samples=10,
    )
    rng = np.random.default_rng(0)
    async with SonaRuntime(cfg, seed=1) as rt:
        async with rt.subscribe(kinds=[UpdateRejected], buffer=100) as sub:
            with anyio.fail_after(30):
                for i in range(4):
                    x = rng.standard_normal(16).astype(np.float32)
                    y = (3e38 * np.sign(rng.standard_normal(16))).astype(np.float32)
                    await rt.submit(TrainingSample(x, y, float(rng.uniform())))
                    if i % 2:
                        await rt.consolidate()
                for _ in range(30):
                    one = np.ones(16, np.float32)
                    await rt.submit(TrainingSample(one, one, 0.9))
                await rt.drain()
            rejected = [e.reason for e in buffered(sub)]
        st = rt.stats()
    assert any("whose gradient overflows" in r for r in rejected), rejected
    assert st.restarts == 0 and st.dead_lettered == 0
    assert st.instant_count == 34 and identity_holds(st)


async def test_background_chaos_never_loses_pending_samples() -> None:
    world = DomainWorld(dim=32, domains=1, seed=8)
    samples = target_samples(world, 0, 300)
    cfg = small_config(
        background_interval_ms=5,
        supervision=SupervisionConfig(max_restarts=10_000, within_s=10.0, backoff_max_s=0.001),
    )
    chaos = Chaos(crash_probability=1.0, loops=("background",), seed=0)
    async with SonaRuntime(cfg, seed=2, chaos=chaos) as rt:
        for s in samples:
            await rt.submit(s)
        await anyio.sleep(0.2)
        st = rt.stats()
        assert st.restarts > 0 and st.consolidated_count == 0
        assert st.pending_samples == 300
        rt._chaos = None
        with anyio.fail_after(5):
            while rt.stats().pending_samples > 30:  # the newest few are held back to measure
                await rt.consolidate()
        st = rt.stats()
    assert st.consolidated_count + st.pending_samples == 300
    assert identity_holds(st)


async def test_dead_lettered_automatic_deep_run_does_not_stop_later_ones() -> None:
    """A threshold-triggered Deep run that fails twice is dead-lettered; the next crossing of
    the threshold must request a new run instead of waiting forever for the lost one."""
    world = DomainWorld(dim=32, domains=1, seed=9)
    samples = target_samples(world, 0, 400)
    cfg = small_config(
        deep_trigger_threshold=20.0,
        supervision=SupervisionConfig(
            max_restarts=1_000, within_s=10.0, backoff_min_s=0.0, backoff_max_s=0.0005
        ),
    )
    chaos = Chaos(crash_probability=1.0, loops=("deep",), seed=0)
    lost = 0
    rt = SonaRuntime(cfg, seed=4, chaos=chaos)
    async with rt, rt.subscribe(kinds=[DeadLettered], buffer=1_000) as sub:
        for s in samples:
            await rt.submit(s)
            await anyio.sleep(0)  # let the Deep actor crash, retry and dead-letter
        with anyio.fail_after(5):
            while lost < 3:
                ev = await sub.receive()
                if isinstance(ev, DeadLettered) and ev.message_type == "RunDeep":
                    lost += 1
                    if lost < 3:  # more rated samples cross the threshold again
                        for s in samples[:40]:
                            await rt.submit(s)
    assert lost >= 3


def _crash_instant_on(rt: SonaRuntime, sample_id: int) -> None:
    """The Instant loop raises on ``sample_id`` each time it handles it: dead-lettered."""
    inst = rt._instant
    real = inst.process

    def process(sid: int, *args: Any) -> Any:
        if sid == sample_id:
            raise RuntimeError("this sample crashes the Instant loop")
        return real(sid, *args)

    inst.process = process  # type: ignore[method-assign]


async def test_dead_lettered_samples_are_not_replayed_after_a_crash(tmp_path: Path) -> None:
    """The caller of a dead-lettered sample was told it was not learned from: a restore after a
    crash counts it as dead-lettered again instead of feeding it to the Instant loop."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=7), 0, 12)
    state = tmp_path / "state"
    async with SonaRuntime(small_config(), seed=1, checkpoint_dir=state) as rt:
        _crash_instant_on(rt, 6)
        results = [await rt.submit(s) for s in samples]
        assert [r.sample_id for r in results if not r.applied] == [6]
        assert "dead-lettered" in results[5].notes[0]
        await flush_sample_log(rt)
        shutil.copytree(state, tmp_path / "crash")  # what a crash now would leave
        before = rt.stats()
    again = SonaRuntime.restore(tmp_path / "crash")
    assert again.restored is not None and 6 not in again.restored.replayed
    async with again:
        await again.drain()
        st = again.stats()
    assert (st.submitted_count, st.instant_count, st.dead_lettered) == (12, 11, 1)
    assert st.instant_count == before.instant_count and identity_holds(st)


async def test_a_sample_queued_in_the_checkpoint_then_dead_lettered_is_not_replayed(
    tmp_path: Path,
) -> None:
    """A checkpoint holds the samples it found waiting; one of them dead-lettered after it was
    taken has its outcome in the log, and a restore from that checkpoint must honour it
    rather than deliver the sample again from the checkpoint's queue."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=9), 0, 6)
    state = tmp_path / "state"
    async with SonaRuntime(small_config(), seed=1, checkpoint_dir=state) as rt:
        for s in samples:
            assert (await rt.submit(s)).applied
        await flush_sample_log(rt)
        shutil.copytree(state, tmp_path / "crash")  # killed: the log holds samples 1-6
    second = SonaRuntime.restore(tmp_path / "crash")
    assert second.restored is not None and second.restored.replayed == (1, 2, 3, 4, 5, 6)
    await second.checkpoint()  # before start: it holds the six as waiting
    _crash_instant_on(second, 3)
    async with second:
        await second.drain()  # the replay: sample 3 is dead-lettered
        assert second.stats().dead_lettered == 1
        await flush_sample_log(second)
        shutil.copytree(tmp_path / "crash", tmp_path / "again")  # killed again
    third = SonaRuntime.restore(tmp_path / "again")
    assert third.restored is not None and 3 not in third.restored.replayed
    async with third:
        await third.drain()
        st = third.stats()
    assert (st.submitted_count, st.instant_count, st.dead_lettered) == (6, 5, 1)
    assert identity_holds(st)


async def test_samples_failed_at_a_give_up_are_not_replayed_after_a_crash(tmp_path: Path) -> None:
    """Samples logged and then failed because the supervisor gave up were reported to their
    callers as failed: a restore after a crash must not learn from them."""
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=8), 0, 12)
    cfg = small_config(
        supervision=SupervisionConfig(max_restarts=0, backoff_min_s=0.0, backoff_max_s=0.001)
    )
    state = tmp_path / "state"
    rt = SonaRuntime(cfg, seed=1, checkpoint_dir=state, chaos=Chaos(crash_probability=0.0))
    async with rt:
        for s in samples[:5]:
            assert (await rt.submit(s)).applied
        async with rt.subscribe(CheckpointWritten) as written:
            rt._chaos = Chaos(crash_probability=1.0, loops=("instant",), seed=0)
            for s in samples[5:]:
                rt.submit_nowait(s)
            with anyio.fail_after(10):
                while not rt.gave_up:
                    await anyio.sleep(0.01)
                async for _ in written:  # the stopped state, written at the give-up
                    break
            # refused at the call, as without a log: not logged, counted or given an id
            with pytest.raises(SupervisorGaveUp):
                await rt.submit(samples[0])
            await flush_sample_log(rt)
        shutil.copytree(state, tmp_path / "crash")  # what a crash now would leave
        before = rt.stats()
    assert before.instant_count == 5 and before.submitted_count == 12
    again = SonaRuntime.restore(tmp_path / "crash")
    assert again.restored is not None and again.restored.replayed == ()
    async with again:
        await again.drain()
        st = again.stats()
    assert (st.submitted_count, st.instant_count) == (12, 5)
    assert st.dropped_samples + st.dead_lettered == 7 and identity_holds(st)
