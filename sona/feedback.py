"""Feedback forms and the objective each one defines.

Every vector lives in the adapter's output space: the correction added to the frozen base
output. A host that knows a desired layer output y* passes y* − base_output.

- target (``with_target``): supervised, minimise ½·q·‖μ(x) − y*‖².
- gradient (``with_gradient``): the host's ∂L/∂output, applied through the adapter.
- rated output (``with_output``): advantage-weighted regression toward the rated response.
- group (``from_group``): k rated candidates for one input; the group mean is the baseline, so
  the pull target (the advantage-weighted mean of the candidates) is fixed at construction.
- quality only (``from_quality``): a REINFORCE step, valid only if the adapter explored on that
  input; otherwise the adapter declines it with a note.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sona.errors import InvalidInputError
from sona.validation import as_f32, check_finite, check_positive, check_quality, frozen_copy


class FeedbackKind(enum.Enum):
    QUALITY = "quality"
    OUTPUT = "output"
    TARGET = "target"
    GRADIENT = "gradient"
    GROUP = "group"


class AdaptFeedback:
    """Immutable feedback on one input; arrays are copied and made read-only."""

    __slots__ = ("_group_qualities", "_kind", "_quality", "_vector")

    _kind: FeedbackKind
    _quality: float
    _vector: np.ndarray | None
    _group_qualities: np.ndarray | None

    def __init__(self, quality: float) -> None:
        self._set(FeedbackKind.QUALITY, check_quality(quality), None, None)

    def _set(
        self,
        kind: FeedbackKind,
        quality: float,
        vector: np.ndarray | None,
        group_qualities: np.ndarray | None,
    ) -> None:
        # The slots' own descriptors bypass the immutability guard (built per request).
        _SET_KIND(self, kind)
        _SET_QUALITY(self, quality)
        _SET_VECTOR(self, vector)
        _SET_GROUP(self, group_qualities)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AdaptFeedback is immutable; use the with_* methods")

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_quality(cls, quality: float) -> AdaptFeedback:
        return cls(quality)

    @classmethod
    def from_group(
        cls, outputs: Any, qualities: Any, *, temperature: float = 1.0, cap: float = 20.0
    ) -> AdaptFeedback:
        """k >= 2 rated candidates for one input.

        Advantages are the qualities' z-scores within the group (the group mean is the
        baseline); weights are min(exp(advantage / temperature), cap). The stored vector is the
        weighted mean of the candidates, so adapting regresses toward the better ones and never
        pushes without bound. ``quality`` is the group's mean.
        """
        temperature = check_positive(temperature, "temperature")
        cap = check_positive(cap, "cap")
        if cap < 1.0:
            raise InvalidInputError(f"cap must be >= 1, got {cap!r}")
        outs = as_f32(outputs, "outputs")
        if outs.ndim != 2 or outs.shape[0] < 2:
            raise InvalidInputError(f"outputs must have shape (k >= 2, out), got {outs.shape}")
        check_finite(outs, "outputs")
        k = outs.shape[0]
        if isinstance(qualities, np.ndarray) and qualities.ndim == 1:
            items: list[Any] | None = list(qualities)
        elif isinstance(qualities, Sequence) and not isinstance(qualities, (str, bytes)):
            items = list(qualities)
        else:
            items = None
        if items is None or len(items) != k:
            raise InvalidInputError(f"qualities must be a sequence of {k} numbers, one per output")
        # each checked as a rating on its own: no bools, strings or ints beyond float range
        qs = np.array([check_quality(q, f"qualities[{i}]") for i, q in enumerate(items)])
        mean = float(qs.mean())
        spread = float(qs.std())
        adv = (qs - mean) / (spread + 1e-8) if spread > 0 else np.zeros_like(qs)
        w = np.exp(np.minimum(adv / temperature, math.log(cap)))  # min(exp(·), cap), no overflow
        pull = (w[:, None] * outs.astype(np.float64)).sum(axis=0) / w.sum()
        fb = object.__new__(cls)
        fb._set(FeedbackKind.GROUP, mean, frozen_copy(pull.astype(np.float32)), frozen_copy(qs))
        return fb

    def _with(self, kind: FeedbackKind, vector: Any, name: str) -> AdaptFeedback:
        if self._kind is not FeedbackKind.QUALITY:
            raise InvalidInputError(
                f"{name}: feedback already carries a {self._kind.value}; start from from_quality"
            )
        arr = as_f32(vector, name)
        if arr.ndim != 1:
            raise InvalidInputError(f"{name} must be a vector of shape (out,), got {arr.shape}")
        check_finite(arr, name)
        fb = object.__new__(type(self))
        fb._set(kind, self._quality, frozen_copy(arr), None)
        return fb

    @classmethod
    def _validated_output(cls, quality: float, output: np.ndarray) -> AdaptFeedback:
        """Rated-output feedback on a vector that is already a checked, frozen float32 copy
        (a TrainingSample's output embedding), without copying or re-checking it."""
        fb = object.__new__(cls)
        fb._set(FeedbackKind.OUTPUT, quality, output, None)
        return fb

    def with_output(self, output: Any) -> AdaptFeedback:
        """The response that was produced and rated (advantage-weighted regression)."""
        return self._with(FeedbackKind.OUTPUT, output, "output")

    def with_target(self, target: Any) -> AdaptFeedback:
        """The desired output (supervised, weighted by quality)."""
        return self._with(FeedbackKind.TARGET, target, "target")

    def with_gradient(self, grad: Any) -> AdaptFeedback:
        """∂Loss/∂output computed by the host."""
        return self._with(FeedbackKind.GRADIENT, grad, "grad")

    # access ----------------------------------------------------------------------------------
    @property
    def quality(self) -> float:
        return self._quality

    @property
    def kind(self) -> FeedbackKind:
        return self._kind

    @property
    def vector(self) -> np.ndarray | None:
        """The target, gradient, rated output or group pull target; None for quality only."""
        return self._vector

    @property
    def group_qualities(self) -> np.ndarray | None:
        return self._group_qualities

    def __repr__(self) -> str:
        dim = "" if self._vector is None else f", dim={self._vector.shape[0]}"
        return f"AdaptFeedback(kind={self._kind.value}, quality={self._quality:.3f}{dim})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AdaptFeedback):
            return NotImplemented
        return (
            self._kind is other._kind
            and self._quality == other._quality
            and _arr_eq(self._vector, other._vector)
            and _arr_eq(self._group_qualities, other._group_qualities)
        )

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        # __setattr__ refuses the default slot-state protocol; without this, samples holding
        # feedback could not be copied or sent to a worker process.
        return (_rebuild, (self._kind.value, self._quality, self._vector, self._group_qualities))


_SET_KIND, _SET_QUALITY, _SET_VECTOR, _SET_GROUP = (
    AdaptFeedback.__dict__[n].__set__ for n in ("_kind", "_quality", "_vector", "_group_qualities")
)


def _rebuild(
    kind: str, quality: float, vector: np.ndarray | None, group_qualities: np.ndarray | None
) -> AdaptFeedback:
    fb = object.__new__(AdaptFeedback)
    vec = None if vector is None else frozen_copy(vector)
    qs = None if group_qualities is None else frozen_copy(group_qualities)
    fb._set(FeedbackKind(kind), quality, vec, qs)
    return fb


def _arr_eq(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b))
