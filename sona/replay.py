"""Samples stacked once per Deep run, so each epoch over them is one GIL-free kernel call.

A Deep run replays the same samples for several epochs and ensemble members. Turning each
sample into its feedback, mode and weight once, and its rows into two arrays, lets
:meth:`sona.lora.MicroLoRA.replay` step through a whole epoch in ``kernels.replay`` without
coming back to Python (see there for why that matters in a worker thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sona.errors import InvalidInputError
from sona.feedback import FeedbackKind
from sona.kernels import lora as k_lora
from sona.lora_config import TargetModule
from sona.sample import TrainingSample
from sona.stacking import stack_rows

RATED = np.nan  # a weight that marks a rated output: its weight comes from the rating baseline
_MODES = np.array([k_lora.MODE_REGRESS, k_lora.MODE_GRADIENT], np.int64)


@dataclass(frozen=True, slots=True)
class ReplayBatch:
    """The inputs, feedback vectors, kernel modes, weights and qualities of some samples."""

    xs: np.ndarray  # (n, in) float32
    vecs: np.ndarray  # (n, out) float32
    modes: np.ndarray  # (n,) int64
    targets: np.ndarray  # (n,) int64: the index of the one module a sample is for, -1: all
    weights: np.ndarray  # (n,) float64; RATED for rated outputs
    qualities: np.ndarray  # (n,) float64
    gated: np.ndarray  # (n,) bool: target or gradient feedback, which quality_threshold gates
    rating_only: np.ndarray  # (n,) bool: quality-only feedback, never stepped (see ``of``)
    modules: tuple[TargetModule, ...] = ()  # what ``targets`` indexes

    def __post_init__(self) -> None:
        """Refuse arrays the kernel would misread: it indexes them without bounds checks."""
        n = self.xs.shape[0] if self.xs.ndim == 2 else -1
        for name, arr, dtype, ndim in (
            ("xs", self.xs, np.float32, 2),
            ("vecs", self.vecs, np.float32, 2),
            ("modes", self.modes, np.int64, 1),
            ("targets", self.targets, np.int64, 1),
            ("weights", self.weights, np.float64, 1),
            ("qualities", self.qualities, np.float64, 1),
            ("gated", self.gated, np.bool_, 1),
            ("rating_only", self.rating_only, np.bool_, 1),
        ):
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != ndim:
                kind = f"{ndim}-d {np.dtype(dtype).name}"
                raise InvalidInputError(f"ReplayBatch.{name} must be a {kind} array")
            if arr.shape[0] != n or not arr.flags.c_contiguous:
                raise InvalidInputError(f"ReplayBatch.{name} must be C-contiguous with {n} rows")
        if not np.isin(self.modes, _MODES).all():
            raise InvalidInputError("ReplayBatch.modes holds a mode other than regress or gradient")
        w = self.weights
        if not ((np.isnan(w) | ((w >= 0.0) & (w < np.inf))).all()):
            raise InvalidInputError("ReplayBatch.weights must be finite and >= 0 (NaN: rated)")
        q = self.qualities
        if not ((q >= 0.0) & (q <= 1.0)).all():
            raise InvalidInputError("ReplayBatch.qualities must lie in [0, 1]")
        t = self.targets
        if not ((t >= -1) & (t < len(self.modules))).all():
            raise InvalidInputError("ReplayBatch.targets must be -1 or index ReplayBatch.modules")

    def __len__(self) -> int:
        return int(self.modes.shape[0])

    @classmethod
    def of(
        cls,
        samples: Sequence[TrainingSample],
        xs: np.ndarray,
        modules: Sequence[TargetModule] = (),
    ) -> ReplayBatch | None:
        """The batch of ``samples``, whose input rows are ``xs``, for an adapter over
        ``modules`` (in its order); None when feedback vectors differ in length, every sample
        is quality-only, or a sample names a module outside ``modules``.

        A quality-only sample rates noise that only the live adapter explored, so no adapter
        a loop replays into can step on it (``adapt`` declines it): it keeps its row, marked
        ``rating_only`` with a zero vector and weight, and ``MicroLoRA.replay`` and ``relearn``
        pass over it as the per-sample path does. One such sample among thousands would
        otherwise send the whole replay back to Python, sample by sample."""
        n = len(samples)
        modules = tuple(modules)
        targets = np.full(n, -1, np.int64)
        modes = np.empty(n, np.int64)
        weights = np.empty(n, np.float64)
        qualities = np.empty(n, np.float64)
        gated = np.zeros(n, np.bool_)
        rated_only = np.zeros(n, np.bool_)
        vectors: list[np.ndarray | None] = []
        for i, s in enumerate(samples):
            if s.module is not None:
                if s.module not in modules:
                    return None
                targets[i] = modules.index(s.module)
            fb = s.to_feedback()
            kind = fb.kind
            qualities[i] = fb.quality
            modes[i] = k_lora.MODE_REGRESS
            vectors.append(fb.vector)
            if fb.vector is None:  # quality-only
                weights[i], rated_only[i] = 0.0, True
            elif kind is FeedbackKind.GRADIENT:
                modes[i], weights[i], gated[i] = k_lora.MODE_GRADIENT, 1.0, True
            elif kind is FeedbackKind.TARGET:
                weights[i], gated[i] = fb.quality, True
            elif kind is FeedbackKind.OUTPUT:
                weights[i] = RATED
            else:  # GROUP: the pull target already carries the advantage weighting
                weights[i] = 1.0
        given = [v for v in vectors if v is not None]
        width = given[0].shape[0] if given else 0
        if any(v.shape != (width,) for v in given) or (n and not given):
            return None  # ragged, or nothing to step (each sample is declined either way)
        zero = np.zeros(width, np.float32)
        rows = [zero if v is None else v for v in vectors]
        vecs = stack_rows(rows, width) if rows else np.empty((0, width), np.float32)
        return cls(xs, vecs, modes, targets, weights, qualities, gated, rated_only, modules)


def rating_only(sample: TrainingSample) -> bool:
    """Quality-only feedback: a rating of noise the live adapter explored, which only that
    adapter can turn into a step (another adapter never explored the input)."""
    fb = sample.feedback
    return fb is not None and fb.kind is FeedbackKind.QUALITY


class ReplayPool:
    """Samples a loop learns from in several passes and, when every one of them can be stepped
    by the replay kernels, their :class:`ReplayBatch`, built once for all the passes."""

    def __init__(
        self,
        samples: Sequence[TrainingSample],
        xs: np.ndarray | None,
        out_features: int,
        modules: Sequence[TargetModule],
    ) -> None:
        """``xs``: the samples' input rows (None when there are no samples); ``modules``: the
        adapters' target modules, in their order."""
        self.samples = samples
        batch = ReplayBatch.of(samples, xs, modules) if xs is not None and samples else None
        ok = batch is not None and batch.vecs.shape[1] == out_features
        self.batch = batch if ok else None
