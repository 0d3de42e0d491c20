"""When the Background loop runs, which samples it consumes, and what ``quality_delta`` means.

A fake clock (``SonaLlm(cfg, clock=lambda: t[0])``) drives ``maybe_background``; a spy on
``BackgroundLoop.consolidate`` records the sample ids each run consolidated, so "never twice on
the same samples" and "held-back samples are consumed exactly once" are checked on ids, not
only on counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from sona.background import Consolidation
from sona.config import ConsolidationStrategy as CS
from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.instant import HandOver
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.published import Published
from sona.sample import TrainingSample

D = 32
Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ


def _config(**changes: object) -> SonaLlmConfig:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V)),
        background_interval_ms=100,
        background_min_samples=5,
        instant_lr=0.05,
    )
    return cfg.replace(**changes)


class Spy:
    """Wraps ``engine.background.consolidate`` and keeps what each run consumed and held back."""

    def __init__(self, engine: SonaLlm) -> None:
        self.engine = engine
        self.consumed: list[list[int]] = []
        self.held: list[list[int]] = []
        self.offered: list[list[int]] = []
        self._inner = engine.background.consolidate
        engine.background.consolidate = self  # type: ignore[method-assign]

    def __call__(self, hand: HandOver, *, hold_back: bool = True) -> Consolidation:
        carried = [sid for sid, _ in self.engine.background.carry]
        self.offered.append(carried + [sid for sid, _ in hand.samples])
        out = self._inner(hand, hold_back=hold_back)
        self.consumed.append(list(out.consumed))
        self.held.append([sid for sid, _ in self.engine.background.carry])
        return out


class World:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.w = (self.rng.standard_normal((D, D)) / math.sqrt(D)).astype(np.float32)

    def x(self) -> np.ndarray:
        v = self.rng.standard_normal(D).astype(np.float32)
        return v / np.linalg.norm(v)

    def target(self, engine: SonaLlm, q: float | None = None) -> int:
        x = self.x()
        quality = float(self.rng.uniform(0.6, 1.0)) if q is None else q
        res = engine.adapt(x, AdaptFeedback.from_quality(quality).with_target(self.w @ x))
        assert res.applied and res.sample_id is not None
        return res.sample_id


def _engine(t: list[float], **changes: object) -> SonaLlm:
    return SonaLlm(_config(**changes), seed=1, clock=lambda: t[0])


# ---------------------------------------------------------------------- scheduling
def test_never_runs_on_an_empty_or_under_filled_buffer() -> None:
    t = [0.0]
    engine = _engine(t)
    world = World()
    for step in range(1, 6):
        t[0] = step * 1.0  # far past the interval every time
        assert engine.maybe_background() is None  # empty, then 1..4 pending: under-filled
        assert engine.stats().background_count == 0
        if step < 5:
            world.target(engine)
    world.target(engine)  # the fifth pending sample
    assert engine.stats().pending_samples == 5
    assert engine.maybe_background() is not None
    assert engine.stats().background_count == 1


def test_waits_for_the_interval_then_runs_once_per_interval() -> None:
    t = [0.0]
    engine = _engine(t)
    spy = Spy(engine)
    world = World()
    for _ in range(12):
        world.target(engine)
    for now in (0.0, 0.05, 0.0999):
        t[0] = now
        assert engine.maybe_background() is None
    t[0] = 0.1
    assert engine.maybe_background() is not None
    for _ in range(12):
        world.target(engine)
    t[0] = 0.15  # plenty pending, interval not over
    assert engine.maybe_background() is None
    assert engine.maybe_background() is None
    t[0] = 0.2
    assert engine.maybe_background() is not None
    assert engine.maybe_background() is None  # same instant: nothing runs twice
    assert len(spy.consumed) == 2 == engine.stats().background_count


def test_a_timer_at_exactly_the_interval_runs_every_time() -> None:
    """Clock readings 0.1, 0.2, 0.3 ... s with a 100 ms interval: each tick is one interval
    later than the last run, so each must run (0.3 − 0.2 is 0.09999999999999998 in floats)."""
    t = [0.0]
    engine = _engine(t, background_min_samples=1)
    world = World()
    ran = []
    for tick in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        world.target(engine)
        t[0] = tick
        ran.append(engine.maybe_background() is not None)
    assert all(ran), ran


def test_a_clock_that_goes_back_restarts_the_interval_instead_of_stalling() -> None:
    """A clock set back by an hour used to stop every run until it had regained the hour."""
    t = [3600.0]
    engine = _engine(t, background_min_samples=1)
    world = World()
    world.target(engine)
    t[0] = 3600.1
    assert engine.maybe_background() is not None
    world.target(engine)
    t[0] = 0.0  # set back
    assert engine.maybe_background() is None  # the interval starts again here
    t[0] = 0.05
    assert engine.maybe_background() is None
    t[0] = 0.1
    assert engine.maybe_background() is not None
    assert engine.stats().background_count == 2


def test_a_clock_that_jumps_ahead_runs_once() -> None:
    t = [0.0]
    engine = _engine(t, background_min_samples=1)
    world = World()
    world.target(engine)
    t[0] = 1e9
    assert engine.maybe_background() is not None
    world.target(engine)
    assert engine.maybe_background() is None  # the jump made one run due, not many
    assert engine.stats().background_count == 1


@pytest.mark.parametrize("reading", [math.nan, math.inf, -math.inf, "0.5", None, True])
def test_a_bad_clock_reading_is_refused_and_changes_nothing(reading: object) -> None:
    """A NaN reading used to be stored as the last run's time: every later maybe_background
    ran whatever the interval, since every comparison with NaN is false."""
    t: list[object] = [0.0]
    engine = SonaLlm(_config(background_min_samples=1), seed=1, clock=lambda: t[0])
    world = World()
    world.target(engine)
    t[0] = reading
    with pytest.raises((ValueError, TypeError), match=r"clock\(\)"):
        engine.maybe_background()
    with pytest.raises((ValueError, TypeError), match=r"clock\(\)"):
        engine.run_background()
    s = engine.stats()
    assert s.background_count == 0 and s.pending_samples == 1
    t[0] = 0.05  # a good reading again: the interval still counts from 0.0
    assert engine.maybe_background() is None
    t[0] = 0.1
    assert engine.maybe_background() is not None


def test_the_clock_is_checked_at_construction() -> None:
    with pytest.raises(TypeError, match="clock"):
        SonaLlm(_config(), seed=1, clock=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"clock\(\)"):
        SonaLlm(_config(), seed=1, clock=lambda: math.nan)


def test_an_under_filled_buffer_runs_as_soon_as_it_fills_after_the_interval() -> None:
    t = [0.0]
    engine = _engine(t)
    world = World()
    for _ in range(3):
        world.target(engine)
    t[0] = 0.5
    assert engine.maybe_background() is None
    t[0] = 0.51
    world.target(engine)
    world.target(engine)
    assert engine.maybe_background() is not None  # no second interval to wait for


def test_never_consolidates_a_sample_twice_and_loses_none() -> None:
    t = [0.0]
    engine = _engine(t, background_min_samples=7)
    spy = Spy(engine)
    world = World(3)
    applied: list[int] = []
    for step in range(200):
        applied.append(world.target(engine))
        if step % 3 == 0:
            t[0] += 0.037
            engine.maybe_background()
    flat = [sid for run in spy.consumed for sid in run]
    assert len(flat) == len(set(flat)), "a sample was consolidated twice"
    stats = engine.stats()
    assert stats.consolidated_count == len(flat)
    waiting = [sid for sid, _ in engine.background.carry] + [
        sid for sid, _ in engine.instant.pending
    ]
    assert sorted(flat + waiting) == applied
    assert stats.instant_count == stats.consolidated_count + stats.pending_samples
    assert len(spy.consumed) >= 10


def test_held_back_samples_are_consumed_exactly_once_by_the_next_run() -> None:
    t = [0.0]
    engine = _engine(t)
    spy = Spy(engine)
    world = World(4)
    for run in range(6):
        for _ in range(10 + 7 * run):
            world.target(engine)
        t[0] += 0.1
        result = engine.maybe_background()
        assert result is not None
        held = spy.held[-1]
        assert held, "a run with measurable samples holds some back"
        assert result.evaluated_on == len(held)
        assert not set(held) & set(spy.consumed[-1])
        assert sorted(held + spy.consumed[-1]) == sorted(spy.offered[-1])
        # the newest samples are the ones held back: about 10 % of what the run saw, up to
        # half a gap between the Instant loop's copies of its live adapter off (those after
        # the copy nearest that)
        assert held == sorted(spy.offered[-1])[-len(held) :]
        want = math.ceil(0.1 * len(spy.offered[-1]))
        assert abs(len(held) - want) <= max(1, len(spy.offered[-1]) // 4) // 2
        if run:
            assert set(spy.held[-2]) <= set(spy.consumed[-1])
    assert engine.stats().pending_samples == len(spy.held[-1])


def test_held_back_samples_count_toward_min_samples_and_are_consumed_by_the_next_run() -> None:
    t = [0.0]
    engine = _engine(t, background_min_samples=3)
    spy = Spy(engine)
    world = World(5)
    for _ in range(25):
        world.target(engine)
    t[0] = 1.0
    assert engine.maybe_background() is not None
    held = spy.held[-1]
    assert len(held) == 3
    t[0] = 2.0
    assert engine.maybe_background() is not None  # 3 held back, nothing new: still 3 samples
    assert sorted(spy.consumed[-1] + spy.held[-1]) == held
    # nothing is left to hold back from a single run's worth: eventually all are consumed
    for k in range(3, 6):
        t[0] = float(k)
        engine.maybe_background()
    assert engine.stats().pending_samples < 3
    flat = [sid for run in spy.consumed for sid in run]
    assert len(flat) == len(set(flat))


# ---------------------------------------------------------------------- quality_delta
def test_quality_delta_is_none_with_a_note_when_nothing_held_back_is_measurable() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal(D).astype(np.float32)
        g = rng.standard_normal(D).astype(np.float32)
        assert engine.adapt(x, AdaptFeedback.from_quality(0.9).with_gradient(g)).applied
    result = engine.run_background()
    assert result.samples_used == 20
    assert result.quality_delta is None
    assert result.evaluated_on == 0
    assert any("quality_delta" in n and "measurable" in n for n in result.notes), result.notes


def test_quality_delta_is_none_on_an_empty_run() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    result = engine.run_background()
    assert result.samples_used == 0
    assert result.quality_delta is None
    assert result.notes


def _loss(
    forward: Callable[[np.ndarray, TargetModule], np.ndarray],
    rows: list[TrainingSample],
    module: TargetModule,
) -> float:
    """½·q·‖μ(x) − y*‖², averaged: target feedback's objective, computed here from scratch."""
    total = 0.0
    for s in rows:
        fb = s.to_feedback()
        assert fb.vector is not None
        err = forward(s.input_embedding, module).astype(np.float64) - fb.vector
        total += 0.5 * fb.quality * float(err @ err)
    return total / len(rows)


def _predictor(published: Published) -> Callable[[np.ndarray, TargetModule], np.ndarray]:
    def forward(x: np.ndarray, module: TargetModule) -> np.ndarray:
        return published.predict(x[None, :], module)[0]

    return forward


def _consolidated(engine: SonaLlm) -> Callable[[np.ndarray, TargetModule], np.ndarray]:
    return _predictor(engine.background.published)


def _spy_hands(engine: SonaLlm) -> list[HandOver]:
    """Every hand-over the engine's Instant loop makes from now on."""
    hands: list[HandOver] = []
    hand_over = engine.instant.hand_over

    def spy(*args: int) -> HandOver:
        hands.append(hand_over(*args))
        return hands[-1]

    engine.instant.hand_over = spy  # type: ignore[method-assign]
    return hands


def _measured(
    engine: SonaLlm, hand: HandOver, offered: list[int], carried: int
) -> tuple[list[int], Callable[[np.ndarray, TargetModule], np.ndarray]]:
    """The samples a run just held back and what its quality_delta compares with the state
    before: the newest 10 % and the published state for a re-learning strategy; for
    EWC_MERGE, those after the hand-over's copy of the live adapter and the published state
    less what the live adapter learned from them."""
    published = _consolidated(engine)
    if engine.config.consolidation_strategy is not CS.EWC_MERGE:
        return offered[-math.ceil(0.1 * len(offered)) :], published
    copy = hand.before_held
    assert copy is not None and 1 <= hand.learned < len(hand.samples)

    def without_held(x: np.ndarray, module: TargetModule) -> np.ndarray:
        rows = x[None, :]
        return published(x, module) - (
            hand.live.forward(rows, module)[0] - copy.forward(rows, module)[0]
        )

    return offered[carried + hand.learned :], without_held


@pytest.mark.parametrize("strategy", list(CS))
def test_quality_delta_equals_an_independent_recomputation(strategy: CS) -> None:
    """Re-learning strategies hold back the newest 10 % and are measured as published;
    EWC_MERGE, whose live adapter learned every sample, holds back those after the hand-over's
    copy of it and is measured as published less what the live adapter learned from them."""
    engine = SonaLlm(_config(consolidation_strategy=strategy), seed=2, clock=lambda: 0.0)
    hands = _spy_hands(engine)
    world = World(6)
    samples: dict[int, TrainingSample] = {}
    deltas = []
    for run in range(4):
        for _ in range(15 + 5 * run):
            x = world.x()
            fb = AdaptFeedback.from_quality(float(world.rng.uniform(0.6, 1.0)))
            sample = TrainingSample(x, world.w @ x, fb.quality).with_feedback(
                fb.with_target(world.w @ x if run % 2 == 0 else -(world.w @ x))
            )
            res = engine.submit(sample)
            assert res.applied and res.sample_id is not None
            samples[res.sample_id] = sample
        old = engine.background.published
        carried = [sid for sid, _ in engine.background.carry]
        offered = carried + [sid for sid, _ in engine.instant.pending]
        result = engine.run_background()
        held, after_state = _measured(engine, hands[-1], offered, len(carried))
        assert [sid for sid, _ in engine.background.carry] == held
        rows = [samples[sid] for sid in held]
        before = {m: _loss(_predictor(old), rows, m) for m in (Q, V)}
        after = {m: _loss(after_state, rows, m) for m in (Q, V)}
        expected = float(np.mean([(before[m] - after[m]) / before[m] for m in (Q, V)]))
        assert result.quality_delta is not None
        assert result.evaluated_on == len(held)
        assert result.quality_delta == pytest.approx(expected, rel=1e-4, abs=1e-6)
        deltas.append(result.quality_delta)
    assert len(set(deltas)) == len(deltas)  # a measurement, not a constant


@pytest.mark.parametrize("strategy", [CS.EWC_MERGE, CS.AVERAGE])
def test_quality_delta_judges_each_module_on_the_samples_about_it(strategy: CS) -> None:
    """Samples that name a module teach only that module: V, untouched, is not judged on
    samples about Q (which would average a 0 into every measurement)."""
    engine = SonaLlm(_config(consolidation_strategy=strategy), seed=4, clock=lambda: 0.0)
    hands = _spy_hands(engine)
    world = World(8)
    samples: dict[int, TrainingSample] = {}
    for _ in range(30):
        x = world.x()
        sample = TrainingSample(x, world.w @ x, 0.9).with_feedback(
            AdaptFeedback.from_quality(0.9).with_target(world.w @ x)
        )
        res = engine.submit(sample.with_module(Q))
        assert res.applied and res.sample_id is not None
        samples[res.sample_id] = sample
    offered = [sid for sid, _ in engine.instant.pending]
    old = engine.background.published
    v_before = old.base.delta_weight(V)
    result = engine.run_background()
    held, after_state = _measured(engine, hands[-1], offered, 0)
    rows = [samples[sid] for sid in held]
    before = _loss(_predictor(old), rows, Q)
    after = _loss(after_state, rows, Q)
    np.testing.assert_array_equal(engine.background.published.base.delta_weight(V), v_before)
    assert result.evaluated_on == len(held) >= 3
    assert result.quality_delta is not None and result.quality_delta > 0.0
    assert result.quality_delta == pytest.approx((before - after) / before, rel=1e-4, abs=1e-6)


def test_ewc_merge_quality_delta_is_measured_out_of_sample() -> None:
    """Targets of pure noise: nothing learned carries over to another sample, so a fold can
    improve only the samples its live adapter learned. Measured as published on held-back
    samples that the folded live adapter had learned, EWC_MERGE would report a gain; less what
    the live adapter learned from them, it reports none."""
    engine = SonaLlm(_config(), seed=0, clock=lambda: 0.0)
    hands = _spy_hands(engine)
    rng = np.random.default_rng(0)
    reported, in_sample = [], []
    for _ in range(10):
        for _ in range(40):
            x = rng.standard_normal(D).astype(np.float32)
            y = 0.5 * rng.standard_normal(D).astype(np.float32)
            assert engine.adapt(
                x / np.linalg.norm(x), AdaptFeedback.from_quality(1.0).with_target(y)
            ).applied
        old = engine.background.published
        result = engine.run_background()
        assert result.quality_delta is not None
        reported.append(result.quality_delta)
        hand = hands[-1]
        held = [s for _, s in list(hand.samples)[hand.learned :]]
        assert result.evaluated_on == len(held) >= 4
        folded = MicroLoRA.merge_adapters(
            [(old.base, 1.0), (hand.live, 1.0)], rank=old.base.config.rank
        )
        whole = _predictor(Published(folded, dict(old.ensemble), None))
        in_sample.append(
            np.mean([1.0 - _loss(whole, held, m) / _loss(_predictor(old), held, m) for m in (Q, V)])
        )
    assert np.mean(in_sample) > 0.006  # what measuring on learned samples would report
    assert abs(np.mean(reported)) < 0.003


def test_quality_delta_is_negative_when_consolidation_makes_the_held_back_samples_worse() -> None:
    """Train on one map, hold back samples that want the opposite: the consolidated state
    (which never saw them) serves them worse than the live adapter that had learned them."""
    engine = SonaLlm(_config(consolidation_strategy=CS.AVERAGE), seed=2, clock=lambda: 0.0)
    world = World(7)
    for i in range(30):
        x = world.x()
        y = world.w @ x if i < 27 else -5.0 * (world.w @ x)
        engine.adapt(x, AdaptFeedback.from_quality(1.0).with_target(y))
    result = engine.run_background()
    assert result.evaluated_on == 3
    assert result.quality_delta is not None and result.quality_delta < 0.0


def test_the_consolidation_that_closes_a_task_keeps_nothing_back() -> None:
    """Held-back samples belong to the task that ends: consolidated after the boundary they
    would be tracked and counted as the next task's."""
    engine = SonaLlm(_config(background_min_samples=5), seed=0, clock=lambda: 0.0)
    spy = Spy(engine)
    rng = np.random.default_rng(3)
    for x in rng.standard_normal((50, D)).astype(np.float32):
        engine.adapt(x, AdaptFeedback.from_quality(0.9).with_target(0.1 * x))
    engine.run_background()
    assert spy.held[-1]  # an ordinary run holds the newest back to measure on
    engine.adapt(
        rng.standard_normal(D).astype(np.float32),
        AdaptFeedback.from_quality(0.9).with_target(np.ones(D, np.float32)),
    )
    engine.start_new_task()
    assert spy.held[-1] == [] and engine.background.carry == []
    assert engine.stats().consolidated_count == 51
    assert engine.stats().pending_samples == 0


# ---------------------------------------------------------------------- failures
@pytest.mark.parametrize("strategy", list(CS))
def test_a_sample_whose_gradient_overflows_is_passed_over_and_the_rest_consolidated(
    strategy: CS,
) -> None:
    """Targets near float32's largest value are finite and the Instant loop applies them; in
    a later consolidation a gradient can overflow against the adapter as it has become (here
    with QUALITY_WEIGHTED, which relearns every sample). Such a sample is passed over, with a
    note; the others are learned and every count adds up."""
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(16),
        consolidation_strategy=strategy,
        background_min_samples=2,
    )
    engine = SonaLlm(cfg, seed=1)
    rng = np.random.default_rng(0)
    notes: list[str] = []
    for i in range(4):
        x = rng.standard_normal(16).astype(np.float32)
        y = (3e38 * np.sign(rng.standard_normal(16))).astype(np.float32)
        engine.submit(TrainingSample(x, y, float(rng.uniform())))
        if i % 2:
            notes += engine.run_background().notes
    stats = engine.stats()
    assert stats.instant_count == 4
    assert stats.consolidated_count + stats.pending_samples == 4
    x = rng.standard_normal(16).astype(np.float32)
    for m in cfg.micro_lora.target_modules:
        assert np.isfinite(engine.forward(x, m)).all()
    passed = [n for n in notes if "whose gradient overflows" in n]
    assert len(passed) == (strategy is CS.QUALITY_WEIGHTED), notes
