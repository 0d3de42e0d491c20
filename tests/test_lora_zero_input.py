"""A zero input teaches nothing (μ(x) = s·B·A·x is 0 whatever the weights): every update path
declines it with a note and changes nothing, and the engine and runtime count it as skipped."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ
N = 24


def _adapter(rank: int, modules: tuple[TargetModule, ...], dropout: float = 0.0) -> MicroLoRA:
    cfg = MicroLoraConfig(
        in_features=N, out_features=N, rank=rank, target_modules=modules, dropout=dropout
    )
    lora = MicroLoRA(cfg, seed=3)
    rng = np.random.default_rng(3)
    for m, a, bt in lora.iter_factors():
        lora.set_factors(m, a, rng.standard_normal(bt.shape).astype(np.float32) * 0.1)
    return lora


def _state(lora: MicroLoRA) -> tuple[bytes, int, int]:
    return lora.export_weights(), lora.version, lora.pending_updates


def _feedbacks() -> list[AdaptFeedback]:
    rng = np.random.default_rng(5)
    vec = rng.standard_normal(N).astype(np.float32)
    return [
        AdaptFeedback.from_quality(0.9).with_target(vec),
        AdaptFeedback.from_quality(1.0).with_gradient(vec),
        AdaptFeedback.from_quality(0.7).with_output(vec),
    ]


# (rank, modules, dropout): the one-kernel paths (rank <= 2, no dropout, one or two modules)
# and the general ones (rank 3, or dropout)
PATHS = [(2, (Q,), 0.0), (1, (Q, V), 0.0), (3, (Q,), 0.0), (3, (Q, V), 0.0), (2, (Q,), 0.2)]


@pytest.mark.parametrize(("rank", "modules", "dropout"), PATHS)
@pytest.mark.parametrize("module", [None, Q])
def test_step_and_adapt_decline_a_zero_input(
    rank: int, modules: tuple[TargetModule, ...], dropout: float, module: TargetModule | None
) -> None:
    lora = _adapter(rank, modules, dropout)
    lora.adapt(np.ones(N, np.float32), AdaptFeedback.from_quality(0.5).with_output(np.ones(N)))
    lora.clear_gradients()  # the rating baseline now has one rating: output feedback is used
    zero = np.zeros(N, np.float32)
    for fb in _feedbacks():
        before = _state(lora)
        assert not lora.step(zero, fb, 0.1, module=module)
        assert lora.last_note is not None and "input is zero" in lora.last_note
        assert _state(lora) == before  # weights, baseline, dropout stream, version, pending
        assert not lora.adapt(zero, fb, module)
        assert "input is zero" in (lora.last_note or "")
        assert _state(lora) == before


@pytest.mark.parametrize(("rank", "modules", "dropout"), PATHS[:3])
def test_a_tiny_but_nonzero_input_is_still_learned_from(
    rank: int, modules: tuple[TargetModule, ...], dropout: float
) -> None:
    lora = _adapter(rank, modules, dropout)
    x = np.zeros(N, np.float32)
    x[7] = 1e-3
    fb = AdaptFeedback.from_quality(1.0).with_target(np.ones(N, np.float32))
    before, version = lora.export_weights(), lora.version
    assert lora.step(x, fb, 0.5)
    assert lora.export_weights() != before and lora.version == version + 1


def test_quality_feedback_on_a_zero_input_is_declined() -> None:
    lora = _adapter(2, (Q,))
    zero = np.zeros(N, np.float32)
    lora.forward(zero, Q, explore=True)
    before = _state(lora)
    assert not lora.adapt(zero, AdaptFeedback.from_quality(0.9))
    assert "input is zero" in (lora.last_note or "")
    assert _state(lora) == before


def _engine_config() -> SonaLlmConfig:
    micro = MicroLoraConfig.for_hidden_dim(64, rank=2, target_modules=(Q,))
    return SonaLlmConfig(micro_lora=micro, background_min_samples=1)


def test_the_engine_counts_an_empty_query_as_skipped() -> None:
    engine = SonaLlm(_engine_config(), seed=1, clock=lambda: 0.0)
    result = engine.instant_adapt("", "an answer", 0.9)
    assert not result.applied
    assert "input is zero" in result.notes[0]
    engine.instant_adapt("a real question", "an answer", 0.9)
    st = engine.stats()
    assert (st.submitted_count, st.instant_count, st.skipped_count) == (2, 1, 1)
    assert st.skip_reasons == {"no_direction": 1}
    assert engine.run_background().samples_used == 1  # only the sample that taught something


def test_the_runtime_counts_a_zero_embedding_as_skipped() -> None:
    async def main() -> None:
        async with SonaRuntime(_engine_config(), seed=1) as rt:
            zero = np.zeros(64, np.float32)
            result = await rt.submit(TrainingSample(zero, np.ones(64, np.float32), 0.9))
            assert not result.applied and "input is zero" in result.notes[0]
            await rt.drain()
            st = rt.stats()
            assert (st.submitted_count, st.instant_count, st.skipped_count) == (1, 0, 1)
            assert st.pending_samples == 0

    anyio.run(main)
