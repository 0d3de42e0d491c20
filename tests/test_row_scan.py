"""The consolidation's one-kernel row scan: the gathered rows, the detector's projections and
the bank's labels it produces are those of the passes it replaces, bit for bit, and a
consolidation that uses them publishes exactly what one that does not would."""

from __future__ import annotations

import copy
import threading
from typing import Any, ClassVar

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import rated_samples, small_config
from sona.kernels import batch as k_batch

from sona import worker_threads
from sona.background import BackgroundLoop
from sona.boundary import ShiftDetector
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.instant import InstantLoop
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.pattern_bank import PatternBank
from sona.row_scan import Labelled, Projected, scan_rows
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.training import TrainingPipeline
from sona.training_config import TrainingConfig
from sona.worker_threads import LoopThread

F32 = np.float32


def _rows(rng: np.random.Generator, n: int, d: int, zeros: int) -> list[np.ndarray]:
    """Rows in separate read-only arrays, as samples hold them, some of them all zero."""
    xs = rng.standard_normal((n, d)).astype(F32) * rng.uniform(0.1, 10.0, (n, 1)).astype(F32)
    xs[rng.choice(n, size=min(zeros, n), replace=False)] = 0.0
    return [np.frombuffer(x.tobytes(), F32) for x in xs]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(0, 70),
    d=st.sampled_from([1, 3, 17, 64]),
    m=st.integers(0, 9),
    k=st.integers(0, 9),
    unscanned=st.integers(0, 20),
    zeros=st.integers(0, 4),
    kept_from=st.integers(0, 80),
)
def test_scan_rows_gives_what_the_passes_it_replaces_give(
    seed: int, n: int, d: int, m: int, k: int, unscanned: int, zeros: int, kept_from: int
) -> None:
    """Whichever rows it is asked to write out (those from ``kept_from`` on), every row is
    read for the passes alike."""
    rng = np.random.default_rng(seed)
    rows = _rows(rng, n, d, zeros)
    stacked = np.stack(rows) if n else np.empty((0, d), F32)
    scanned = max(0, n - unscanned)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0][:, : min(m, d)].T.astype(F32).copy()
    centroids = rng.standard_normal((k, d)).astype(F32)
    out = np.full((n, d), np.nan, F32)
    projected, labelled = scan_rows(rows, out, scanned, basis, centroids, kept_from)
    np.testing.assert_array_equal(out[kept_from:], stacked[kept_from:])
    assert projected is not None and labelled is not None
    assert projected.basis is basis and labelled.centroids is centroids
    xs = stacked[:scanned]
    # the detector: the same CUSUM steps, with the same state after them, bit for bit
    params = np.array([5.0, 0.5, 2.0, 8.0, 0.02])
    ref_e = np.sort(rng.standard_normal(3))
    ref_m = np.zeros(3)
    states = []
    for run in (
        lambda sf, si: k_batch.residual_cusum(xs, basis, sf, si, params, ref_e, ref_m),
        lambda sf, si: k_batch.projected_cusum(
            projected.proj, projected.energy, projected.moment, sf, si, params, ref_e, ref_m
        ),
    ):
        sf = np.zeros(6)
        si = np.array([k_batch.CALIBRATING, 0, 0, 0, 0, 0], np.int64)
        states.append((int(run(sf, si)), sf.tobytes(), si.tobytes()))
    assert states[0] == states[1]
    # ... and the projections and fingerprints are what they say
    x64 = xs.astype(np.float64)
    np.testing.assert_allclose(
        projected.proj, x64 @ basis.T.astype(np.float64), rtol=1e-4, atol=1e-4 * (1 + d)
    )
    np.testing.assert_allclose(projected.energy, (x64 * x64).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(projected.moment, x64 @ np.arange(1.0, d + 1), rtol=1e-9, atol=1e-9)
    # the bank: the labels, sums and member counts of `nearest`, bit for bit
    if k:
        labels = np.empty(scanned, np.intp)
        sums = np.empty((k, d), F32)
        members = np.empty(k, np.int64)
        k_batch.nearest(xs, centroids, labels, sums, members, True, True)
        np.testing.assert_array_equal(labelled.labels, labels)
        np.testing.assert_array_equal(labelled.sums, sums)
        np.testing.assert_array_equal(labelled.members, members)
        dist = ((x64[:, None, :] - centroids.astype(np.float64)[None]) ** 2).sum(axis=2)
        order = np.sort(dist, axis=1)
        clear = order[:, 1] - order[:, 0] > 1e-3 * (1 + order[:, 0]) if k > 1 else slice(None)
        np.testing.assert_array_equal(labelled.labels[clear], dist.argmin(axis=1)[clear])
        assert members.sum() == sum(1 for x in xs if x.any())


def test_strided_rows_are_copied_and_left_to_the_passes() -> None:
    rng = np.random.default_rng(0)
    rows = _rows(rng, 5, 8, 0)
    rows[2] = np.ascontiguousarray(rng.standard_normal((8, 2)).astype(F32))[:, 0]  # strided
    out = np.empty((5, 8), F32)
    basis = np.eye(8, dtype=F32)[:2].copy()
    assert scan_rows(rows, out, 5, basis, np.ones((2, 8), F32)) == (None, None)
    np.testing.assert_array_equal(out, np.stack(rows))
    assert scan_rows(rows[:2], out[:2], 2, None, None) == (None, None)


def test_the_detector_uses_projections_only_on_its_current_basis() -> None:
    rng = np.random.default_rng(1)
    det = ShiftDetector(16, reference_samples=20, max_directions=4, calibration_samples=10)
    assert det.scan_basis() is None  # collecting its reference: rows are copied, not projected
    det.update_many(rng.standard_normal((20, 16)).astype(F32))
    basis = det.scan_basis()
    assert basis is not None
    xs = rng.standard_normal((30, 16)).astype(F32)
    out = np.empty_like(xs)
    projected, _ = scan_rows(list(xs), out, 30, basis, None)
    assert projected is not None
    plain = copy.deepcopy(det)
    calls = []
    real = k_batch.projected_cusum

    def spy(*a: Any) -> int:
        calls.append(1)
        return int(real(*a))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(k_batch, "projected_cusum", spy)
        assert det.update_many(xs, projected) == plain.update_many(xs)
        assert calls == [1]
        assert vars(det).keys() == vars(plain).keys()
        for key, value in vars(plain).items():
            np.testing.assert_array_equal(getattr(det, key), value, err_msg=key)
        # another basis (a restarted detector) or other rows: projected, the detector's own way
        stale = Projected(basis.copy(), projected.proj, projected.energy, projected.moment)
        det.update_many(xs, stale)
        det.update_many(xs[:5], projected)
        assert calls == [1]


def test_the_bank_uses_labels_only_once_full_and_unchanged() -> None:
    rng = np.random.default_rng(2)
    bank = PatternBank(3, 8)
    assert bank.scan_centroids() is None  # slots still filling
    bank.update(rng.standard_normal((3, 8)).astype(F32))
    centroids = bank.scan_centroids()
    assert centroids is bank.centroids
    xs = rng.standard_normal((12, 8)).astype(F32)
    _, labelled = scan_rows(list(xs), np.empty_like(xs), 12, None, centroids)
    assert labelled is not None
    plain = copy.deepcopy(bank)
    np.testing.assert_array_equal(bank.update(xs, labelled), plain.update(xs))
    np.testing.assert_array_equal(bank.centroids, plain.centroids)
    np.testing.assert_array_equal(bank.counts, plain.counts)
    # labels taken against centroids that have moved since, or for other rows, are not used
    moved = Labelled(bank.centroids.copy(), labelled.labels, labelled.sums, labelled.members)
    np.testing.assert_array_equal(bank.update(xs, moved), plain.update(xs))
    np.testing.assert_array_equal(bank.centroids, plain.centroids)
    np.testing.assert_array_equal(bank.update(xs[:5], labelled), plain.update(xs[:5]))
    np.testing.assert_array_equal(bank.centroids, plain.centroids)


def _config(strategy: ConsolidationStrategy) -> SonaLlmConfig:
    micro = MicroLoraConfig.for_hidden_dim(32, rank=2, target_modules=(TargetModule.Q_PROJ,))
    return SonaLlmConfig(
        micro_lora=micro,
        consolidation_strategy=strategy,
        pattern_clusters=4,
        background_min_samples=1,
        training=TrainingConfig(fisher_samples=24, ewc_rank=4),
    )


def _domain_stream(seed: int, n: int) -> list[TrainingSample]:
    """Two domains in turn, on separate subspaces: the detector fires where they switch."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((32, 8)))[0]
    out = []
    for i in range(n):
        dom = (i * 2) // n
        x = q[:, 4 * dom : 4 * dom + 4] @ rng.standard_normal(4) + 0.05 * rng.standard_normal(32)
        x /= np.linalg.norm(x)
        out.append(TrainingSample(x, 0.3 * np.roll(x, dom + 1), float(rng.uniform(0.6, 1.0))))
    return out


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 1000),
    batches=st.lists(st.integers(15, 90), min_size=4, max_size=9),
    strategy=st.sampled_from([ConsolidationStrategy.EWC_MERGE, ConsolidationStrategy.ENSEMBLE]),
)
def test_a_consolidation_with_the_scan_publishes_what_one_without_does(
    seed: int, batches: list[int], strategy: ConsolidationStrategy
) -> None:
    _with_and_without_scan(seed, batches, strategy)


def test_rows_left_unwritten_are_written_where_a_shift_reads_them() -> None:
    """Under EWC_MERGE the scan also leaves the rows nothing reads unwritten (all but the
    importance window's and the held-back ones). Where a shift is detected in a batch, the
    window and the detector read them after all: they are written first, and the run
    publishes what one that wrote every row publishes."""
    unwritten, completed = _with_and_without_scan(
        3, [40, 40, 40, 80, 60], ConsolidationStrategy.EWC_MERGE
    )
    assert sum(1 for u in unwritten if u) >= 2  # rows were left unwritten in several runs
    assert completed == [True]  # ... and written for the one batch with a shift


@pytest.mark.parametrize("validated", [True, False])
def test_tracking_writes_unwritten_rows_before_it_reads_them(validated: bool) -> None:
    """Unchecked rows are all read by the check; checked ones, with no usable projections,
    by the detector: either way ``complete`` runs first."""
    rng = np.random.default_rng(4)
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(16, rank=2), seed=0)
    pipe = TrainingPipeline(TrainingConfig(fisher_samples=8))
    xs = rng.standard_normal((30, 16)).astype(F32)
    rows = xs.copy()
    rows[:22] = np.nan  # not written yet
    calls: list[int] = []

    def complete() -> None:
        calls.append(1)
        rows[:22] = xs[:22]

    fired = pipe.track_many(lora, rows, validated=validated, complete=complete)
    plain = TrainingPipeline(TrainingConfig(fisher_samples=8))
    assert calls == [1] and fired == plain.track_many(lora, xs)
    _same_state(pipe.state_dict(), plain.state_dict())


def _same_state(
    a: tuple[dict[str, Any], dict[str, Any]], b: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    for key in a[1]:
        np.testing.assert_array_equal(a[1][key], b[1][key], err_msg=key)


def _with_and_without_scan(
    seed: int, batches: list[int], strategy: ConsolidationStrategy
) -> tuple[list[int], list[bool]]:
    """Consolidations of the same stream by a loop that takes the scan's results and one that
    does not publish the same, bit for bit; returns, for the first, how many rows each scan
    left unwritten and, for each call that wrote them after all, whether any were left."""
    cfg = _config(strategy)
    samples = _domain_stream(seed, sum(batches))
    runs = []
    unwritten: list[int] = []
    completed: list[bool] = []
    for use_scan in (True, False):
        bg = BackgroundLoop(cfg, seed=seed)
        if use_scan:
            rows, real_scan, real_complete = bg._rows, bg._rows.scan, bg._rows.complete

            def scan(*a: Any, scan: Any = real_scan, rows: Any = rows) -> Any:
                out = scan(*a)
                unwritten.append(0 if rows._unwritten is None else len(rows._unwritten[0]))
                return out

            def complete(complete: Any = real_complete, rows: Any = rows) -> None:
                if rows._unwritten is not None:
                    completed.append(True)
                complete()

            bg._rows.scan = scan  # type: ignore[method-assign]
            bg._rows.complete = complete  # type: ignore[method-assign]
        else:
            bg.pipeline.scan_basis = lambda: None  # type: ignore[method-assign]
            bg.bank.scan_centroids = lambda: None  # type: ignore[method-assign]
        inst = InstantLoop(cfg, seed=seed, consolidated=lambda bg=bg: bg.published)  # type: ignore[misc]
        scanned = 0
        results = []
        pos = 0
        for size in batches:
            for i in range(pos, pos + size):
                inst.process(i, samples[i])
            pos += size
            scanned += bg.pipeline.scan_basis() is not None and bg.bank.scan_centroids() is not None
            res = bg.consolidate(inst.hand_over()).result
            results.append((res.samples_used, res.quality_delta, res.task_boundary, res.notes))
        runs.append((bg, results, scanned))
    (fast, fast_results, scanned), (plain, plain_results, _) = runs
    assert scanned >= 1  # the scan's results were used at least once
    assert fast_results == plain_results
    for a, b in ((fast.base, plain.base), *zip_ensembles(fast, plain)):
        for (_, fa, fb), (_, pa, pb) in zip(a.iter_factors(), b.iter_factors(), strict=True):
            np.testing.assert_array_equal(fa, pa)
            np.testing.assert_array_equal(fb, pb)
    np.testing.assert_array_equal(fast.bank.centroids, plain.bank.centroids)
    np.testing.assert_array_equal(fast.bank.counts, plain.bank.counts)
    _same_pipeline_state(fast, plain)
    if strategy is not ConsolidationStrategy.EWC_MERGE:
        assert not any(unwritten)  # other strategies re-learn from every row
    return unwritten, completed


def zip_ensembles(a: BackgroundLoop, b: BackgroundLoop) -> list[tuple[Any, Any]]:
    ea, eb = a.published.ensemble, b.published.ensemble
    assert ea.keys() == eb.keys()
    return [(ea[k], eb[k]) for k in ea]


def _same_pipeline_state(a: BackgroundLoop, b: BackgroundLoop) -> None:
    _same_state(a.pipeline.state_dict(), b.pipeline.state_dict())


# ---------------------------------------------------------------------- the hand-off
class _Started(threading.Event):
    """The hand-off's event, noting every wait on it and whether it was set by then."""

    waits: ClassVar[list[tuple[float | None, bool]]] = []

    def wait(self, timeout: float | None = None) -> bool:
        got = super().wait(timeout)
        self.waits.append((timeout, got))
        return got


@pytest.mark.anyio
async def test_a_hand_off_starts_the_work_before_the_event_loop_moves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(LoopThread, "HAND_OFF_S", 30.0)  # however slow the thread is to wake
    monkeypatch.setattr(worker_threads.threading, "Event", _Started)
    _Started.waits = []
    thread = LoopThread("test-hand-off")
    other_ran = threading.Event()
    seen: list[tuple[bool, int]] = []

    def work(x: int) -> int:
        seen.append((other_ran.is_set(), thread.busy))
        return x + 1

    async def other() -> None:
        other_ran.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(other)  # runs at the event loop's next turn
            assert await thread.run(work, 1, hand_off=True) == 2
        assert seen == [(False, 1)]  # started while the event loop waited for it
        hand_offs = [w for w in _Started.waits if w[0] == LoopThread.HAND_OFF_S]
        assert hand_offs == [(30.0, True)]  # (starting the thread waits on an event too)
        assert thread.busy == 0
        _Started.waits = []
        assert await thread.run(work, 2) == 3  # no hand-off: the event loop does not wait
        assert _Started.waits == [] and thread.busy == 0
    finally:
        thread.close()


@pytest.mark.anyio
async def test_the_runtime_hands_off_unless_a_deep_run_keeps_the_other_core_busy() -> None:
    samples = rated_samples(40)
    async with SonaRuntime(small_config(), seed=0) as rt:
        thread = rt._background_thread
        hand_offs: list[bool] = []
        real = thread.run

        async def spy(fn: Any, *args: Any, hand_off: bool = False) -> Any:
            hand_offs.append(hand_off)
            return await real(fn, *args, hand_off=hand_off)

        thread.run = spy  # type: ignore[method-assign]
        for s in samples[:20]:
            await rt.submit(s)
        await rt.consolidate()
        rt._deep_thread.busy += 1  # as while a Deep run is in its thread
        try:
            for s in samples[20:]:
                await rt.submit(s)
            await rt.consolidate()
        finally:
            rt._deep_thread.busy -= 1
        assert hand_offs == [True, False]
        assert rt.stats().background_count == 2
