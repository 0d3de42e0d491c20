"""The five consolidation strategies change the consolidated weights and do what they say.

DESIGN.md: "All five must change weights and do what their names say, measured, not asserted."
Each test drives ``SonaLlm`` with target feedback (the objective is defined and the weights are
deterministic given the seed), runs ``run_background()`` and inspects ``forward`` and the
published adapters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from lora_reference import near_float32_max

from sona.config import ConsolidationStrategy as CS
from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.training_config import TrainingConfig

D = 32
Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
N = 30  # samples per run: 3 are held back (newest 10 %), 27 are consolidated
HELD = 3
F32_MAX = float(np.finfo(np.float32).max)


def _config(strategy: CS, **changes: object) -> SonaLlmConfig:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V)),
        training=TrainingConfig(ewc_lambda=0.0),
        consolidation_strategy=strategy,
        background_min_samples=4,
        instant_lr=0.05,
    )
    return cfg.replace(**changes)


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets (a fixed linear map of the inputs) and unequal qualities in [0.55, 1]."""
    rng = np.random.default_rng(seed)
    x = _unit_rows(rng, N)
    w = rng.standard_normal((D, D)).astype(np.float32) / math.sqrt(D)
    q = np.round(rng.uniform(0.55, 1.0, N), 3)
    return x, x @ w.T, q


def _feed(engine: SonaLlm, x: np.ndarray, y: np.ndarray, q: np.ndarray) -> None:
    for xi, yi, qi in zip(x, y, q, strict=True):
        assert engine.adapt(xi, AdaptFeedback.from_quality(float(qi)).with_target(yi)).applied


PROBE = _unit_rows(np.random.default_rng(99), 16)


def _effective(engine: SonaLlm) -> np.ndarray:
    return np.stack([engine.forward(PROBE, m) for m in (Q, V)])


def _consolidated(engine: SonaLlm) -> np.ndarray:
    """What the published state alone adds on the probe inputs (live adapter left out)."""
    pub = engine.background.published
    return np.stack([pub.predict(PROBE, m) for m in (Q, V)])


def _after_one_run(strategy: CS, q: np.ndarray | None = None, **changes: object) -> SonaLlm:
    x, y, q0 = _stream()
    engine = SonaLlm(_config(strategy, **changes), seed=7, clock=lambda: 0.0)
    _feed(engine, x, y, q0 if q is None else q)
    engine.run_background()
    return engine


# ---------------------------------------------------------------------- every strategy
@pytest.mark.parametrize("strategy", list(CS))
def test_run_background_changes_the_consolidated_delta(strategy: CS) -> None:
    x, y, q = _stream()
    engine = SonaLlm(_config(strategy), seed=7, clock=lambda: 0.0)
    assert not _consolidated(engine).any()
    _feed(engine, x, y, q)
    before = _effective(engine)
    assert before.any()  # the live adapter learned
    result = engine.run_background()
    assert result.strategy is strategy
    assert result.samples_used == N - HELD
    consolidated = _consolidated(engine)
    assert np.abs(consolidated).max() > 1e-3
    # the live adapter was handed over and restarted from B = 0
    for m in (Q, V):
        assert not engine.instant.live.forward(PROBE, m).any()
    np.testing.assert_array_equal(_effective(engine), consolidated)
    # the consolidated delta points where the targets do (it learned, not just moved)
    targets = PROBE @ (np.linalg.lstsq(x, y, rcond=None)[0])
    for k in range(2):
        assert float(np.sum(consolidated[k] * targets)) > 0.0


def test_the_strategies_give_pairwise_different_results_on_unequal_qualities() -> None:
    results = {s: _consolidated(_after_one_run(s)) for s in CS}
    for i, a in enumerate(CS):
        for b in list(CS)[i + 1 :]:
            gap = np.abs(results[a] - results[b]).max()
            assert gap > 1e-4, f"{a.name} and {b.name} consolidated to the same delta"


def test_consolidation_is_deterministic_given_seed_and_inputs() -> None:
    for s in CS:
        np.testing.assert_array_equal(
            _consolidated(_after_one_run(s)), _consolidated(_after_one_run(s))
        )


# ---------------------------------------------------------------------- QUALITY_WEIGHTED
def test_quality_weighted_equals_average_on_equal_qualities() -> None:
    q = np.full(N, 0.8)
    avg = _consolidated(_after_one_run(CS.AVERAGE, q))
    qw = _consolidated(_after_one_run(CS.QUALITY_WEIGHTED, q))
    assert np.abs(avg).max() > 1e-3
    np.testing.assert_allclose(qw, avg, rtol=1e-5, atol=1e-7)


def test_quality_weighted_differs_from_average_on_unequal_qualities_and_favours_good_ones() -> None:
    x, y, _ = _stream()
    # two halves with opposite targets: the better-rated half must win under QUALITY_WEIGHTED
    q = np.where(np.arange(N) % 2 == 0, 1.0, 0.55)
    y_conflict = np.where((np.arange(N) % 2 == 0)[:, None], y, -y)
    out = {}
    for s in (CS.AVERAGE, CS.QUALITY_WEIGHTED):
        engine = SonaLlm(_config(s), seed=7, clock=lambda: 0.0)
        _feed(engine, x, y_conflict, q)
        engine.run_background()
        pub = engine.background.published
        good = np.arange(N - HELD) % 2 == 0
        pred = pub.predict(x[: N - HELD][good], Q)
        out[s] = float(np.sum(pred * y[: N - HELD][good]))
    assert out[CS.QUALITY_WEIGHTED] > out[CS.AVERAGE] + 1e-4


# ---------------------------------------------------------------------- BEST_ONLY
def _best_only_setup() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], list[int]]:
    """Qualities with a clear top 20 % among the consolidated (non-held-back) samples."""
    x, y, _ = _stream(seed=3)
    train = N - HELD
    k = math.ceil(0.2 * train)
    rng = np.random.default_rng(4)
    top = sorted(rng.choice(train, k, replace=False).tolist())
    q = np.round(rng.uniform(0.55, 0.8, N), 3)
    q[top] = np.linspace(0.9, 1.0, k)
    bottom = [i for i in range(train) if i not in top]
    return x, y, q, top, bottom


def _best_only(x: np.ndarray, y: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, list[str]]:
    engine = SonaLlm(_config(CS.BEST_ONLY), seed=7, clock=lambda: 0.0)
    _feed(engine, x, y, q)
    result = engine.run_background()
    return _effective(engine), result.notes


def test_best_only_ignores_the_bottom_80_percent() -> None:
    x, y, q, top, bottom = _best_only_setup()
    reference, notes = _best_only(x, y, q)
    assert np.abs(reference).max() > 1e-3
    assert any(f"top {len(top)} of {N - HELD}" in n for n in notes), notes
    rng = np.random.default_rng(8)
    y2, q2 = y.copy(), q.copy()
    y2[bottom] = rng.standard_normal((len(bottom), D)).astype(np.float32)  # other targets
    q2[bottom] = np.round(rng.uniform(0.5, 0.85, len(bottom)), 3)  # other ratings, still lower
    changed_bottom, _ = _best_only(x, y2, q2)
    np.testing.assert_array_equal(changed_bottom, reference)


def test_best_only_follows_a_change_to_a_top_sample() -> None:
    x, y, q, top, _ = _best_only_setup()
    reference, _ = _best_only(x, y, q)
    y2 = y.copy()
    y2[top[0]] = -y[top[0]]
    changed_top, _ = _best_only(x, y2, q)
    assert np.abs(changed_top - reference).max() > 1e-4


def test_best_only_promotes_a_sample_whose_rating_rises_into_the_top() -> None:
    x, y, q, _top, bottom = _best_only_setup()
    reference, _ = _best_only(x, y, q)
    q2 = q.copy()
    q2[bottom[0]] = 1.0  # now in the top 20 %, pushing the weakest top sample out
    promoted, _ = _best_only(x, y, q2)
    assert np.abs(promoted - reference).max() > 1e-4


# ---------------------------------------------------------------------- ENSEMBLE
def _two_clusters(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    centre = rng.standard_normal(D)
    other = -centre + 0.5 * rng.standard_normal(D)
    a = centre + 0.1 * rng.standard_normal((n, D))
    b = other + 0.1 * rng.standard_normal((n, D))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("order", ["interleaved", "blocks"])
def test_ensemble_routes_two_separated_clusters_to_two_adapters_each_trained(order: str) -> None:
    rng = np.random.default_rng(21)
    a, b = _two_clusters(rng, 20)
    t = rng.standard_normal(D).astype(np.float32)
    t /= np.linalg.norm(t)
    if order == "interleaved":
        xs = np.stack([v for pair in zip(a, b, strict=True) for v in pair])
        ys = np.stack([t, -t] * 20)
    else:
        xs = np.concatenate([a, b])
        ys = np.stack([t] * 20 + [-t] * 20)
    engine = SonaLlm(_config(CS.ENSEMBLE, pattern_clusters=2), seed=7, clock=lambda: 0.0)
    _feed(engine, xs, ys, np.full(40, 0.9))
    engine.run_background()
    pub = engine.background.published
    la, lb = pub.route(a), pub.route(b)
    assert len(set(la.tolist())) == 1 and len(set(lb.tolist())) == 1
    assert la[0] != lb[0]
    assert set(pub.ensemble) == {int(la[0]), int(lb[0])}
    for label in (la[0], lb[0]):
        assert np.abs(pub.ensemble[int(label)].delta_weight(Q)).max() > 1e-4
    # forward serves each cluster from its own adapter (the shared base stays zero) ...
    np.testing.assert_allclose(
        engine.forward(a, Q), pub.ensemble[int(la[0])].forward(a, Q), atol=1e-6
    )
    np.testing.assert_allclose(
        engine.forward(b, Q), pub.ensemble[int(lb[0])].forward(b, Q), atol=1e-6
    )
    # ... which learned that cluster's target, not the other one's
    assert float(np.mean(engine.forward(a, Q) @ t)) > 0.0
    assert float(np.mean(engine.forward(b, Q) @ t)) < 0.0


def _ensemble_after_one_run(seed: int) -> tuple[SonaLlm, np.ndarray, np.ndarray, np.ndarray]:
    """ENSEMBLE with two clusters, consolidated once over the first 10 inputs of each; the
    two clusters' inputs and the target they were taught are returned for later feeds."""
    a, b = _two_clusters(np.random.default_rng(seed), 30)
    t = np.ones(D, np.float32) / math.sqrt(D)
    engine = SonaLlm(_config(CS.ENSEMBLE, pattern_clusters=2), seed=7, clock=lambda: 0.0)
    first = np.stack([v for pair in zip(a[:10], b[:10], strict=True) for v in pair])
    _feed(engine, first, np.stack([t] * 20), np.full(20, 0.9))
    engine.run_background()
    return engine, a, b, t


def test_ensemble_keeps_training_the_adapter_of_the_cluster_that_gets_new_samples() -> None:
    engine, a, b, t = _ensemble_after_one_run(22)
    pub = engine.background.published
    la, lb = int(pub.route(a[:1])[0]), int(pub.route(b[:1])[0])
    wa, wb = pub.ensemble[la].delta_weight(Q), pub.ensemble[lb].delta_weight(Q)
    _feed(engine, a[10:], np.stack([t] * 20), np.full(20, 0.9))  # only cluster A now
    engine.run_background()
    pub = engine.background.published
    assert np.abs(pub.ensemble[la].delta_weight(Q) - wa).max() > 1e-5
    # B's adapter is only touched by B's held-back sample carried over from the first run
    assert (
        np.abs(pub.ensemble[lb].delta_weight(Q) - wb).max()
        < np.abs(pub.ensemble[la].delta_weight(Q) - wa).max()
    )


def test_ensemble_forward_adds_the_nearest_clusters_adapter_to_the_rest() -> None:
    """The effective delta under ENSEMBLE is the live adapter's plus the consolidated base's
    plus the adapter of each input's nearest centroid: the cluster's adapter adds to the
    others, it does not replace them."""
    engine, a, b, t = _ensemble_after_one_run(23)
    _feed(engine, a[10:14], np.stack([-t] * 4), np.full(4, 0.9))  # the live adapter moves
    live = engine.instant.live
    pub = engine.background.published
    assert pub.centroids is not None and len(pub.ensemble) == 2
    x = np.concatenate([a[20:], b[20:]])
    nearest = np.argmin(((x[:, None, :] - pub.centroids[None, :, :]) ** 2).sum(axis=2), axis=1)
    expected = live.forward(x, Q) + pub.base.forward(x, Q)
    for row, label in enumerate(nearest):
        expected[row] += pub.ensemble[int(label)].forward(x[row], Q)
    assert np.abs(live.forward(x, Q)).max() > 1e-4
    np.testing.assert_allclose(engine.forward(x, Q), expected, rtol=1e-5, atol=1e-6)
    for row in (0, len(x) - 1):  # one input at a time, too
        np.testing.assert_allclose(engine.forward(x[row], Q), expected[row], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- EWC_MERGE
def test_ewc_merge_folds_the_live_adapter_without_changing_the_effective_delta() -> None:
    x, y, q = _stream()
    engine = SonaLlm(_config(CS.EWC_MERGE, consolidated_rank=8), seed=7, clock=lambda: 0.0)
    rng = np.random.default_rng(5)
    for round_ in range(4):  # ranks allow: 4 folds of rank 2 into the rank-8 adapter
        perm = rng.permutation(N)
        _feed(engine, x[perm], (1 + round_) * y[perm], q[perm])
        before = _effective(engine)
        live_w = engine.instant.live.delta_weight(Q)
        base_w = engine.background.published.base.delta_weight(Q)
        assert np.abs(live_w).max() > 1e-4
        engine.run_background()
        after = _effective(engine)
        np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())
        np.testing.assert_allclose(
            engine.background.published.base.delta_weight(Q),
            base_w + live_w,
            atol=1e-5 * np.abs(base_w + live_w).max(),
        )
        assert not engine.instant.live.delta_weight(Q).any()
        assert not engine.instant.live.forward(PROBE, Q).any()


def test_ewc_merge_pulls_back_with_the_strength_of_every_sample_it_folds_in() -> None:
    """The fold stands for one Instant step per consolidated sample, so its EWC++ proximal
    step has the strength of all of them, 2·lr·n·λ: equal to the fold followed by the
    pipeline's own proximal step at that strength."""
    lam = 0.5
    x, y, q = _stream()
    cfg = _config(CS.EWC_MERGE, consolidated_rank=8, training=TrainingConfig(ewc_lambda=lam))
    engine = SonaLlm(cfg, seed=7, clock=lambda: 0.0)
    _feed(engine, x, y, q)
    engine.start_new_task()  # task 1 consolidated and protected
    _feed(engine, x, -y, q)  # task 2 pulls the same inputs the other way
    bg = engine.background
    folded = MicroLoRA.merge_adapters(
        [(bg.published.base, 1.0), (engine.instant.live, 1.0)], rank=8
    )
    result = engine.run_background()
    assert not result.task_boundary
    assert result.samples_used == N - HELD
    assert bg.pipeline.prox_step(folded, 2.0 * cfg.instant_lr * (N - HELD) * lam) > 0.0
    for m in (Q, V):
        got, want = bg.published.base.delta_weight(m), folded.delta_weight(m)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_ewc_merge_beyond_the_consolidated_rank_is_the_best_truncation() -> None:
    """Rank 2 live into rank 2 consolidated: the fold is the best rank-2 approximation of the
    exact sum, so its error is the truncated singular values' norm (Eckart-Young), no more."""
    x, _y, q = _stream()
    engine = SonaLlm(_config(CS.EWC_MERGE, consolidated_rank=2), seed=7, clock=lambda: 0.0)
    rng = np.random.default_rng(6)
    checked = 0
    for _ in range(3):
        perm = rng.permutation(N)
        w = rng.standard_normal((D, D)).astype(np.float32) / math.sqrt(D)
        _feed(engine, x[perm], x[perm] @ w.T, q[perm])  # a new map: new directions each round
        exact = engine.background.published.base.delta_weight(Q).astype(
            np.float64
        ) + engine.instant.live.delta_weight(Q)
        engine.run_background()
        folded = engine.background.published.base.delta_weight(Q)
        s = np.linalg.svd(exact, compute_uv=False)
        tail = float(np.sqrt(np.sum(s[2:] ** 2)))
        err = float(np.linalg.norm(folded - exact))
        assert err <= tail * (1 + 1e-3) + 1e-6
        assert err >= tail * (1 - 1e-3) - 1e-6
        checked += tail > 1e-4
    assert checked >= 2  # the rank limit was actually hit


def test_ewc_merge_refuses_a_fold_that_would_overflow_float32_and_keeps_the_state() -> None:
    """The consolidated and the live adapter are each valid, but their sum is 1.8 times float32's
    max: the fold is refused with a note, the published adapter is kept as it was, and the next
    fold of ordinary learning goes through."""
    x, y, q = _stream()
    engine = SonaLlm(_config(CS.EWC_MERGE), seed=7, clock=lambda: 0.0)
    near_float32_max(engine.background.published.base, Q, 0.9)
    near_float32_max(engine.instant.live, Q, 0.9)
    published = engine.background.published
    kept = published.base.export_weights()
    result = engine.run_background()
    assert any("rejected" in n and "overflow" in n for n in result.notes), result.notes
    assert engine.background.published.base is published.base
    assert published.base.export_weights() == kept
    assert np.isfinite(_consolidated(engine)).all()
    _feed(engine, x, y, q)
    result = engine.run_background()
    assert not any("rejected" in n for n in result.notes), result.notes
    assert engine.background.published.base.export_weights() != kept


def test_ensemble_makes_no_cluster_from_an_empty_query() -> None:
    """Empty text embeds to zero. A zero input has a zero gradient, so the sample is declined
    (skipped, with the reason) rather than counted as learned from, and never reaches the
    pattern bank: a zero centroid would capture most later inputs and serve them with an
    adapter that learned nothing."""
    cfg = _config(CS.ENSEMBLE, pattern_clusters=4, background_min_samples=1)
    engine = SonaLlm(cfg, seed=7, clock=lambda: 0.0)
    live = engine.instant.live
    before = [(a.copy(), bt.copy()) for _, a, bt in live.iter_factors()]
    version = live.version
    result = engine.instant_adapt("", "an answer", 0.9)
    assert not result.applied
    assert "input is zero" in result.notes[0]
    for (a0, b0), (_, a, bt) in zip(before, live.iter_factors(), strict=True):
        assert np.array_equal(a0, a) and np.array_equal(b0, bt)
    assert live.version == version
    st = engine.stats()
    assert (st.instant_count, st.skipped_count, st.pending_samples) == (0, 1, 0)
    assert engine.run_background().samples_used == 0
    assert engine.stats().pattern_clusters == 0
    assert not engine.background.published.ensemble
    queries = ["sort a list in python", "python list sorting", "rust borrow checker"]
    for q in queries:
        engine.instant_adapt(q, "answer to " + q, 0.9)
    engine.instant_adapt("", "another answer", 0.9)
    engine.run_background()
    pub = engine.background.published
    assert pub.centroids is not None
    assert np.all(np.linalg.norm(pub.centroids, axis=1) > 0.5)
    assert len(pub.ensemble) == len(pub.centroids) == engine.stats().pattern_clusters


# ---------------------------------------------------------------------- degenerate batches
@pytest.mark.parametrize("strategy", [CS.AVERAGE, CS.QUALITY_WEIGHTED, CS.ENSEMBLE])
def test_a_batch_of_one_repeated_sample_is_consolidated_without_overshooting(
    strategy: CS,
) -> None:
    """Every sample the same, with a target far from the adapter's output: the mini-batch's
    k gradients agree, so an unclipped k-fold step overshot the target (to about 3 times it
    on one module under ENSEMBLE) and the consolidation made the objective worse."""
    rng = np.random.default_rng(0)
    x = _unit_rows(rng, 1)[0]
    y = rng.standard_normal(D).astype(np.float32)
    y *= np.float32(8.0 / np.linalg.norm(y))
    engine = SonaLlm(_config(strategy, pattern_clusters=4), seed=1, clock=lambda: 0.0)
    _feed(engine, np.stack([x] * N), np.stack([y] * N), np.full(N, 0.8))
    result = engine.run_background()
    assert result.quality_delta is not None and result.quality_delta > 0.0
    pub = engine.background.published
    for m in (Q, V):
        assert np.linalg.norm(pub.predict(x[None], m)[0] - y) < np.linalg.norm(y)
