"""Feedback given for one module trains that module only, in every loop.

A gradient or target passed with ``module=Q`` lives in q_proj's output space; stepping v_proj
on it would teach v_proj something nobody said. The Instant loop always honoured ``module``;
these tests follow the sample through Background consolidation (every strategy, kernel and
per-sample paths), Deep replay, held-out evaluation, checkpoints and the durable log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sona.config import ConsolidationStrategy as CS
from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.errors import InvalidInputError, UnknownModuleError
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.sample_codec import decode_sample, encode_sample

D = 16
Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
K = TargetModule.K_PROJ


def _config(strategy: CS, **changes: object) -> SonaLlmConfig:
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V)),
        background_min_samples=4,
        consolidation_strategy=strategy,
        deep_trigger_threshold=1e12,
    ).replace(**changes)


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _delta_norm(engine: SonaLlm, module: TargetModule, probes: np.ndarray) -> float:
    return float(np.abs(engine.forward(probes, module)).max())


@pytest.mark.parametrize("strategy", list(CS))
def test_q_only_feedback_never_reaches_v(strategy: CS) -> None:
    engine = SonaLlm(_config(strategy), seed=0, clock=lambda: 0.0)
    xs = _inputs(40)
    probes = _inputs(8, seed=1)
    for x in xs:
        fb = AdaptFeedback.from_quality(0.9).with_target(np.ones(D, np.float32))
        assert engine.adapt(x, fb, Q).applied
    assert _delta_norm(engine, Q, probes) > 0.0
    assert _delta_norm(engine, V, probes) == 0.0
    engine.run_background()
    assert engine.stats().background_count == 1
    assert _delta_norm(engine, V, probes) == 0.0
    assert _delta_norm(engine, Q, probes) > 0.0
    result = engine.deep_optimize()
    assert result.samples_used > 0
    assert _delta_norm(engine, V, probes) == 0.0
    assert _delta_norm(engine, Q, probes) > 0.0


@pytest.mark.parametrize("strategy", [CS.AVERAGE, CS.EWC_MERGE])
def test_samples_for_all_modules_still_train_both(strategy: CS) -> None:
    engine = SonaLlm(_config(strategy), seed=0, clock=lambda: 0.0)
    probes = _inputs(8, seed=1)
    for i, x in enumerate(_inputs(40)):
        fb = AdaptFeedback.from_quality(0.9).with_target(np.ones(D, np.float32))
        assert engine.adapt(x, fb, Q if i % 2 else None).applied
    engine.run_background()
    engine.deep_optimize()
    assert _delta_norm(engine, V, probes) > 0.0 and _delta_norm(engine, Q, probes) > 0.0


def test_the_held_out_delta_judges_each_module_on_its_own_samples() -> None:
    """Held back Q-only samples measure q_proj's improvement; v_proj, with no sample of its
    own, does not count (it would dilute the mean with a zero)."""
    engine = SonaLlm(_config(CS.AVERAGE), seed=0, clock=lambda: 0.0)
    for x in _inputs(60):
        fb = AdaptFeedback.from_quality(0.9).with_target(0.5 * np.ones(D, np.float32))
        engine.adapt(x, fb, Q)
    result = engine.run_background()
    assert result.quality_delta is not None and result.quality_delta > 0.0


def test_the_module_is_refused_when_it_contradicts_the_sample_or_is_not_targeted() -> None:
    engine = SonaLlm(_config(CS.EWC_MERGE), seed=0)
    x = _inputs(1)[0]
    sample = TrainingSample(x, x, 0.9).with_module(Q)
    before = engine.stats()
    with pytest.raises(InvalidInputError, match="differs from the sample's module"):
        engine.submit(sample, module=V)
    with pytest.raises(UnknownModuleError):
        engine.submit(TrainingSample(x, x, 0.9).with_module(K))
    assert engine.stats() == before
    assert engine.submit(sample).applied
    assert engine.submit(sample, module="q_proj").applied


def test_the_module_survives_the_sample_codec() -> None:
    x = _inputs(1)[0]
    for module in (None, Q):
        sample = TrainingSample(x, x, 0.5)
        if module is not None:
            sample = sample.with_module(module)
        back, named = decode_sample(encode_sample(sample), in_features=D, out_features=D)
        assert back.module is module and named is module


@pytest.mark.anyio
async def test_checkpoints_and_the_log_keep_the_module(tmp_path: Path) -> None:
    """Pending samples with a module are written and restored with it: after a restore, a
    consolidation still leaves v_proj untouched."""
    cfg = _config(CS.AVERAGE, background_min_samples=1000, max_pending_samples=1000)
    probes = _inputs(8, seed=1)
    async with SonaRuntime(cfg, seed=0, checkpoint_dir=tmp_path) as rt:
        for x in _inputs(30):
            fb = AdaptFeedback.from_quality(0.9).with_target(np.ones(D, np.float32))
            await rt.adapt(x, fb, Q)
        assert rt.stats().pending_samples == 30
        await rt.checkpoint()
    restored = SonaRuntime.restore(tmp_path)
    async with restored as rt:
        assert rt.stats().pending_samples == 30
        await rt.consolidate()
        assert rt.stats().background_count == 1
        assert float(np.abs(rt.forward(probes, V)).max()) == 0.0
        assert float(np.abs(rt.forward(probes, Q)).max()) > 0.0
