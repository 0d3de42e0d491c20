"""A consolidation that raises in the synchronous engine: its hand-over is kept, still part of
what ``forward`` serves and of the pending count, and the next consolidation finishes it before
anything newer, reading its inputs once; a second failure gives it up, counted; an interruption
is not a failure."""

from __future__ import annotations

import pytest
from runtime_helpers import FailsOnce
from scripted import Script, apply_engine, config, learning, outputs, same_outputs
from sona.actors import OverflowPolicy

from sona.config import ConsolidationStrategy
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback


def _engine(strategy: ConsolidationStrategy = ConsolidationStrategy.EWC_MERGE) -> SonaLlm:
    return SonaLlm(config(strategy), seed=5, clock=lambda: 0.0)


def _played(n: int, seed: int = 5) -> tuple[SonaLlm, Script]:
    engine, script = _engine(), Script(seed).domain(seed)
    apply_engine(engine, script, ("play", n))
    return engine, script


def _twins(
    strategy: ConsolidationStrategy, n: int
) -> tuple[list[tuple[SonaLlm, Script]], FailsOnce]:
    """Two engines given the same ``n`` calls; the second one's next consolidation raises once
    it has read its inputs and folded (the stand-in returned)."""
    pairs = [(_engine(strategy), Script(5).domain(5)) for _ in range(2)]
    for engine, script in pairs:
        apply_engine(engine, script, ("play", n))
    bg = pairs[1][0].background
    fold = bg._fold = FailsOnce(bg._fold, RuntimeError("failed after folding"), after=True)  # type: ignore[method-assign]
    return pairs, fold


def test_a_failed_consolidation_is_kept_and_finished_first_by_the_next_one() -> None:
    """Nothing is lost: right after the error, forward serves what it served before and the
    samples still count as pending; samples learned meanwhile are learned on top of the kept
    hand-over, and the next run consolidates exactly the kept samples, the newer ones after."""
    engine, script = _played(30)
    before = outputs(engine)
    bg = engine.background
    bg._fold = FailsOnce(bg._fold, MemoryError("no memory"), after=True)  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        engine.run_background()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(outputs(engine), before, strict=True))
    st = engine.stats()
    assert (st.pending_samples, st.consolidated_count, st.background_count) == (30, 0, 0)
    assert not engine.instant.pending  # they are the kept hand-over's
    apply_engine(engine, script, ("play", 6))
    assert engine.stats().pending_samples == 36
    first = engine.run_background()
    assert first.samples_used + bg.held_back == 30  # the kept hand-over alone
    assert len(engine.instant.pending) == 6
    engine.run_background()
    st = engine.stats()
    assert st.consolidated_count + st.pending_samples == st.instant_count == 36
    assert st.evicted_samples == 0


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
def test_a_consolidation_that_failed_half_way_is_retried_as_if_it_never_ran(
    strategy: ConsolidationStrategy,
) -> None:
    """It failed after its inputs were read into the pattern bank, the importance and the
    shift detector, and after folding: retried at once, it learns what a consolidation that
    never failed learns, and later shifts of the input domain are detected alike."""
    pairs, fold = _twins(strategy, 20)
    (a, _), (b, _) = pairs
    with pytest.raises(RuntimeError, match="after folding"):
        b.run_background()
    reported = [apply_engine(engine, script, ("consolidate", 0)) for engine, script in pairs]
    assert fold.calls == 2 and reported[0] == reported[1]
    for domain in (6, 7):
        for _, script in pairs:
            script.domain(domain)
        for op in (("play", 40), ("consolidate", 0)) * 2:
            reported = [apply_engine(engine, script, op) for engine, script in pairs]
            assert reported[0] == reported[1], (domain, op)
    assert same_outputs(a, b)
    assert learning(a.stats()) == learning(b.stats())
    assert a.stats().task_count > 0  # the shifts were detected


def test_a_consolidation_that_fails_again_is_given_up_on_and_counted() -> None:
    """The same samples would fail again, and under BLOCK every submit with them: they stay
    applied, are counted as evicted, drop out of forward with the kept adapter, and the next
    consolidation takes the newer samples."""
    engine, script = _played(30)
    nothing = SonaLlm(config(), seed=5)  # nothing learned, nothing published
    assert not same_outputs(engine, nothing)
    bg = engine.background
    bg.prepare = FailsOnce(bg.prepare, RuntimeError("cannot consolidate"), times=2)  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="cannot consolidate"):
            engine.run_background()
    st = engine.stats()
    assert (st.evicted_samples, st.pending_samples, st.consolidated_count) == (30, 0, 0)
    assert engine.instant.in_transit is None
    assert same_outputs(engine, nothing)  # the live adapter restarted, nothing published
    apply_engine(engine, script, ("play", 10))
    result = engine.run_background()
    assert result.samples_used + bg.held_back == 10
    st = engine.stats()
    assert st.instant_count == 40 == st.consolidated_count + st.pending_samples + st.evicted_samples


def test_an_interrupted_consolidation_is_no_failure() -> None:
    """KeyboardInterrupt twice does not give the hand-over up: a host that stops a slow call
    and goes on loses nothing."""
    engine, _ = _played(30)
    bg = engine.background
    bg.prepare = FailsOnce(bg.prepare, KeyboardInterrupt(), times=3)  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            engine.run_background()
    result = engine.run_background()
    assert result.samples_used + bg.held_back == 30
    assert engine.stats().evicted_samples == 0


def test_drop_oldest_keeps_the_bound_when_a_failed_consolidation_holds_every_sample() -> None:
    """The kept hand-over's samples cannot be evicted: the incoming sample is dropped instead,
    counted and said, as the runtime does."""
    cfg = config(overflow=OverflowPolicy.DROP_OLDEST).replace(max_pending_samples=20)
    engine = SonaLlm(cfg, seed=5, clock=lambda: 0.0)
    script = Script(5).domain(5)
    apply_engine(engine, script, ("play", 20))
    bg = engine.background
    bg.prepare = FailsOnce(bg.prepare, RuntimeError("cannot consolidate"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        engine.run_background()
    x = script.x()
    res = engine.adapt(x, AdaptFeedback.from_quality(0.9).with_target(x))
    assert not res.applied and "consolidation that failed" in res.notes[0]
    st = engine.stats()
    assert (st.pending_samples, st.dropped_samples, st.submitted_count) == (20, 1, 21)


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
def test_a_new_task_after_a_failed_consolidation_finishes_it_first(
    strategy: ConsolidationStrategy,
) -> None:
    """start_new_task() after a consolidation raised: the kept hand-over is consolidated as it
    was asked (holding samples back), then the rest closes the task, as after a consolidation
    that never failed; consolidated with the task's closing run instead, its inputs would be
    tracked a second time."""
    pairs, _ = _twins(strategy, 30)
    (a, _), (b, _) = pairs
    with pytest.raises(RuntimeError, match="after folding"):
        b.run_background()
    a.run_background()
    for engine, script in pairs:
        engine.start_new_task()
        apply_engine(engine, script.domain(6), ("play", 30))
        apply_engine(engine, script, ("consolidate", 0))
    assert same_outputs(a, b)
    assert learning(a.stats()) == learning(b.stats())


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
def test_a_failed_consolidation_closing_a_task_is_retried_closing_it(
    strategy: ConsolidationStrategy,
) -> None:
    """start_new_task() raised in its consolidation: a later run_background() finishes that
    one as it was asked, holding nothing back, and start_new_task() again then only begins the
    new task, as if it had not failed."""
    pairs, _ = _twins(strategy, 30)
    (a, _), (b, _) = pairs
    with pytest.raises(RuntimeError, match="after folding"):
        b.start_new_task()
    a.start_new_task()
    b.run_background()
    b.start_new_task()
    for engine, script in pairs:
        apply_engine(engine, script.domain(6), ("play", 30))
        apply_engine(engine, script, ("consolidate", 0))
    assert same_outputs(a, b)
    assert learning(a.stats()) == learning(b.stats())
