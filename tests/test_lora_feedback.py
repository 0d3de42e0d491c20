"""AdaptFeedback construction and the running quality baseline behind advantage-based forms."""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sona.baseline import RunningBaseline
from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback, FeedbackKind


@pytest.mark.parametrize("q", [0.0, 0.25, 1.0, 1, np.float32(0.5), np.float64(0.75)])
def test_from_quality_accepts_the_closed_unit_interval(q: Any) -> None:
    fb = AdaptFeedback.from_quality(q)
    assert fb.quality == float(q)
    assert isinstance(fb.quality, float)
    assert fb.kind is FeedbackKind.QUALITY
    assert fb.vector is None


@pytest.mark.parametrize("q", [-1e-9, 1.0000001, float("nan"), float("inf"), -float("inf")])
def test_quality_outside_unit_interval_is_rejected(q: float) -> None:
    with pytest.raises(InvalidInputError, match="quality"):
        AdaptFeedback.from_quality(q)


@pytest.mark.parametrize("q", [True, "0.5", None, [0.5]])
def test_quality_of_wrong_type_is_a_type_error(q: Any) -> None:
    with pytest.raises(TypeError, match="quality"):
        AdaptFeedback.from_quality(q)


@pytest.mark.parametrize(
    ("method", "kind", "name"),
    [
        ("with_output", FeedbackKind.OUTPUT, "output"),
        ("with_target", FeedbackKind.TARGET, "target"),
        ("with_gradient", FeedbackKind.GRADIENT, "grad"),
    ],
)
def test_vector_forms_copy_freeze_and_validate(method: str, kind: FeedbackKind, name: str) -> None:
    base = AdaptFeedback.from_quality(0.7)
    src = np.arange(5, dtype=np.float64)
    fb = getattr(base, method)(src)
    assert fb.kind is kind and fb.quality == 0.7
    assert base.kind is FeedbackKind.QUALITY  # a new instance; the original is untouched
    assert fb.vector is not None and fb.vector.dtype == np.float32
    src[0] = 99.0
    assert fb.vector[0] == 0.0  # a private copy
    with pytest.raises(ValueError):
        fb.vector[1] = 5.0  # read-only
    with pytest.raises(InvalidInputError, match=name):
        getattr(base, method)(np.ones((2, 5)))
    with pytest.raises(InvalidInputError, match=name):
        getattr(base, method)([0.0, float("nan")])
    with pytest.raises(InvalidInputError, match=name):
        getattr(base, method)([0.0, float("inf")])
    with pytest.raises(TypeError, match=name):
        getattr(base, method)(np.ones(3, dtype=complex))
    with pytest.raises(TypeError, match=name):
        getattr(base, method)(["a", "b"])
    with pytest.raises(InvalidInputError, match=name):
        getattr(fb, method)(np.ones(5))  # a form carries exactly one vector


def test_feedback_is_immutable() -> None:
    fb = AdaptFeedback.from_quality(0.5).with_target([1.0, 2.0])
    with pytest.raises(AttributeError):
        fb.quality = 0.9  # type: ignore[misc]
    with pytest.raises(AttributeError):
        fb._quality = 0.9
    assert fb.quality == 0.5


def test_equality_compares_kind_quality_and_values() -> None:
    a = AdaptFeedback.from_quality(0.5).with_target([1.0, 2.0])
    assert a == AdaptFeedback.from_quality(0.5).with_target(np.array([1.0, 2.0], np.float32))
    assert a != AdaptFeedback.from_quality(0.5).with_output([1.0, 2.0])
    assert a != AdaptFeedback.from_quality(0.6).with_target([1.0, 2.0])
    assert a != AdaptFeedback.from_quality(0.5).with_target([1.0, 2.5])
    assert a != AdaptFeedback.from_quality(0.5)


def test_group_feedback_with_the_same_pull_but_other_ratings_is_not_equal() -> None:
    """Identical candidates give the same pull target and mean whatever their ratings; the
    ratings themselves are still part of the feedback."""
    same = [[1.0, 2.0], [1.0, 2.0]]
    a = AdaptFeedback.from_group(same, [0.2, 0.8])
    b = AdaptFeedback.from_group(same, [0.8, 0.2])
    assert a.vector is not None and b.vector is not None
    assert np.array_equal(a.vector, b.vector) and a.quality == b.quality
    assert a != b
    assert a == AdaptFeedback.from_group(same, [0.2, 0.8])


@pytest.mark.parametrize(
    "fb",
    [
        AdaptFeedback.from_quality(0.3),
        AdaptFeedback.from_quality(0.3).with_gradient([1.0, -2.0, 3.0]),
        AdaptFeedback.from_group([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]], [0.1, 0.9, 0.5]),
    ],
)
def test_copy_deepcopy_and_pickle_preserve_value_and_immutability(fb: AdaptFeedback) -> None:
    for twin in (copy.copy(fb), copy.deepcopy(fb), pickle.loads(pickle.dumps(fb))):
        assert twin == fb and twin.kind is fb.kind
        for arr in (twin.vector, twin.group_qualities):
            assert arr is None or not arr.flags.writeable


def group_reference(outs: np.ndarray, qs: np.ndarray, temperature: float, cap: float) -> np.ndarray:
    """Weighted mean of the candidates, weights min(exp(z/T), cap), z the in-group z-score."""
    qs = np.asarray(qs, np.float64)
    std = qs.std()
    z = (qs - qs.mean()) / (std + 1e-8) if std > 0 else np.zeros_like(qs)
    w = np.array([min(math.exp(min(v / temperature, 700.0)), cap) for v in z])
    pull: np.ndarray = (w[:, None] * outs.astype(np.float64)).sum(axis=0) / w.sum()
    return pull


@settings(max_examples=60, deadline=None)
@given(
    outs=hnp.arrays(
        np.float32,
        st.tuples(st.integers(2, 6), st.integers(1, 8)),
        elements=st.floats(-100, 100, width=32),
    ),
    data=st.data(),
    temperature=st.floats(0.05, 10.0),
    cap=st.floats(1.0, 50.0),
)
def test_group_pull_is_the_advantage_weighted_mean(
    outs: np.ndarray, data: st.DataObject, temperature: float, cap: float
) -> None:
    k = outs.shape[0]
    qs = np.array(data.draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fb = AdaptFeedback.from_group(outs, qs, temperature=temperature, cap=cap)
    assert fb.kind is FeedbackKind.GROUP
    assert fb.quality == pytest.approx(float(qs.mean()))
    assert fb.group_qualities is not None
    np.testing.assert_allclose(fb.group_qualities, qs.astype(np.float32))
    assert fb.vector is not None
    expected = group_reference(outs, qs, temperature, cap)
    np.testing.assert_allclose(fb.vector, expected, rtol=1e-5, atol=1e-4)
    # a convex combination: it never pushes beyond the candidates
    assert np.all(fb.vector >= outs.min(axis=0) - 1e-3)
    assert np.all(fb.vector <= outs.max(axis=0) + 1e-3)


def test_group_pull_leans_to_the_better_candidates() -> None:
    outs = np.array([[0.0, 0.0], [10.0, 10.0]], np.float32)
    fb = AdaptFeedback.from_group(outs, [0.2, 0.9])
    assert fb.vector is not None and float(fb.vector[0]) > 5.0
    flipped = AdaptFeedback.from_group(outs, [0.9, 0.2])
    assert flipped.vector is not None and float(flipped.vector[0]) < 5.0
    equal = AdaptFeedback.from_group(outs, [0.5, 0.5])
    assert equal.vector is not None
    np.testing.assert_array_equal(equal.vector, [5.0, 5.0])


def test_group_cap_bounds_the_weight_ratio() -> None:
    outs = np.array([[0.0], [1.0]], np.float32)
    fb = AdaptFeedback.from_group(outs, [0.0, 1.0], temperature=1e-6, cap=3.0)
    # weights exp(-huge) -> 0 and min(exp(huge), 3) = 3: pull = 3/3 = 1, exactly the better one
    assert fb.vector is not None and float(fb.vector[0]) == pytest.approx(1.0)
    fb2 = AdaptFeedback.from_group(np.array([[0.0], [1.0], [1.0]], np.float32), [1.0, 0.5, 0.5])
    assert fb2.vector is not None and 0.0 < float(fb2.vector[0]) < 1.0


@pytest.mark.parametrize(
    ("outputs", "qualities", "kw", "name"),
    [
        ([[1.0, 2.0]], [0.5], {}, "outputs"),
        ([1.0, 2.0], [0.5, 0.5], {}, "outputs"),
        ([[1.0, float("nan")], [0.0, 0.0]], [0.5, 0.5], {}, "outputs"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.5], {}, "qualities"),
        ([[1.0, 2.0], [0.0, 0.0]], 0.5, {}, "qualities"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.5, 1.5], {}, "qualities"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.5, float("nan")], {}, "qualities"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.2, 0.8], {"temperature": 0.0}, "temperature"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.2, 0.8], {"temperature": -1.0}, "temperature"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.2, 0.8], {"temperature": float("nan")}, "temperature"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.2, 0.8], {"cap": 0.5}, "cap"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.2, 0.8], {"cap": -2.0}, "cap"),
        ([[1.0, 2.0], [0.0, 0.0]], [0.2, 0.8], {"cap": float("inf")}, "cap"),
    ],
)
def test_group_rejects_invalid_arguments(
    outputs: Any, qualities: Any, kw: dict[str, float], name: str
) -> None:
    with pytest.raises(InvalidInputError, match=name):
        AdaptFeedback.from_group(outputs, qualities, **kw)


@pytest.mark.parametrize(
    ("qualities", "error"),
    [
        ([True, False], TypeError),
        (np.array([True, False]), TypeError),
        (["0.2", "0.9"], TypeError),
        ([1j, 0.0], TypeError),
        ({0.2, 0.9}, InvalidInputError),
        (iter([0.2, 0.9]), InvalidInputError),
        ({0: 0.2, 1: 0.9}, InvalidInputError),
        ([2**2000, 0.0], InvalidInputError),
    ],
)
def test_group_qualities_are_each_checked_as_a_rating(qualities: Any, error: type) -> None:
    with pytest.raises(error, match="qualities"):
        AdaptFeedback.from_group(np.eye(2, 8), qualities)


def test_group_qualities_may_be_any_real_sequence_or_vector() -> None:
    outs = np.eye(2, 8)
    expected = AdaptFeedback.from_group(outs, [0.25, 1.0])
    for qs in ((0.25, 1), np.array([0.25, 1.0], np.float32), [np.float64(0.25), np.int8(1)]):
        assert AdaptFeedback.from_group(outs, qs) == expected


def test_group_cannot_take_another_vector() -> None:
    fb = AdaptFeedback.from_group([[1.0], [2.0]], [0.1, 0.2])
    with pytest.raises(InvalidInputError, match="group"):
        fb.with_target([1.0])


# ---------------------------------------------------------------------------- running baseline


def test_baseline_before_any_rating_gives_zero_advantage() -> None:
    b = RunningBaseline(0.99)
    assert b.count == 0 and b.advantage(0.9) == 0.0 and b.advantage(0.1) == 0.0


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60))
def test_baseline_averages_early_ratings_exactly(qs: list[float]) -> None:
    """With decay 0.99 the first 100 ratings get equal weight: mean and variance are exact."""
    b = RunningBaseline(0.99)
    for q in qs:
        b.update(q)
    assert b.count == len(qs)
    assert b.mean == pytest.approx(float(np.mean(qs)), abs=1e-9)
    assert b.var == pytest.approx(float(np.var(qs)), abs=1e-9)


def test_baseline_forgets_old_ratings_at_its_decay() -> None:
    b = RunningBaseline(0.5)
    for _ in range(50):
        b.update(0.0)
    for _ in range(20):
        b.update(1.0)
    assert b.mean == pytest.approx(1.0, abs=1e-5)  # 0.5**20 of the old level is left


def test_baseline_advantage_is_a_z_score() -> None:
    b = RunningBaseline(0.99)
    for q in (0.4, 0.6):
        b.update(q)
    assert b.advantage(0.7) == pytest.approx(0.2 / 0.1)
    assert b.advantage(0.5) == pytest.approx(0.0)
    assert b.advantage(0.3) == pytest.approx(-2.0)


def _python_baseline(
    qs: list[float], decay: float, temperature: float, cap: float
) -> tuple[list[float], tuple[int, float, float]]:
    """The baseline in Python floats: each rating's weight before it joins, then the state."""
    count, mean, var = 0, 0.0, 0.0
    weights = []
    for q in qs:
        adv = 0.0 if count == 0 else (q - mean) / max(math.sqrt(var), 1e-4)
        z = adv / temperature
        weights.append(cap if z >= math.log(cap) else math.exp(z))
        count += 1
        if count == 1:
            mean, var = q, 0.0
            continue
        d = min(decay, 1.0 - 1.0 / count)
        delta = q - mean
        mean += (1.0 - d) * delta
        var = d * (var + (1.0 - d) * delta * delta)
    return weights, (count, mean, var)


@given(
    qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=80),
    decay=st.sampled_from([0.5, 0.9, 0.99, 0.999]),
    temperature=st.sampled_from([0.05, 0.5, 1.0, 3.0]),
    cap=st.sampled_from([1.5, 4.0, 1e6]),
)
def test_baseline_rounds_like_python_floats(
    qs: list[float], decay: float, temperature: float, cap: float
) -> None:
    """The kernels that keep the baseline are compiled without fast-math: weights and state are
    those of the same arithmetic in Python floats, bit for bit."""
    b = RunningBaseline(decay)
    got = []
    for q in qs:
        got.append(b.weight(q, temperature, cap))
        b.update(q)
    weights, state = _python_baseline(qs, decay, temperature, cap)
    assert got == weights
    assert (b.count, b.mean, b.var) == state


def test_baseline_state_round_trip_and_validation() -> None:
    b = RunningBaseline(0.9)
    for q in (0.1, 0.5, 0.8):
        b.update(q)
    twin = RunningBaseline(0.9)
    twin.load(b.state())
    assert (twin.count, twin.mean, twin.var) == (b.count, b.mean, b.var)
    for bad in ({"count": -1.0}, {"var": -0.1}, {"mean": float("nan")}, {"count": "x"}):
        with pytest.raises(ValueError):
            twin.load(bad)  # type: ignore[arg-type]
    assert (twin.count, twin.mean, twin.var) == (b.count, b.mean, b.var)
