"""The objective each feedback form defines, evaluated on an adapter's prediction.

Background and Deep report ``quality_delta`` as the relative reduction of this objective on
samples they did not train on. Target and rated-output feedback weight the squared error by the
rating; a group's pull target already carries its advantages. Gradient and quality-only
feedback define no loss value to compare (only a direction), so they are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sona.feedback import FeedbackKind
from sona.sample import TrainingSample

Predict = Callable[[np.ndarray], np.ndarray]  # (n, in) -> (n, out) effective delta


def measurable(sample: TrainingSample) -> bool:
    kind = sample.to_feedback().kind
    return kind in (FeedbackKind.TARGET, FeedbackKind.OUTPUT, FeedbackKind.GROUP)


def mean_loss(samples: Sequence[TrainingSample], predict: Predict) -> float | None:
    """Mean objective of ``samples`` under ``predict``; None when none is measurable."""
    rows = [s for s in samples if measurable(s)]
    if not rows:
        return None
    x = np.stack([s.input_embedding for s in rows])
    pred = predict(x).astype(np.float64)
    total = 0.0
    for i, s in enumerate(rows):
        fb = s.to_feedback()
        assert fb.vector is not None
        err = pred[i] - fb.vector
        weight = 1.0 if fb.kind is FeedbackKind.GROUP else fb.quality
        total += 0.5 * weight * float(err @ err)
    return total / len(rows)


def relative_improvement(before: float | None, after: float | None) -> float | None:
    """(before − after) / before, or None when it is undefined."""
    if before is None or after is None or not before > 0.0:
        return None
    return (before - after) / before
