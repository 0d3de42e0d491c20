"""The objective's terms: which samples define a loss value, with which target and weight.

The definition is the feedback each sample stands for (``TrainingSample.to_feedback``): target
and rated-output feedback weighted by their rating, a group's pull target with weight 1, and
no term for gradient or quality-only feedback.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback, FeedbackKind
from sona.lora_config import TargetModule
from sona.objective import (
    LossTerms,
    Predictor,
    hold_out_newest,
    measurable,
    quality_delta,
    relative_improvement,
)
from sona.sample import TrainingSample

Q, V = TargetModule.Q_PROJ, TargetModule.V_PROJ
KINDS = ("rated", "target", "output", "group", "gradient", "quality")


def _sample(rng: np.random.Generator, kind: str, module: TargetModule | None) -> TrainingSample:
    q = float(rng.uniform(0.05, 1.0))
    s = TrainingSample(rng.standard_normal(5), rng.standard_normal(3), q).with_module(module)
    vec = rng.standard_normal(3)
    rated = AdaptFeedback.from_quality(q)
    feedback = {
        "rated": None,
        "target": rated.with_target(vec),
        "output": rated.with_output(vec),
        "group": AdaptFeedback.from_group(rng.standard_normal((3, 3)), rng.uniform(0, 1, 3)),
        "gradient": rated.with_gradient(vec),
        "quality": rated,
    }[kind]
    return s if feedback is None else s.with_feedback(feedback)


def _reference(
    samples: list[TrainingSample], module: TargetModule | None
) -> tuple[list[int], list[np.ndarray], list[float]]:
    rows, targets, weights = [], [], []
    for i, s in enumerate(samples):
        if module is not None and s.module not in (None, module):
            continue
        fb = s.to_feedback()
        if fb.kind in (FeedbackKind.TARGET, FeedbackKind.OUTPUT, FeedbackKind.GROUP):
            assert fb.vector is not None
            rows.append(i)
            targets.append(fb.vector)
            weights.append(1.0 if fb.kind is FeedbackKind.GROUP else fb.quality)
    return rows, targets, weights


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), max_size=12),
    modules=st.lists(st.sampled_from([None, Q, V]), min_size=12, max_size=12),
    module=st.sampled_from([None, Q]),
    seed=st.integers(0, 999),
)
def test_terms_are_the_feedback_each_sample_stands_for(
    kinds: list[str], modules: list[TargetModule | None], module: TargetModule | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    samples = [_sample(rng, k, m) for k, m in zip(kinds, modules, strict=False)]
    for s in samples:
        kind = s.to_feedback().kind
        assert measurable(s) == (kind not in (FeedbackKind.GRADIENT, FeedbackKind.QUALITY))
    rows, targets, weights = _reference(samples, module)
    terms = LossTerms.of(samples, module=module)
    if not rows:
        assert terms is None
        return
    assert terms is not None
    assert terms.x.tobytes() == np.stack([samples[i].input_embedding for i in rows]).tobytes()
    assert terms.target.tobytes() == np.stack(targets).tobytes()
    assert terms.weight.tolist() == weights


def _identity(sample: TrainingSample) -> TrainingSample:
    return sample


def test_the_oldest_sample_is_never_held_out() -> None:
    """Something must be left to train on: when only the oldest sample is measurable, nothing
    is held out (and the run reports that it cannot measure) rather than training on the rest
    and evaluating on the oldest."""
    rng = np.random.default_rng(0)
    oldest = _sample(rng, "target", None)
    newer = [_sample(rng, "gradient", None) for _ in range(3)]
    items = [oldest, *newer]
    train, held = hold_out_newest(items, 1, _identity)
    assert train == items and held == []
    train, held = hold_out_newest([*items, _sample(rng, "target", None)], 2, _identity)
    assert len(held) == 1 and held[0] is not oldest and train[0] is oldest


@pytest.mark.parametrize("after", [0.0, 1.0])
def test_an_improvement_relative_to_a_zero_objective_is_undefined(after: float) -> None:
    assert relative_improvement(0.0, after) is None
    assert relative_improvement(None, after) is None
    assert relative_improvement(2.0, 0.5) == 0.75


def _linear(seed: int) -> tuple[dict[TargetModule, np.ndarray], Predictor]:
    """A predictor that is a fixed linear map per module, and the maps."""
    rng = np.random.default_rng(seed)
    maps = {m: rng.standard_normal((3, 5)) for m in (Q, V)}

    def predict(x: np.ndarray, module: TargetModule) -> np.ndarray:
        return x.astype(np.float64) @ maps[module].T

    return maps, predict


def _reference_delta(
    samples: list[TrainingSample],
    before: dict[TargetModule, np.ndarray],
    after: dict[TargetModule, np.ndarray],
    modules: tuple[TargetModule, ...],
) -> float | None:
    """The definition, sample by sample: per module, the weighted squared error of the
    samples about it, before and after; the relative improvements averaged."""
    deltas = []
    for m in modules:
        rows, targets, weights = _reference(samples, m)
        if not rows:
            continue
        losses = []
        for maps in (before, after):
            errs = [
                w * float(np.sum((maps[m] @ samples[i].input_embedding - t) ** 2))
                for i, t, w in zip(rows, targets, weights, strict=True)
            ]
            losses.append(0.5 * sum(errs) / len(errs))
        if losses[0] > 0.0:
            deltas.append((losses[0] - losses[1]) / losses[0])
    return float(np.mean(deltas)) if deltas else None


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=10),
    modules=st.lists(st.sampled_from([None, Q, V]), min_size=10, max_size=10),
    both=st.booleans(),
    stacked=st.booleans(),
    seed=st.integers(0, 999),
)
def test_quality_delta_is_the_relative_improvement_per_module_averaged(
    kinds: list[str], modules: list[TargetModule | None], both: bool, stacked: bool, seed: int
) -> None:
    """Each module is judged on the samples about it (its own and those naming none), with
    or without the input rows passed in stacked; None with a note when nothing is
    measurable."""
    rng = np.random.default_rng(seed)
    samples = [_sample(rng, k, m) for k, m in zip(kinds, modules, strict=False)]
    targets = (Q, V) if both else (Q,)
    before_maps, before = _linear(seed)
    after_maps, after = _linear(seed + 1)
    rows = np.stack([s.input_embedding for s in samples]) if stacked else None
    notes: list[str] = []
    got = quality_delta(samples, before, after, targets, notes, rows=rows)
    want = _reference_delta(samples, before_maps, after_maps, targets)
    if want is None:
        assert got is None and len(notes) == 1 and notes[0].startswith("quality_delta: ")
    else:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6) and notes == []


def test_quality_delta_says_why_it_cannot_measure() -> None:
    rng = np.random.default_rng(0)
    rated = [_sample(rng, "rated", None) for _ in range(3)]
    _, predict = _linear(0)
    notes: list[str] = []
    assert quality_delta([], predict, predict, (Q,), notes, kept="held-out") is None
    unmeasurable = [_sample(rng, "gradient", None)]
    assert quality_delta(unmeasurable, predict, predict, (Q,), notes) is None
    assert notes == [
        "quality_delta: no held-out sample with a measurable objective",
        "quality_delta: no held-back sample with a measurable objective",
    ]

    def exact(x: np.ndarray, module: TargetModule) -> np.ndarray:
        return np.stack([s.output_embedding for s in rated])

    notes.clear()
    assert quality_delta(rated, exact, exact, (Q,), notes) is None  # zero objective
    assert notes == ["quality_delta: the objective is zero on the held-back samples"]

    def overflowing(x: np.ndarray, module: TargetModule) -> np.ndarray:
        raise InvalidInputError("overflow")

    notes.clear()
    assert quality_delta(rated, exact, overflowing, (Q,), notes) is None
    assert notes == ["quality_delta: predictions on the held-back samples overflow float32"]
