"""InstantLoop.hand_over: the live adapter's snapshot and exactly the samples behind it.

The snapshot is made in the previous hand-over's adapter once nothing holds that one any more
(allocating a new adapter each time costs the request path fresh pages); a snapshot still held,
by a consolidation in flight or anyone else, must never change.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from sona.background import BackgroundLoop
from sona.config import SonaLlmConfig
from sona.instant import HandOver, InstantLoop
from sona.lora import _UNHELD, MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.sample import TrainingSample

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ
REUSES = _UNHELD > 0  # CPython up to 3.13 with the GIL


def _loop(modules: tuple[TargetModule, ...] = (Q, V)) -> tuple[InstantLoop, BackgroundLoop]:
    micro = MicroLoraConfig.for_hidden_dim(24, rank=2, target_modules=modules)
    cfg = SonaLlmConfig(micro_lora=micro, background_min_samples=1)
    bg = BackgroundLoop(cfg, seed=1)
    return InstantLoop(cfg, seed=1, consolidated=lambda: bg.published), bg


def _feed(inst: InstantLoop, rng: np.random.Generator, start: int, n: int) -> list[int]:
    for i in range(start, start + n):
        x, y = rng.standard_normal(24), rng.standard_normal(24)
        assert inst.process(i, TrainingSample(x, y, 0.9)).applied
    return list(range(start, start + n))


def _state(lora: MicroLoRA) -> list[np.ndarray]:
    return [arr.copy() for _, a, bt in lora.iter_factors() for arr in (a, bt)]


def _same(lora: MicroLoRA, state: list[np.ndarray]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(_state(lora), state, strict=True))


def _check(hand: HandOver, ids: list[int], live_before: list[np.ndarray], version: int) -> None:
    assert [sid for sid, _ in hand.samples] == ids
    assert _same(hand.live, live_before) and hand.live.version == version
    assert hand.live.pending_updates == 0 and hand.live.last_note is None


def test_each_hand_over_snapshots_the_live_adapter_and_its_samples_exactly() -> None:
    inst, bg = _loop()
    rng = np.random.default_rng(0)
    held: list[HandOver] = []
    snapshots: list[list[np.ndarray]] = []
    start = 0
    for round_ in range(6):
        ids = _feed(inst, rng, start, 7)
        start += 7
        live_before, version = _state(inst.live), inst.live.version
        baseline = inst.live.baseline.state()
        hand = inst.hand_over()
        _check(hand, ids, live_before, version)
        assert hand.live.baseline.state() == baseline
        assert all(not bt.any() for _, _, bt in inst.live.iter_factors())  # live: B = 0
        assert not inst.pending
        for _, a, _ in hand.live.iter_factors():  # no memory shared with the live adapter
            assert not any(np.shares_memory(a, arr) for arr in _state(inst.live))
        if round_ % 2:  # keep every other snapshot: those must never change
            held.append(hand)
            snapshots.append(_state(hand.live))
        bg.consolidate(hand)
        del hand
    for hand, state in zip(held, snapshots, strict=True):
        assert _same(hand.live, state)
    assert len({id(h.live) for h in held}) == len(held)


@pytest.mark.skipif(not REUSES, reason="reused only where refcounts prove it free")
def test_a_released_snapshot_is_reused_and_a_held_one_never_is() -> None:
    inst, bg = _loop()
    rng = np.random.default_rng(1)
    _feed(inst, rng, 0, 5)
    first = inst.hand_over()
    kept = first.live  # held: the next hand-over must not write into it
    kept_state = _state(kept)
    bg.consolidate(first)
    del first
    _feed(inst, rng, 5, 5)
    second = inst.hand_over()
    assert second.live is not kept and _same(kept, kept_state)
    reused = weakref.ref(second.live)  # not a holder: it does not raise the count
    bg.consolidate(second)
    del second
    ids = _feed(inst, rng, 10, 5)
    live_before, version = _state(inst.live), inst.live.version
    third = inst.hand_over()
    assert third.live is reused()  # released: copied into, not allocated
    _check(third, ids, live_before, version)
    assert _same(kept, kept_state)


def test_clone_into_a_mismatched_adapter_allocates_a_new_one() -> None:
    micro = MicroLoraConfig.for_hidden_dim(24, rank=2, target_modules=(Q,))
    lora = MicroLoRA(micro, seed=3)
    other_seed = MicroLoRA(micro, seed=4)
    other_config = MicroLoRA(MicroLoraConfig.for_hidden_dim(24, rank=1), seed=3)
    for spare in (other_seed, other_config):
        before = _state(spare)
        twin = lora.clone(into=spare)
        assert twin is not spare and _same(spare, before) and _same(twin, _state(lora))
    matching = lora.clone()
    matching.last_note = "stale"
    assert lora.clone(into=matching) is matching and matching.last_note is None
