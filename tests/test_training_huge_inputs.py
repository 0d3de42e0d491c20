"""Inputs whose squared norm float32 cannot hold (finite entries, ‖x‖ above 1e19).

Every update divides its gradient by ‖x‖², so past float32's range the step is zero: such an
input used to be counted as learned from (Instant loop, ``MicroLoRA.step``, ``train_step``)
while nothing changed. It is refused at every door instead, before any state changes, and the
shift detector takes ‖x‖² in float64 so it never mistakes a large input for a shift.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.boundary import ShiftDetector
from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.training import TrainingConfig, TrainingPipeline, TrainingSample

Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
F32 = np.float32
D = 16
TOO_LARGE = "too large"


def _huge(d: int = D, value: float = 1e20) -> np.ndarray:
    return np.full(d, value, F32)


def _target(d: int = D) -> AdaptFeedback:
    return AdaptFeedback.from_quality(0.9).with_target(np.ones(d, F32))


def _weights(lora: MicroLoRA) -> list[bytes]:
    return [arr.tobytes() for _, a, bt in lora.iter_factors() for arr in (a, bt)]


def _engine() -> SonaLlm:
    micro = MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V))
    return SonaLlm(SonaLlmConfig(micro_lora=micro), seed=1, clock=lambda: 0.0)


# ---------------------------------------------------------------------- samples
@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 300),
    norm=st.floats(1e19 * 1.001, 3e38),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_a_sample_input_beyond_the_limit_is_refused(width: int, norm: float, sign: float) -> None:
    x = np.full(width, sign * norm / np.sqrt(width), F32)
    assert np.isfinite(x).all()
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        TrainingSample(x, np.ones(3, F32), 0.5)


@pytest.mark.parametrize("width", [1, 7, 100, 4096])
def test_a_sample_input_at_the_limit_is_kept(width: int) -> None:
    x = np.full(width, 0.999e19 / np.sqrt(width), F32)
    assert TrainingSample(x, x, 0.5).input_embedding.tobytes() == x.tobytes()
    # a huge output is not refused here: its steps are refused as overflowing, with a note
    TrainingSample(np.ones(width, F32), _huge(width, 3e38), 0.5)


def test_nan_in_an_input_is_still_named_as_nan() -> None:
    x = _huge()
    x[3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        TrainingSample(x, x, 0.5)


# ---------------------------------------------------------------------- the engine
def test_instant_adapt_and_adapt_refuse_a_huge_input_and_change_nothing() -> None:
    engine = _engine()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal(D).astype(F32)
        engine.instant_adapt(x, rng.standard_normal(D).astype(F32), 0.8)
    stats, live = engine.stats(), _weights(engine.instant.live)
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        engine.instant_adapt(_huge(), np.ones(D, F32), 0.8)  # the per-request fast path
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        engine.instant_adapt(_huge().astype(np.float64), np.ones(D), 0.8)
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        engine.adapt(_huge(), _target())
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        engine.submit(TrainingSample(_huge(), np.ones(D, F32), 0.8))
    assert engine.stats() == stats
    assert _weights(engine.instant.live) == live


# ---------------------------------------------------------------------- the adapter
@pytest.mark.parametrize(
    ("rank", "modules", "module", "dropout"),
    [
        (2, (Q, V), None, 0.0),  # the two-module fused kernel
        (2, (Q, V), Q, 0.0),  # the one-module fused kernel
        (1, (Q,), None, 0.0),
        (3, (Q,), None, 0.0),  # step_one
        (3, (Q, V), None, 0.0),  # the general multi-module path
        (2, (Q, V), None, 0.3),  # dropout: the general path
    ],
)
@pytest.mark.parametrize("kind", ["target", "gradient", "output"])
def test_step_and_adapt_refuse_a_huge_input_bit_identically(
    rank: int,
    modules: tuple[TargetModule, ...],
    module: TargetModule | None,
    dropout: float,
    kind: str,
) -> None:
    cfg = MicroLoraConfig(
        in_features=D, out_features=D, rank=rank, target_modules=modules, dropout=dropout
    )
    lora = MicroLoRA(cfg, seed=3)
    rng = np.random.default_rng(1)
    for m in modules:  # B = 0 would hide a step that moves only B
        a, bt = lora.factors(m)
        lora.set_factors(m, a, (0.1 * rng.standard_normal(bt.shape)).astype(F32))
    fb = AdaptFeedback.from_quality(0.9)
    y = rng.standard_normal(D).astype(F32)
    fb = {"target": fb.with_target(y), "gradient": fb.with_gradient(y)}.get(kind) or (
        fb.with_output(y)
    )
    before, version = _weights(lora), lora.version
    for x in (_huge(), _huge(value=-1e19)):  # ‖x‖² = 1.6e39: float32 holds each entry only
        with pytest.raises(InvalidInputError, match=TOO_LARGE):
            lora.step(x, fb, 0.1, module=module)
        with pytest.raises(InvalidInputError, match=TOO_LARGE):
            lora.adapt(x, fb, module)
    assert _weights(lora) == before and lora.version == version
    assert lora.pending_updates == 0
    if dropout:  # dropout scales the kept entries up, past the limit here
        return
    # just inside the limit the step is taken (a gradient's is too small for float32 to show)
    x = np.full(D, 0.99e19 / 4, F32)
    assert lora.step(x, fb, 0.1, module=module, max_norm=None)
    assert lora.last_update_norm > 0.0
    assert kind == "gradient" or _weights(lora) != before


def test_quality_only_feedback_on_a_huge_explored_input_is_refused() -> None:
    lora = MicroLoRA(MicroLoraConfig(in_features=D, out_features=D, target_modules=(Q,)), seed=0)
    x = _huge(value=5e18)  # ‖x‖ = 2e19: exploring it is fine, learning from it is not
    lora.forward(x, Q, explore=True)
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        lora.adapt(x, AdaptFeedback.from_quality(0.7), Q)


# ---------------------------------------------------------------------- the pipeline
def test_train_step_track_and_track_many_refuse_a_huge_input_and_change_nothing() -> None:
    lora = MicroLoRA(MicroLoraConfig(in_features=D, out_features=D, target_modules=(Q,)), seed=2)
    pipe = TrainingPipeline(TrainingConfig(fisher_samples=8))
    rng = np.random.default_rng(4)
    for _ in range(5):
        pipe.train_step(lora, rng.standard_normal(D).astype(F32), _target())
    meta, arrays = pipe.state_dict()
    weights = _weights(lora)
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        pipe.train_step(lora, _huge(), _target())
    with pytest.raises(InvalidInputError, match=TOO_LARGE):
        pipe.track(lora, _huge())
    rows = rng.standard_normal((4, D)).astype(F32)
    rows[2] = _huge()
    with pytest.raises(InvalidInputError, match=r"xs\[2\] is finite but too large"):
        pipe.track_many(lora, rows)
    meta2, arrays2 = pipe.state_dict()
    assert meta2 == meta and arrays2.keys() == arrays.keys()
    for name, arr in arrays.items():
        assert arrays2[name].tobytes() == arr.tobytes(), name
    assert _weights(lora) == weights


# ---------------------------------------------------------------------- the detector
def test_the_detector_does_not_take_large_inputs_in_its_subspace_for_a_shift() -> None:
    """Calibrated on unit inputs, then the same directions at ‖x‖ = 1e20: float32's ‖x‖²
    was inf, so the batch kernel counted each as wholly outside the subspace and fired."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((3, D))

    def rows(n: int, scale: float) -> np.ndarray:
        x = rng.standard_normal((n, 3)) @ basis
        return (scale * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(F32)

    for many in (True, False):
        det = ShiftDetector(D, reference_samples=32, max_directions=4)
        assert det.update_many(rows(200, 1.0)) == -1 and det.phase == "watching"
        big = rows(200, 1e20)
        if many:
            assert det.update_many(big) == -1
        else:
            assert not any(det.update(x) for x in big)
            assert det.residual_fraction(big[0]) == pytest.approx(0.0, abs=1e-4)
