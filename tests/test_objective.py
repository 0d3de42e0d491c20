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

from sona.feedback import AdaptFeedback, FeedbackKind
from sona.lora_config import TargetModule
from sona.objective import LossTerms, hold_out_newest, measurable, relative_improvement
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
