"""The objective each feedback form defines, evaluated on an adapter's prediction.

Background and Deep report ``quality_delta`` as the relative reduction of this objective on
samples they did not train on. Target and rated-output feedback weight the squared error by the
rating; a group's pull target already carries its advantages. Gradient and quality-only
feedback define no loss value to compare (only a direction), so they are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from sona.errors import InvalidInputError
from sona.feedback import FeedbackKind
from sona.kernels import batch as k_batch
from sona.lora_config import TargetModule
from sona.sample import TrainingSample
from sona.stacking import stack_rows

Predict = Callable[[np.ndarray], np.ndarray]  # (n, in) -> (n, out) effective delta
# (n, in), module -> (n, out): a state's effective delta on one module
Predictor = Callable[[np.ndarray, TargetModule], np.ndarray]
T = TypeVar("T")

EVAL_FRACTION = 0.1  # of a consolidation's samples, held back to measure it on
MAX_EVAL = 64


def held_out_count(samples: int) -> int:
    """How many of a consolidation's ``samples`` to hold back for its ``quality_delta``: about
    10 %, at most ``MAX_EVAL``, at least one, and none of fewer than two (the oldest sample is
    never held back)."""
    if samples < 2:
        return 0
    return min(MAX_EVAL, max(1, math.ceil(EVAL_FRACTION * samples)))


_MEASURABLE = (FeedbackKind.TARGET, FeedbackKind.OUTPUT, FeedbackKind.GROUP)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def measurable(sample: TrainingSample) -> bool:
    fb = sample.feedback
    return fb is None or fb.kind in _MEASURABLE


def _term(sample: TrainingSample) -> tuple[np.ndarray, float] | None:
    """The target and weight of ``sample``'s squared error; None when its feedback defines no
    loss value. A rated sample (no explicit feedback, the common case) is rated-output
    feedback on its own output embedding, read here without building that feedback."""
    fb = sample.feedback
    if fb is None:
        return sample.output_embedding, sample.quality
    if fb.kind not in _MEASURABLE:
        return None
    assert fb.vector is not None
    return fb.vector, 1.0 if fb.kind is FeedbackKind.GROUP else fb.quality


def hold_out_newest(
    items: list[T], want: int, sample_of: Callable[[T], TrainingSample]
) -> tuple[list[T], list[T]]:
    """The items to train on (in order) and the newest ``want`` measurable ones held out for
    evaluation (oldest first); the oldest item is never held out.

    The scan starts at the newest and stops once it has enough, so splitting a full replay
    buffer checks a few hundred samples rather than all of them.
    """
    held_idx: list[int] = []
    for i in range(len(items) - 1, 0, -1):
        if len(held_idx) == want:
            break
        if measurable(sample_of(items[i])):
            held_idx.append(i)
    if not held_idx:
        return items, []
    cut = held_idx[-1]
    if cut == len(items) - len(held_idx):  # the newest, all measurable
        return items[:cut], items[cut:]
    held_set = set(held_idx)
    train = [p for i, p in enumerate(items) if i not in held_set]
    return train, [items[i] for i in reversed(held_idx)]


class LossTerms:
    """The measurable samples of a set, as arrays: inputs, targets and weights.

    Built once and evaluated under several predictions (before and after a consolidation,
    per module): the per-sample work happens here, the losses are one kernel pass each.
    """

    __slots__ = ("target", "weight", "x")

    def __init__(self, x: np.ndarray, target: np.ndarray, weight: np.ndarray) -> None:
        self.x = x  # (n, in) float32
        self.target = target  # (n, out) float32
        self.weight = weight  # (n,) float64

    def __len__(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def of(
        cls,
        samples: Sequence[TrainingSample],
        x: np.ndarray | None = None,
        module: TargetModule | None = None,
    ) -> LossTerms | None:
        """Terms of the measurable ``samples``; None when none is. ``x``, when given, holds
        the input rows of ``samples`` (all of them) already stacked. With ``module``, only the
        samples that are about it (their ``module`` is it or None): a target in one module's
        output space says nothing about another's."""
        rows: list[int] = []
        targets: list[np.ndarray] = []
        weights: list[float] = []
        for i, s in enumerate(samples):
            if module is not None and s.module is not None and s.module is not module:
                continue
            term = _term(s)
            if term is None:
                continue
            rows.append(i)
            targets.append(term[0])
            weights.append(term[1])
        if not rows:
            return None
        if x is None or len(rows) != len(samples):
            inputs = [samples[i].input_embedding for i in rows]
            x = stack_rows(inputs, inputs[0].shape[0])
        return cls(
            np.ascontiguousarray(x, dtype=np.float32),
            stack_rows(targets, targets[0].shape[0]),
            np.asarray(weights, np.float64),
        )

    def mean_loss(self, pred: np.ndarray) -> float:
        """Mean of ½·weight·‖pred − target‖² over the rows; ``pred`` is (n, out)."""
        pred = np.ascontiguousarray(pred)
        if pred.dtype not in _FLOATS:
            pred = pred.astype(np.float64)
        total = k_batch.weighted_sq_error(pred, self.target, self.weight)
        return 0.5 * float(total) / len(self)


def mean_loss(samples: Sequence[TrainingSample], predict: Predict) -> float | None:
    """Mean objective of ``samples`` under ``predict``; None when none is measurable."""
    terms = LossTerms.of(samples)
    if terms is None:
        return None
    return terms.mean_loss(predict(terms.x))


def relative_improvement(before: float | None, after: float | None) -> float | None:
    """(before − after) / before, or None when it is undefined."""
    if before is None or after is None or not before > 0.0:
        return None
    return (before - after) / before


def quality_delta(
    samples: Sequence[TrainingSample],
    before: Predictor,
    after: Predictor,
    modules: Sequence[TargetModule],
    notes: list[str],
    *,
    rows: np.ndarray | None = None,
    kept: str = "held-back",
) -> float | None:
    """``quality_delta`` as the Background and Deep loops report it: the relative improvement
    of the objective on ``samples`` from ``before``'s predictions to ``after``'s, averaged
    over ``modules``; None, with a note saying why, when it cannot be measured. ``rows``, when
    given, holds the samples' input rows already stacked; ``kept`` names the samples in notes.

    Each module is judged on the samples about it. When no sample names a module, that is
    every sample for every module, and the terms are built once."""
    terms = LossTerms.of(samples, rows) if samples else None
    if terms is None:
        notes.append(f"quality_delta: no {kept} sample with a measurable objective")
        return None
    per_module = any(s.module is not None for s in samples)
    deltas = []
    for module in modules:
        if per_module:
            own = LossTerms.of(samples, rows, module)
            if own is None:
                continue
            terms = own
        try:
            b = terms.mean_loss(before(terms.x, module))
            a = terms.mean_loss(after(terms.x, module))
        except InvalidInputError:  # finite inputs whose predictions overflow float32
            notes.append(f"quality_delta: predictions on the {kept} samples overflow float32")
            return None
        d = relative_improvement(b, a)
        if d is not None:
            deltas.append(d)
    if not deltas:
        notes.append(f"quality_delta: the objective is zero on the {kept} samples")
        return None
    return float(np.mean(deltas))
