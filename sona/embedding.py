"""Turning text into vectors: a pluggable ``Embedder`` and a dependency-free default.

The default hashes word uni/bi-grams and character 3/4-grams into a signed, L2-normalised
vector. The hash is BLAKE2b, not Python's or Numba's string hash: those are salted per process,
so the same text would give a different vector in every process (and every restart would
silently invalidate what was learned).

Text is compared as Unicode text, not as code points: it is brought to canonical composed form
(NFC) and case-folded first, so the same words typed with precomposed or combining accents, or
in upper and lower case (``straße`` and ``STRASSE`` too), give the same vector. Compatibility
forms stay distinct (full-width ``ｈｅｌｌｏ`` is not ``hello``, a ``ﬁ`` ligature is kept only by
case folding's own expansion to ``fi``), as do different scripts for the same word.

A word is a letter, digit or underscore followed by any of those, combining marks (accents,
the vowel signs of Indic scripts) and the zero-width (non-)joiners that Persian and Indic
scripts write inside words. Everything else separates words and is otherwise ignored:
punctuation, symbols, emoji, whitespace, other zero-width and control characters, NUL.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from typing import Protocol, runtime_checkable

import numpy as np

from sona.errors import InvalidInputError


def _combining_marks() -> str:
    """The combining marks (categories Mn, Mc, Me) as a regex character class body.

    Python's ``\\w`` leaves them out, which would cut ``हिन्दी`` into single consonants and a
    decomposed ``café`` into ``cafe``. Marks live in planes 0, 1 and 14 only; scanning those
    takes ~10 ms at import, against ~100 ms for all of Unicode.
    """
    codes = [
        c
        for c in (*range(0x20000), *range(0xE0000, 0xE1000))
        if unicodedata.category(chr(c)).startswith("M")
    ]
    ranges: list[tuple[int, int]] = []
    for c in codes:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    return "".join(
        re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}"
        for lo, hi in ranges
    )


_WORD = re.compile(f"\\w[\\w{_combining_marks()}\u200c\u200d]*")

#: Words handled at once: bounds the feature strings held in memory for a long text.
_CHUNK_WORDS = 8192
#: Digests of recently seen features; frequent words and character n-grams are hashed once.
_CACHE_SIZE = 1 << 16
#: Longer features are hashed every time: the cache would keep each one, and with it as much
#: as a whole text (a 1 MB token, times ``_CACHE_SIZE``), while words that long rarely repeat.
_CACHE_MAX_LEN = 64
_digest_cache: dict[str, int] = {}


def _digest(feature: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little", signed=False
    )


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps text to a float32 vector of a requested width."""

    def embed(self, text: str, dim: int) -> np.ndarray: ...


class HashingEmbedder:
    """Deterministic feature hashing of word and character n-grams.

    Each feature lands in one of ``dim`` buckets with a sign taken from the same digest, so
    collisions cancel in expectation; the result is normalised to unit length. Text without a
    word (empty, whitespace, punctuation or emoji only) gives the zero vector, and only such
    text: where the signed features of a text cancel exactly (a small width), it gets its
    normalised unsigned counts instead. Texts that share words and spellings get nearby
    vectors.

    Text longer than ``max_chars`` is refused: embedding costs 0.5-1.5 µs per character on the
    caller's thread (the event loop's, in ``SonaRuntime``), so a runaway input would stall every
    request behind it; truncate long texts, or raise the limit, deliberately.
    """

    def __init__(
        self,
        *,
        char_ngrams: tuple[int, ...] = (3, 4),
        word_ngrams: int = 2,
        max_chars: int = 1_000_000,
    ) -> None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int):
            raise TypeError(f"max_chars must be an int, got {type(max_chars).__name__}")
        if max_chars < 1:
            raise InvalidInputError(f"max_chars must be >= 1, got {max_chars}")
        self.char_ngrams = char_ngrams
        self.word_ngrams = word_ngrams
        self.max_chars = max_chars

    def words(self, text: str) -> list[str]:
        """The words of ``text`` after canonical composition and case folding."""
        # NFD first: case folding is defined on decomposed text (Unicode's canonical caseless
        # match); NFC after it puts precomposed and combining spellings in one form. Both are
        # no-ops at C speed for ASCII text.
        folded = unicodedata.normalize("NFD", text).casefold()
        return _WORD.findall(unicodedata.normalize("NFC", folded))

    def features(self, text: str) -> list[str]:
        """Every feature of ``text``, repeats included, in the order they are hashed."""
        words = self.words(text)
        return self._features(words, 0, len(words))

    def _features(self, words: list[str], lo: int, hi: int) -> list[str]:
        """Features of ``words[lo:hi]``: n-grams starting there may read words beyond ``hi``."""
        part = words[lo:hi]
        feats = [f"w:{w}" for w in part]
        for n in range(2, self.word_ngrams + 1):
            end = min(hi, len(words) - n + 1)
            feats += [f"w{n}:" + " ".join(words[i : i + n]) for i in range(lo, end)]
        for w in part:
            padded = f"<{w}>"
            for n in self.char_ngrams:
                feats += [f"c:{padded[i : i + n]}" for i in range(len(padded) - n + 1)]
        return feats

    def embed(self, text: str, dim: int) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim < 1:
            raise InvalidInputError(f"dim must be >= 1, got {dim}")
        if len(text) > self.max_chars:
            raise InvalidInputError(
                f"text has {len(text):,} characters, more than max_chars={self.max_chars:,}: "
                "truncate it, or build the HashingEmbedder with a larger max_chars"
            )
        words = self.words(str.__str__(text))  # a str subclass's own methods are not consulted
        vec = self._hashed(words, int(dim), signed=True)
        norm = float(np.linalg.norm(vec))
        if norm == 0.0 and words:
            # Every bucket's signed features cancelled exactly: common at tiny widths (a quarter
            # of one-word texts at width 1), and still possible at 8. The text has words, so it
            # must not pass for one without any (an input nothing can be learned from); unsigned
            # counts cannot cancel. Only such texts change, every other vector stays as it was.
            vec = self._hashed(words, int(dim), signed=False)
            norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            return np.zeros(int(dim), np.float32)
        return (vec / norm).astype(np.float32)

    def _hashed(self, words: list[str], dim: int, *, signed: bool) -> np.ndarray:
        """The bucket sums of every feature of ``words``, each with its digest's sign or not."""
        vec = np.zeros(dim, np.float64)
        for lo in range(0, len(words), _CHUNK_WORDS):
            # Each distinct feature is hashed once and weighted by its count: the sums are of
            # small integers, exact in float64, so the vector does not depend on the chunking.
            counts = Counter(self._features(words, lo, lo + _CHUNK_WORDS))
            digests = np.fromiter(map(_cached_digest, counts), np.uint64, len(counts))
            weights = np.fromiter(counts.values(), np.float64, len(counts))
            buckets = (digests % np.uint64(dim)).astype(np.intp)
            if signed:
                weights = np.where((digests >> np.uint64(63)) == 1, -weights, weights)
            vec += np.bincount(buckets, weights=weights, minlength=dim)
        return vec


def _cached_digest(feature: str) -> int:
    if len(feature) > _CACHE_MAX_LEN:
        return _digest(feature)
    digest = _digest_cache.get(feature)
    if digest is None:
        if len(_digest_cache) >= _CACHE_SIZE:
            _digest_cache.clear()  # cheaper than LRU bookkeeping on every hit
        digest = _digest_cache[feature] = _digest(feature)
    return digest
