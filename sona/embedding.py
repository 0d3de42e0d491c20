"""Turning text into vectors: a pluggable ``Embedder`` and a dependency-free default.

The default hashes word uni/bi-grams and character 3/4-grams into a signed, L2-normalised
vector. The hash is BLAKE2b, not Python's or Numba's string hash: those are salted per process,
so the same text would give a different vector in every process (and every restart would
silently invalidate what was learned).
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, runtime_checkable

import numpy as np

from sona.errors import InvalidInputError

_WORD = re.compile(r"\w+", re.UNICODE)


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps text to a float32 vector of a requested width."""

    def embed(self, text: str, dim: int) -> np.ndarray: ...


class HashingEmbedder:
    """Deterministic feature hashing of word and character n-grams.

    Each feature lands in one of ``dim`` buckets with a sign taken from the same digest, so
    collisions cancel in expectation; the result is normalised to unit length (zero text gives
    the zero vector). Texts that share words and spellings get nearby vectors.
    """

    def __init__(self, *, char_ngrams: tuple[int, ...] = (3, 4), word_ngrams: int = 2) -> None:
        self.char_ngrams = char_ngrams
        self.word_ngrams = word_ngrams

    def features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        feats = [f"w:{w}" for w in words]
        for n in range(2, self.word_ngrams + 1):
            feats += [f"w{n}:" + " ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        for w in words:
            padded = f"<{w}>"
            for n in self.char_ngrams:
                feats += [f"c:{padded[i : i + n]}" for i in range(len(padded) - n + 1)]
        return feats

    def embed(self, text: str, dim: int) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if dim < 1:
            raise InvalidInputError(f"dim must be >= 1, got {dim}")
        feats = self.features(text)
        if not feats:
            return np.zeros(dim, np.float32)
        digests = np.frombuffer(
            b"".join(hashlib.blake2b(f.encode(), digest_size=8).digest() for f in feats),
            dtype="<u8",
        )
        buckets = (digests % np.uint64(dim)).astype(np.intp)
        signs = np.where((digests >> np.uint64(63)) == 1, -1.0, 1.0)
        vec = np.bincount(buckets, weights=signs, minlength=dim)
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            return np.zeros(dim, np.float32)
        return (vec / norm).astype(np.float32)
