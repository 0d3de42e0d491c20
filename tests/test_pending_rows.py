"""The input rows the Instant loop keeps for consolidation: they stay aligned with its pending
samples through appends, evictions, hand-overs and restores, a handed-over block is never
written again until it is given back, and a consolidation reading them computes exactly what
it computes from rows gathered one by one."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sona import background, pending_rows
from sona.background import BackgroundLoop
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.feedback import AdaptFeedback
from sona.instant import InstantLoop
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.pending_rows import HandedRows, PendingRows
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample

DIM = 3
_ops = st.lists(
    st.sampled_from(["append", "append", "append", "drop", "take", "give", "reset"]),
    max_size=120,
)


@settings(max_examples=100, deadline=None)
@given(ops=_ops, bound=st.integers(0, 6), blocks_of=st.sampled_from([None, 2, 5, 8]))
@example(ops=["append", "drop", "append", "take"], bound=0, blocks_of=2)  # evictions make room
def test_rows_follow_appends_drops_and_hand_overs(
    ops: list[str], bound: int, blocks_of: int | None
) -> None:
    """``blocks_of``: rows a block may take (the byte limit), None for the default."""
    limit = pending_rows.PREALLOCATE if blocks_of is None else blocks_of * DIM * 4
    with mock.patch.object(pending_rows, "PREALLOCATE", limit):
        rows = PendingRows(DIM, bound)
    room = rows._block.shape[0] - rows._front  # rows a block holds
    want: list[np.ndarray] = []
    complete = True  # every pending sample has its row
    handed: list[tuple[HandedRows, np.ndarray]] = []  # blocks handed over, with their rows
    n = 0
    for op in ops:
        if op == "append":
            x = np.full(DIM, float(n), np.float32) + np.arange(DIM, dtype=np.float32)
            n += 1
            rows.append(x)
            want.append(x)
            complete = complete and len(want) <= room
        elif op == "drop":
            rows.drop_oldest()
            want = want[1:]
        elif op == "take":
            h = rows.take()
            if not complete:
                assert h is None
            else:
                assert h is not None
                got = h.block[h.start : h.start + h.count]
                expect = np.array(want, np.float32).reshape(-1, DIM)
                np.testing.assert_array_equal(got, expect)
                handed.append((h, expect))
            want, complete = [], True
        elif op == "give" and handed:
            rows.give_back(handed.pop(0)[0])
        elif op == "reset":
            want = [np.full(DIM, -float(k), np.float32) for k in range(3)]
            rows.reset(want)
            complete = len(want) <= room
        for h, expect in handed:  # blocks not given back are never written again
            np.testing.assert_array_equal(h.block[h.start : h.start + h.count], expect)


def test_the_held_back_rows_go_just_before_the_handed_ones() -> None:
    rows = PendingRows(DIM, 4)
    for k in range(4):
        rows.append(np.full(DIM, k, np.float32))
    h = rows.take()
    assert h is not None
    carry = [np.full(DIM, 10.0 + k, np.float32) for k in range(2)]
    run = h.with_front(carry)
    assert run is not None
    np.testing.assert_array_equal(run[:, 0], [10, 11, 0, 1, 2, 3])
    assert run.base is h.block  # a view: the handed rows were not copied
    assert h.with_front([np.zeros(DIM, np.float32)] * (h.start + 1)) is None  # no room


def test_a_row_that_is_not_contiguous_is_copied_too() -> None:
    rows = PendingRows(DIM, 2)
    x = np.arange(2 * DIM, dtype=np.float32)[::2]
    rows.append(x)
    h = rows.take()
    assert h is not None
    np.testing.assert_array_equal(h.block[h.start], x)


# ---------------------------------------------------------------------- consolidation
def _config(strategy: ConsolidationStrategy) -> SonaLlmConfig:
    micro = MicroLoraConfig.for_hidden_dim(32, rank=2, target_modules=(TargetModule.Q_PROJ,))
    return SonaLlmConfig(micro_lora=micro, consolidation_strategy=strategy)


def _stream(rng: np.random.Generator, n: int) -> list[TrainingSample]:
    out = []
    for i in range(n):
        s = TrainingSample(rng.standard_normal(32), rng.standard_normal(32), rng.uniform(0.3, 1))
        if i % 7 == 6:  # ratings alone are never held back: the held-back run has gaps
            s = s.with_feedback(AdaptFeedback.from_quality(0.6))
        out.append(s)
    return out


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
def test_consolidating_the_handed_rows_equals_gathering_them(
    strategy: ConsolidationStrategy, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(strategy)
    fast, slow = BackgroundLoop(cfg, seed=3), BackgroundLoop(cfg, seed=3)
    inst = InstantLoop(cfg, seed=3, consolidated=lambda: fast.published)
    gathered = 0
    gather = background._RowBuffer.gather

    def counting(self: background._RowBuffer, samples: list[TrainingSample]) -> np.ndarray:
        nonlocal gathered
        gathered += 1
        return gather(self, samples)

    monkeypatch.setattr(background._RowBuffer, "gather", counting)
    rng = np.random.default_rng(0)
    sid = 0
    for batch in range(3):  # later runs start with the samples the earlier ones held back
        for s in _stream(rng, 90):
            inst.process(sid, s)
            sid += 1
        for _ in range(batch):  # evicted samples leave their rows behind too
            inst.evict_oldest()
        hand = inst.hand_over()
        assert hand.rows is not None and hand.rows.count == len(hand.samples)
        a = fast.consolidate(hand, hold_back=batch < 2)
        assert gathered == 0  # the rows came with the hand-over
        b = slow.consolidate(dataclasses.replace(hand, rows=None), hold_back=batch < 2)
        assert gathered == 1
        gathered = 0
        inst.consolidated(hand)
        assert a.consumed == b.consumed and a.carry == b.carry
        assert a.result.quality_delta == b.result.quality_delta
        pa, pb = a.published, b.published
        assert sorted(pa.ensemble) == sorted(pb.ensemble)
        for x, y in [(pa.base, pb.base)] + [(pa.ensemble[k], pb.ensemble[k]) for k in pa.ensemble]:
            for (m, a1, b1), (_, a2, b2) in zip(x.iter_factors(), y.iter_factors(), strict=True):
                np.testing.assert_array_equal(a1, a2, err_msg=m.value)
                np.testing.assert_array_equal(b1, b2, err_msg=m.value)
    assert fast.bank.centroids.tobytes() == slow.bank.centroids.tobytes()


def test_restored_pending_samples_hand_over_their_rows() -> None:
    cfg = _config(ConsolidationStrategy.EWC_MERGE)
    inst = InstantLoop(cfg, seed=0)
    rng = np.random.default_rng(1)
    inst.process(0, _stream(rng, 1)[0])
    items = list(enumerate(_stream(rng, 5), start=10))
    inst.restore_pending(items)
    inst.evict_oldest()
    hand = inst.hand_over()
    assert hand.rows is not None and hand.samples == items[1:]
    got = hand.rows.block[hand.rows.start : hand.rows.start + hand.rows.count]
    np.testing.assert_array_equal(got, np.stack([s.input_embedding for _, s in items[1:]]))


@pytest.mark.anyio
async def test_the_runtime_reuses_two_blocks_of_rows() -> None:
    cfg = dataclasses.replace(_config(ConsolidationStrategy.EWC_MERGE), background_min_samples=1)
    rng = np.random.default_rng(2)
    async with SonaRuntime(cfg, seed=0) as rt:
        blocks: list[np.ndarray] = []  # held: no block's id can be reused by another
        for _ in range(6):
            for s in _stream(rng, 20):
                await rt.submit(s)
            block = rt._instant.rows._block
            if not any(block is b for b in blocks):
                blocks.append(block)
            await rt.consolidate()
        assert len(blocks) == 2
