"""One unit of feedback as the loops keep it: what went in, what came out, how it was rated.

Samples are immutable so the replay buffer, the durable log and the loops can share one object
without copies or races; the ``with_*`` builders return new instances.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.kernels.update import (
    INPUT_NOT_FINITE,
    INPUT_TOO_LARGE,
    all_finite,
    vec_input_status,
)
from sona.kernels.warmup import fast
from sona.lora_config import TargetModule
from sona.validation import as_f32, check_positive, check_quality, check_text, frozen_copy

_FIELDS = (
    "input_embedding",
    "output_embedding",
    "quality",
    "query",
    "response",
    "latency_ms",
    "token_count",
    "session_id",
    "feedback",
    "module",
)


class TrainingSample:
    """An input embedding, the output embedding that was rated, and the rating.

    ``feedback`` None means the output embedding is the rated output itself (advantage-weighted
    regression toward it); a sample may instead carry explicit feedback (a target, a gradient,
    a group) from :meth:`with_feedback`.
    """

    __slots__ = _FIELDS

    input_embedding: np.ndarray
    output_embedding: np.ndarray
    quality: float
    query: str | None
    response: str | None
    latency_ms: float
    token_count: int
    session_id: str
    feedback: AdaptFeedback | None
    module: TargetModule | None

    def __init__(self, input_embedding: Any, output_embedding: Any, quality: float) -> None:
        x = _vector(input_embedding, "input_embedding")
        y = _vector(output_embedding, "output_embedding")
        q = check_quality(quality)
        _init(self, x, y, q, None, None, 0.0, 0, "", None, None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TrainingSample is immutable; use the with_* methods")

    def _replace(self, **changes: Any) -> TrainingSample:
        values = {n: getattr(self, n) for n in _FIELDS}
        values.update(changes)
        twin = object.__new__(TrainingSample)
        _init(twin, *(values[n] for n in _FIELDS))
        return twin

    def with_query(self, query: str) -> TrainingSample:
        return self._replace(query=check_text(query, "query"))

    def with_response(self, response: str) -> TrainingSample:
        return self._replace(response=check_text(response, "response"))

    def with_latency(self, ms: float) -> TrainingSample:
        return self._replace(latency_ms=check_positive(ms, "ms", allow_zero=True))

    def with_tokens(self, n: int) -> TrainingSample:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if not 0 <= n < 1 << 63:  # the durable log and checkpoints store a 64-bit integer
            raise InvalidInputError(f"n must be in [0, 2**63), got {n}")
        return self._replace(token_count=int(n))

    def with_session(self, session_id: str) -> TrainingSample:
        text = check_text(session_id, "session_id")
        return self._replace(session_id=text)

    def with_module(self, module: TargetModule | str | None) -> TrainingSample:
        """The module this sample's feedback is about (None: every target module). A gradient
        or target in one module's output space must not train the others: the Instant,
        Background and Deep loops all step only this module."""
        return self._replace(module=None if module is None else TargetModule.parse(module))

    def with_feedback(self, feedback: AdaptFeedback) -> TrainingSample:
        if not isinstance(feedback, AdaptFeedback):
            raise TypeError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        return self._replace(feedback=feedback)

    def to_feedback(self) -> AdaptFeedback:
        """The feedback to learn from: the explicit one, else the rated output embedding."""
        if self.feedback is not None:
            return self.feedback
        return AdaptFeedback._validated_output(self.quality, self.output_embedding)

    def __reduce__(self) -> tuple[Any, ...]:
        # __setattr__ refuses the default slot-state protocol, so without this a sample could
        # be neither pickled (sent to a worker process) nor copied with the copy module.
        return (_rebuild, tuple(getattr(self, n) for n in _FIELDS))

    def __repr__(self) -> str:
        fb = "rated output" if self.feedback is None else self.feedback.kind.value
        return (
            f"TrainingSample(in={self.input_embedding.shape[0]}, "
            f"out={self.output_embedding.shape[0]}, quality={self.quality:.3f}, feedback={fb}"
            + ("" if self.module is None else f", module={self.module.value}")
            + ")"
        )


def _init(
    sample: TrainingSample,
    x: np.ndarray,
    y: np.ndarray,
    quality: float,
    query: str | None,
    response: str | None,
    latency_ms: float,
    token_count: int,
    session_id: str,
    feedback: AdaptFeedback | None,
    module: TargetModule | None,
) -> None:
    # The slots' own descriptors: they bypass the immutability guard in __setattr__ at a
    # fraction of the cost of object.__setattr__ (a sample is built per request).
    _SET_X(sample, x)
    _SET_Y(sample, y)
    _SET_QUALITY(sample, quality)
    _SET_QUERY(sample, query)
    _SET_RESPONSE(sample, response)
    _SET_LATENCY(sample, latency_ms)
    _SET_TOKENS(sample, token_count)
    _SET_SESSION(sample, session_id)
    _SET_FEEDBACK(sample, feedback)
    _SET_MODULE(sample, module)


_SET_X, _SET_Y, _SET_QUALITY, _SET_QUERY, _SET_RESPONSE = (
    TrainingSample.__dict__[n].__set__ for n in _FIELDS[:5]
)
_SET_LATENCY, _SET_TOKENS, _SET_SESSION, _SET_FEEDBACK, _SET_MODULE = (
    TrainingSample.__dict__[n].__set__ for n in _FIELDS[5:]
)


def _rebuild(x: np.ndarray, y: np.ndarray, *rest: Any) -> TrainingSample:
    sample = object.__new__(TrainingSample)
    _init(sample, frozen_copy(x), frozen_copy(y), *rest)  # unpickled arrays are writeable
    return sample


def from_vectors(x: np.ndarray, y: np.ndarray, quality: float) -> TrainingSample:
    """A rated sample from float32 vectors whose shapes and quality the caller has checked:
    the per-request path of ``instant_adapt``, which would otherwise check everything twice.
    The arrays are still copied and checked (finiteness, and the input's norm)."""
    sample = object.__new__(TrainingSample)
    _init(sample, _input_copy(x), _copy(y, "output_embedding"), quality,
          None, None, 0.0, 0, "", None, None)  # fmt: skip
    return sample


def _copy(arr: np.ndarray, name: str) -> np.ndarray:
    out = frozen_copy(arr)  # always 1-D C-contiguous float32: the dispatch-free kernel fits
    if not getattr(fast, "all_finite_vec", all_finite)(out):
        raise InvalidInputError(f"{name} contains NaN or inf")
    return out


def _input_copy(arr: np.ndarray) -> np.ndarray:
    """The input embedding's copy, refused as the adapter would refuse it: with NaN or inf, or
    with ‖x‖² beyond ``MAX_INPUT_SQ_NORM`` (every update from it would be zero, and every
    distance the loops take from it inf), in the pass the finiteness check takes anyway."""
    out = frozen_copy(arr)
    status = getattr(fast, "input_status_vec", vec_input_status)(out)
    if status == INPUT_NOT_FINITE:
        raise InvalidInputError("input_embedding contains NaN or inf")
    if status == INPUT_TOO_LARGE:
        raise InvalidInputError(
            "input_embedding is finite but too large: ‖x‖² is above 1e38, "
            "where float32 cannot hold it and no update could learn from it"
        )
    return out


def _vector(value: Any, name: str) -> np.ndarray:
    arr = as_f32(value, name)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise InvalidInputError(f"{name} must be a non-empty vector, got shape {arr.shape}")
    return _input_copy(arr) if name == "input_embedding" else _copy(arr, name)
