"""The re-learning strategies: ENSEMBLE's cluster adapters under Deep replay and EWC++, what
re-learning can and cannot take from quality-only ratings, which samples BEST_ONLY keeps when
ratings tie, and mini-batches that stay stable at high learning rates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from sona.config import ConsolidationStrategy as CS
from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.training_config import TrainingConfig

Q = TargetModule.Q_PROJ
D = 32


def _world(seed: int) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), rng


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rel_loss(engine: SonaLlm, x: np.ndarray, w: np.ndarray) -> float:
    err = engine.forward(x, Q) - x @ w.T
    return float(np.sum(err * err) / np.sum((x @ w.T) ** 2))


def _two_clusters(seed: int) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
    """A linear correction ``w`` and unit inputs drawn around two separated centres."""
    w, rng = _world(seed)
    centers = 3 * rng.standard_normal((2, D)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        c = centers[rng.integers(0, 2, n)]
        return _unit(c + 0.3 * rng.standard_normal((n, D)).astype(np.float32))

    return w, draw


def _two_cluster_config(strategy: CS, instant_lr: float) -> SonaLlmConfig:
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, target_modules=(Q,)),
        instant_lr=instant_lr,
        consolidation_strategy=strategy,
        pattern_clusters=2,
        training=TrainingConfig(ewc_lambda=0.0, boundary_detection=False),
    )


def test_deep_replay_under_ensemble_improves_and_is_installed() -> None:
    """Inference adds the shared adapter and the cluster's: Deep trains only the cluster
    adapters (it used to train both toward the same targets, doubling the correction, so its
    result always made things worse and was discarded)."""
    w, draw = _two_clusters(0)
    engine = SonaLlm(_two_cluster_config(CS.ENSEMBLE, 0.1), seed=0, clock=lambda: 0.0)
    held = draw(200)
    for _ in range(6):
        for x in draw(100):
            engine.adapt(x, AdaptFeedback.from_quality(1.0).with_target(x @ w.T))
        engine.run_background()
    before = _rel_loss(engine, held, w)
    result = engine.deep_optimize()
    assert result.installed, result.notes
    assert result.quality_delta is not None and result.quality_delta > 0.0
    assert _rel_loss(engine, held, w) < before
    assert not engine.background.published.base.delta_weight(Q).any()  # the shared one: as it was


def _same_task_after_a_boundary(strategy: CS, lam: float) -> float:
    w, rng = _world(1)
    basis = np.linalg.qr(rng.standard_normal((D, 6)))[0].T

    def draw(n: int) -> np.ndarray:
        return _unit(rng.standard_normal((n, 6)) @ basis + 0.05 * rng.standard_normal((n, D)))

    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, target_modules=(Q,)),
        instant_lr=0.05,
        consolidation_strategy=strategy,
        pattern_clusters=1,
        training=TrainingConfig(ewc_lambda=lam, boundary_detection=False),
    )
    engine = SonaLlm(cfg, seed=0, clock=lambda: 0.0)
    held = draw(200)
    for phase in range(2):
        for _ in range(4):
            for x in draw(100):
                engine.adapt(x, AdaptFeedback.from_quality(1.0).with_target(x @ w.T))
            engine.run_background()
        if phase == 0:
            engine.start_new_task()
    return _rel_loss(engine, held, w)


def test_ewc_does_not_pull_ensemble_cluster_adapters_toward_the_shared_anchor() -> None:
    """EWC++ anchors the shared adapter, which ENSEMBLE leaves at zero: applied to the cluster
    adapters its pull erased what they learned (λ = 1 forgot ~50x more than λ = 0)."""
    plain = _same_task_after_a_boundary(CS.ENSEMBLE, 0.0)
    protected = _same_task_after_a_boundary(CS.ENSEMBLE, 1.0)
    assert plain < 0.1
    assert protected == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("strategy", [CS.AVERAGE, CS.BEST_ONLY, CS.ENSEMBLE])
def test_re_learning_strategies_say_when_quality_only_learning_is_not_kept(strategy: CS) -> None:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, target_modules=(Q,)),
        consolidation_strategy=strategy,
        background_min_samples=4,
    )
    engine = SonaLlm(cfg, seed=0, clock=lambda: 0.0)
    rng = np.random.default_rng(2)
    for x in _unit(rng.standard_normal((40, D))):
        engine.forward(x, Q, explore=True)
        engine.adapt(x, AdaptFeedback.from_quality(float(rng.uniform(0.2, 1.0))))
    result = engine.run_background()
    assert any("quality-only samples cannot be re-learned" in n for n in result.notes)
    deep = engine.deep_optimize()
    assert (deep.samples_used, deep.epochs, deep.installed) == (0, 0, False)
    assert any("cannot be replayed" in n for n in deep.notes)


def test_best_only_prefers_the_newest_samples_among_equal_ratings() -> None:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, target_modules=(Q,)),
        consolidation_strategy=CS.BEST_ONLY,
        background_min_samples=10,
        training=TrainingConfig(ewc_lambda=0.0),
    )
    engine = SonaLlm(cfg, seed=0, clock=lambda: 0.0)
    eye = np.eye(D, dtype=np.float32)
    for i in range(10):  # orthogonal inputs, one target each, all rated 1.0
        engine.adapt(eye[i], AdaptFeedback.from_quality(1.0).with_target(5.0 * eye[i]))
    result = engine.run_background()
    assert result.samples_used == 9  # the newest is held back to measure
    out = engine.background.published.predict(eye[:10], Q)
    learned = [i for i in range(9) if abs(float(out[i, i])) > 1e-6]
    assert learned == [7, 8]  # the top 20 % of 9, the newest of the tie


@pytest.mark.parametrize("strategy", [CS.AVERAGE, CS.QUALITY_WEIGHTED, CS.ENSEMBLE])
def test_re_learning_stays_stable_at_a_high_instant_lr(strategy: CS) -> None:
    """A mini-batch of k samples is applied as k steps' worth without feedback in between; at
    instant_lr 0.3 with k = 16 correlated samples it overshot (relative loss ~2.5e4). The batch
    now shrinks so that lr·k <= 1."""
    w, draw = _two_clusters(4)
    engine = SonaLlm(_two_cluster_config(strategy, 0.3), seed=0, clock=lambda: 0.0)
    held = draw(200)
    for _ in range(5):
        for x in draw(100):
            engine.adapt(x, AdaptFeedback.from_quality(1.0).with_target(x @ w.T))
        engine.run_background()
        assert _rel_loss(engine, held, w) < 0.2
