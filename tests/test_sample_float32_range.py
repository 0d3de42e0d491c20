"""Finite float64 values beyond float32's range are refused as such, not as NaN or inf.

sona computes in float32; converting 1e300 gives inf, which used to be reported as the caller's
array "contains NaN or inf" although every value it passed was finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.sample import TrainingSample

F32_MAX = float(np.finfo(np.float32).max)
BEYOND = r"holds -?[0-9.e+]+, beyond float32's range"

ENTRY_POINTS: dict[str, Callable[[np.ndarray], Any]] = {
    "input_embedding": lambda v: TrainingSample(v, np.ones(3), 0.5),
    "output_embedding": lambda v: TrainingSample(np.ones(3), v, 0.5),
    "target": lambda v: AdaptFeedback.from_quality(0.5).with_target(v),
    "grad": lambda v: AdaptFeedback.from_quality(0.5).with_gradient(v),
    "output": lambda v: AdaptFeedback.from_quality(0.5).with_output(v),
    "outputs": lambda v: AdaptFeedback.from_group(np.stack([v, np.ones(3)]), [0.2, 0.8]),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize("value", [1e300, -1e39, 3.5e38])
def test_a_float64_value_beyond_float32_is_named_as_such(name: str, value: float) -> None:
    v = np.array([1.0, value, 2.0])
    with pytest.raises(InvalidInputError, match=f"^{name} {BEYOND}") as info:
        ENTRY_POINTS[name](v)
    assert "NaN" not in str(info.value)
    assert f"{value:.4g}" in str(info.value)  # the offending value, with its sign


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_float64_are_still_named_as_such(name: str, value: float) -> None:
    with pytest.raises(InvalidInputError, match=f"^{name} contains NaN or inf"):
        ENTRY_POINTS[name](np.array([1.0, value, 2.0]))


def test_float64_at_float32s_limit_is_kept_as_its_rounding() -> None:
    s = TrainingSample(np.ones(3), np.array([F32_MAX, -F32_MAX, 1e-50]), 0.5)
    assert s.output_embedding.tolist() == [F32_MAX, -F32_MAX, 0.0]


@given(
    hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-3e38, 3e38)),
    st.floats(3.5e38, 1e308),
    st.booleans(),
    st.data(),
)
def test_any_finite_float64_vector_beyond_float32_is_refused_naming_its_range(
    base: np.ndarray, magnitude: float, negative: bool, data: st.DataObject
) -> None:
    v = base.copy()
    v[data.draw(st.integers(0, v.size - 1))] = -magnitude if negative else magnitude
    with pytest.raises(InvalidInputError, match=f"^output_embedding {BEYOND}"):
        TrainingSample(np.ones(2), v, 0.5)


def test_the_engine_refuses_such_an_input_and_changes_nothing() -> None:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(3, rank=1, target_modules=(TargetModule.Q_PROJ,))
    )
    engine = SonaLlm(cfg, seed=0, clock=lambda: 0.0)
    before = engine.stats()
    with pytest.raises(InvalidInputError, match=f"^x {BEYOND}"):
        engine.adapt(np.array([1.0, 1e300, 0.0]), AdaptFeedback.from_quality(0.9))
    assert engine.stats() == before
