"""The Instant loop's copies of its live adapter, which let EWC_MERGE measure a fold on samples
it never learned: each hand-over's copy is the live adapter after exactly the samples before the
held-back ones, copies are reused rather than allocated, and a checkpoint keeps them.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona import checkpoint as ckpt
from sona.background import BackgroundLoop
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.instant import InstantLoop
from sona.live_copies import IN_TRANSIT_EVERY, SNAPSHOT_EVERY
from sona.lora import _UNHELD, MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.objective import held_out_count
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample

D = 24
Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ


def _config(**changes: object) -> SonaLlmConfig:
    micro = MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V))
    return SonaLlmConfig(micro_lora=micro, background_min_samples=1).replace(**changes)


def _loop(**changes: object) -> InstantLoop:
    cfg = _config(**changes)
    bg = BackgroundLoop(cfg, seed=1)
    return InstantLoop(cfg, seed=1, consolidated=lambda: bg.published)


def _factors(lora: MicroLoRA) -> list[np.ndarray]:
    return [arr.copy() for _, a, bt in lora.iter_factors() for arr in (a, bt)]


def _same(lora: MicroLoRA, factors: list[np.ndarray]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(_factors(lora), factors, strict=True))


def _sample(rng: np.random.Generator) -> TrainingSample:
    return TrainingSample(rng.standard_normal(D), rng.standard_normal(D), 0.9)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 900), evicted=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_the_copy_is_the_live_adapter_after_exactly_the_samples_before_the_held_back_ones(
    n: int, evicted: int, seed: int
) -> None:
    inst = _loop()
    rng = np.random.default_rng(seed)
    after = []  # the live adapter's factors after each sample
    for i in range(n):
        assert inst.process(i, _sample(rng)).applied
        after.append(_factors(inst.live))
    evicted = min(evicted, n - 2)
    for _ in range(evicted):
        inst.evict_oldest()
    pending = n - evicted
    want = held_out_count(pending)
    hand = inst.hand_over(want)
    assert [sid for sid, _ in hand.samples] == list(range(evicted, n))
    if hand.before_held is None:  # only when evictions passed every copy that left samples
        assert hand.learned == 0 and evicted > 0
        return
    learned = hand.learned
    assert 1 <= learned < pending
    assert _same(hand.before_held, after[evicted + learned - 1])
    held = pending - learned
    if evicted == 0:  # what Background asks for, up to half a gap between copies off
        assert abs(held - want) <= min(SNAPSHOT_EVERY, max(1, n // 4)) // 2


def test_strategies_that_relearn_from_samples_keep_no_copies() -> None:
    inst = _loop(consolidation_strategy=ConsolidationStrategy.AVERAGE)
    rng = np.random.default_rng(0)
    for i in range(50):
        inst.process(i, _sample(rng))
    assert inst.copies == []
    hand = inst.hand_over(5)
    assert hand.before_held is None and hand.learned == 0


def test_copies_are_reused_once_their_consolidation_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the first cycles, taking copies and handing one over allocates no adapter."""
    inst = _loop()
    rng = np.random.default_rng(1)
    made: list[int] = []
    blank = MicroLoRA._blank

    def counting(config: MicroLoraConfig, seed: int) -> MicroLoRA:
        made.append(seed)
        return blank(config, seed)

    sid = 0
    for cycle in range(8):
        if cycle == 3:
            monkeypatch.setattr(MicroLoRA, "_blank", staticmethod(counting))
        for _ in range(200):
            inst.process(sid, _sample(rng))
            sid += 1
        hand = inst.hand_over(held_out_count(200))
        assert hand.before_held is not None and len(inst.copies) == 0
        del hand  # its consolidation is done with it
    if _UNHELD > 0:  # reference counts tell a free copy
        assert made == []


def test_a_checkpoint_keeps_the_copies_and_an_unfinished_hand_overs_copy(tmp_path: Path) -> None:
    """Restored, a hand-over that was under way is consolidated as it would have been: on the
    same held-back samples, measured on the same copy, to the same quality_delta."""
    cfg = _config(background_interval_ms=3_600_000, max_pending_samples=400)
    path = tmp_path / "c.sona"
    rng = np.random.default_rng(3)
    first = [_sample(rng) for _ in range(60)]
    then = [_sample(rng) for _ in range(25)]

    async def original() -> tuple[float | None, list[int]]:
        async with SonaRuntime(cfg, seed=5) as rt:
            for s in first:
                await rt.submit(s)
            hand = rt._take_hand_over()  # as a consolidation does before its thread runs
            assert hand.before_held is not None
            for s in then:
                await rt.submit(s)
            copies = [at for at, _ in rt._instant.copies]
            ckpt.write(rt._durable.capture_now(), path)
            result = await rt.consolidate()
            assert result is not None
            return result.quality_delta, copies

    delta, copies = anyio.run(original)
    state = ckpt.read(path)
    assert state.unfinished is not None and state.unfinished.before_held is not None
    assert [at for at, _ in state.copies] == copies != []

    async def restored() -> float | None:
        rt = SonaRuntime.restore(path)
        async with rt:
            assert [at for at, _ in rt._instant.copies] == copies
            result = await rt.consolidate()
            assert result is not None
            return result.quality_delta

    assert delta is not None and anyio.run(restored) == delta


def test_copies_are_sparse_while_a_consolidation_is_under_way_and_catch_up_at_its_commit() -> None:
    """No hand-over comes before a consolidation under way commits: meanwhile copies follow
    every IN_TRANSIT_EVERY samples, and the commit takes one at the next sample, so a hand-over
    soon after it finds a copy about a tenth back."""
    inst = _loop()
    rng = np.random.default_rng(4)
    for i in range(40):
        inst.process(i, _sample(rng))
    inst.set_unfinished(inst.hand_over(4))
    for i in range(40, 240):
        inst.process(i, _sample(rng))
    assert [at for at, _ in inst.copies] == list(range(1, 200, IN_TRANSIT_EVERY))
    inst.set_unfinished(None)
    after = []
    for i in range(240, 262):
        inst.process(i, _sample(rng))
        after.append(_factors(inst.live))
    assert [at for at, _ in inst.copies][-2:] == [193, 201]  # caught up at the next sample
    want = held_out_count(222)
    hand = inst.hand_over(want)
    assert hand.before_held is not None and hand.learned == 201
    assert _same(hand.before_held, after[0])
