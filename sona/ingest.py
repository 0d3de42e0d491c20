"""Turning what a host passes in (text, embeddings, feedback) into validated samples.

Shared by the synchronous engine and the async runtime so both accept exactly the same input
and reject it with the same errors before any state changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from sona.config import SonaLlmConfig
from sona.embedding import Embedder, HashingEmbedder
from sona.errors import InvalidInputError, UnknownModuleError
from sona.feedback import AdaptFeedback
from sona.lora_config import TargetModule
from sona.sample import TrainingSample, from_vectors
from sona.validation import as_f32, check_quality, check_text

_F32 = np.dtype(np.float32)


class SampleFactory:
    """Builds and checks samples for one configuration."""

    def __init__(self, config: SonaLlmConfig, embedder: Embedder | None) -> None:
        if embedder is not None and not isinstance(embedder, Embedder):
            raise TypeError("embedder must have an embed(text, dim) -> np.ndarray method")
        self.embedder: Embedder = embedder if embedder is not None else HashingEmbedder()
        self._in = config.micro_lora.in_features
        self._out = config.micro_lora.out_features
        self._in_shape = (self._in,)
        self._out_shape = (self._out,)
        self._modules = config.micro_lora.target_modules

    def rated(self, query: Any, response: Any, quality: float) -> TrainingSample:
        """A sample from a rated (query, response) pair: text or embeddings."""
        if (  # embeddings already float32 and of the right shapes: check each thing once
            type(query) is np.ndarray
            and type(response) is np.ndarray
            and query.dtype is _F32
            and response.dtype is _F32
            and query.shape == self._in_shape
            and response.shape == self._out_shape
            and type(quality) is float
            and 0.0 <= quality <= 1.0
        ):
            return from_vectors(query, response, quality)
        q = check_quality(quality)
        x = self._embed(query, "query", self._in)
        y = self._embed(response, "response", self._out)
        sample = TrainingSample(x, y, q)
        if isinstance(query, str):
            sample = sample.with_query(query)
        if isinstance(response, str):
            sample = sample.with_response(response)
        return sample

    def with_feedback(self, x: Any, feedback: AdaptFeedback) -> TrainingSample:
        """A sample carrying explicit feedback (target, gradient, group, quality only)."""
        if not isinstance(feedback, AdaptFeedback):
            raise TypeError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        vec = feedback.vector if feedback.vector is not None else np.zeros(self._out, np.float32)
        if vec.shape != (self._out,):
            raise _shape("feedback vector", self._out, vec.shape)
        x_arr = self._embed(x, "x", self._in)
        return TrainingSample(x_arr, vec, feedback.quality).with_feedback(feedback)

    def check(self, sample: object, module: object = None) -> TrainingSample:
        if not isinstance(sample, TrainingSample):
            raise TypeError(f"sample must be a TrainingSample, got {type(sample).__name__}")
        if sample.input_embedding.shape != (self._in,):
            raise _shape("sample.input_embedding", self._in, sample.input_embedding.shape)
        if sample.output_embedding.shape != (self._out,):
            raise _shape("sample.output_embedding", self._out, sample.output_embedding.shape)
        fb = sample.feedback
        if fb is not None and fb.vector is not None and fb.vector.shape != (self._out,):
            # otherwise the adapter refuses it only after the sample was counted as submitted
            raise _shape(f"sample.feedback {fb.kind.value}", self._out, fb.vector.shape)
        own = sample.module
        if module is not None:
            wanted = TargetModule.parse(module)
            if own is not None and own is not wanted:
                raise InvalidInputError(
                    f"module {wanted.value!r} differs from the sample's module {own.value!r}"
                )
            own = wanted
        if own is not None and own not in self._modules:
            raise UnknownModuleError(f"module {own.value!r} is not targeted by this configuration")
        # the sample names its module from here on, so every loop steps only that module
        return sample if own is sample.module else sample.with_module(own)

    def check_all(self, samples: object) -> list[TrainingSample]:
        """``check`` on each of ``samples``, an iterable of TrainingSample (a Deep run's own
        samples); a single sample, a string or a non-iterable is refused naming the argument
        rather than failing inside the iteration."""
        if isinstance(samples, (str, bytes, TrainingSample)) or not isinstance(samples, Iterable):
            got = type(samples).__name__
            raise TypeError(f"samples must be an iterable of TrainingSample or None, got {got}")
        return [self.check(s) for s in samples]

    def _embed(self, value: Any, name: str, dim: int) -> np.ndarray:
        if isinstance(value, str):
            vec = self.embedder.embed(check_text(value, name), dim)
            arr = as_f32(vec, f"embedding of {name}")
            if arr.shape != (dim,):
                # The caller passed text: the width is the embedder's doing, not theirs.
                embedder = type(self.embedder).__name__
                raise _shape(f"embedding of {name} (from {embedder})", dim, arr.shape)
            return arr
        arr = as_f32(value, name)
        if arr.shape != (dim,):
            raise _shape(name, dim, arr.shape)
        return arr


def _shape(name: str, dim: int, shape: tuple[int, ...]) -> InvalidInputError:
    return InvalidInputError(f"{name} must have shape ({dim},), got {shape}")
