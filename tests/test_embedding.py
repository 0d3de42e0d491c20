"""HashingEmbedder: stable across processes, unit norm, similar texts close, strict types."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import tracemalloc
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.embedding import Embedder, HashingEmbedder
from sona.errors import InvalidInputError

TEXTS = [
    "How do I sort a list in Python?",
    "Wie sortiere ich eine Liste? Ünïcödé ✓",
    "rust borrow checker error E0502",
    "a",
]


def _embed_in_subprocess(seed: str, dim: int) -> bytes:
    code = (
        "import sys\n"
        "from sona.embedding import HashingEmbedder\n"
        f"texts = {TEXTS!r}\n"
        "e = HashingEmbedder()\n"
        f"sys.stdout.buffer.write(b''.join(e.embed(t, {dim}).tobytes() for t in texts))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=120
    )
    return out.stdout


def test_same_bytes_in_processes_with_different_hash_seeds() -> None:
    dim = 64
    here = b"".join(HashingEmbedder().embed(t, dim).tobytes() for t in TEXTS)
    assert _embed_in_subprocess("1", dim) == here
    assert _embed_in_subprocess("12345", dim) == here
    # the salted str hash really does differ between those processes, so the check means it
    code = "print(hash('sona'))"
    hashes = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": s},
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        for s in ("1", "12345")
    }
    assert len(hashes) == 2


@pytest.mark.parametrize("dim", [1, 7, 64, 768])
def test_unit_norm_float32_of_the_requested_width(dim: int) -> None:
    e = HashingEmbedder()
    for text in TEXTS:
        v = e.embed(text, dim)
        assert v.shape == (dim,) and v.dtype == np.float32
        assert np.isfinite(v).all()
        if v.any():
            assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-6)
    assert e.embed(TEXTS[0], dim).any()


def test_deterministic_within_a_process_and_independent_of_other_calls() -> None:
    a, b = HashingEmbedder(), HashingEmbedder()
    first = a.embed(TEXTS[0], 128)
    for t in TEXTS:
        b.embed(t, 32)
    np.testing.assert_array_equal(b.embed(TEXTS[0], 128), first)


def test_case_insensitive_and_punctuation_blind() -> None:
    e = HashingEmbedder()
    np.testing.assert_array_equal(
        e.embed("Sort a LIST, please!", 64), e.embed("sort a list please", 64)
    )


def test_similar_texts_are_closer_than_unrelated_ones() -> None:
    e = HashingEmbedder()
    dim = 256
    pairs = [
        ("how do I sort a list in python", "sorting a python list", "best pizza dough recipe"),
        ("reset my account password", "how to reset a password", "weather tomorrow in Paris"),
        ("rust borrow checker errors", "borrow checker error in rust code", "knitting a scarf"),
    ]
    for anchor, similar, unrelated in pairs:
        a, s, u = (e.embed(t, dim) for t in (anchor, similar, unrelated))
        assert float(a @ s) > float(a @ u) + 0.2, (anchor, float(a @ s), float(a @ u))
        assert float(np.linalg.norm(a - s)) < float(np.linalg.norm(a - u))


def test_unrelated_texts_are_nearly_orthogonal() -> None:
    e = HashingEmbedder()
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    vs = np.stack([e.embed(f"{w} {w}x {w}yz", 1024) for w in words])
    gram = vs @ vs.T
    off = gram[~np.eye(len(words), dtype=bool)]
    assert np.abs(off).max() < 0.3


@pytest.mark.parametrize("text", ["", "   ", "!!! ... ???", "\n\t"])
def test_text_without_words_is_the_zero_vector(text: str) -> None:
    v = HashingEmbedder().embed(text, 32)
    assert v.shape == (32,) and v.dtype == np.float32
    assert not v.any()


@pytest.mark.parametrize("bad", [None, b"bytes", 42, ["a", "list"], np.array(["x"])])
def test_non_text_raises_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="str"):
        HashingEmbedder().embed(bad, 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [0, -3])
def test_non_positive_width_raises_value_error(dim: int) -> None:
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder().embed("text", dim)


@pytest.mark.parametrize("dim", [3.0, "8", None])
def test_width_of_the_wrong_type_raises_type_error(dim: object) -> None:
    with pytest.raises(TypeError):
        HashingEmbedder().embed("text", dim)  # type: ignore[arg-type]


def test_is_an_embedder() -> None:
    assert isinstance(HashingEmbedder(), Embedder)


# ---------------------------------------------------------------- Unicode: the same text

_ACCENTED = "Café naïve résumé Ångström Ελληνικά Tiếng Việt"


def test_composed_and_decomposed_spellings_give_the_same_vector() -> None:
    e = HashingEmbedder()
    nfc, nfd = (unicodedata.normalize(f, _ACCENTED) for f in ("NFC", "NFD"))
    assert nfc != nfd
    np.testing.assert_array_equal(e.embed(nfc, 128), e.embed(nfd, 128))


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_canonically_equivalent_texts_give_the_same_vector(text: str) -> None:
    e = HashingEmbedder()
    forms = [unicodedata.normalize(f, text) for f in ("NFC", "NFD")]
    np.testing.assert_array_equal(e.embed(forms[0], 32), e.embed(forms[1], 32))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # vowel signs and virama are marks
        ("می\u200cخواهم", ["می\u200cخواهم"]),  # Persian writes a ZWNJ inside words
        (unicodedata.normalize("NFD", "naïve café"), ["naïve", "café"]),
        ("\u0301 a", ["a"]),  # a mark with nothing to combine with is not a word
    ],
)
def test_combining_marks_stay_inside_their_word(text: str, words: list[str]) -> None:
    assert HashingEmbedder().words(text) == words


def test_case_folding_covers_more_than_lower() -> None:
    e = HashingEmbedder()
    np.testing.assert_array_equal(e.embed("straße", 64), e.embed("STRASSE", 64))
    np.testing.assert_array_equal(e.embed("ΟΔΟΣ", 64), e.embed("οδος", 64))


def test_what_separates_words_and_what_is_ignored() -> None:
    e = HashingEmbedder()
    ref = e.embed("hello world", 64)
    for variant in ("hello\x00world", "hello\u00a0world", "hello\u200bworld", "hello 😀 world"):
        np.testing.assert_array_equal(e.embed(variant, 64), ref)
    assert not e.embed("ｈｅｌｌｏ ｗｏｒｌｄ", 64) @ ref > 0.5  # compatibility forms stay apart
    for nothing in ("😀🎉", "\x00\x01\x7f", "\u200b\u200e", "\u0301"):
        assert not e.embed(nothing, 64).any()


def test_no_mark_lives_outside_the_planes_scanned_for_them() -> None:
    outside = [
        c
        for c in (*range(0x20000, 0xE0000), *range(0xE1000, 0x110000))
        if unicodedata.category(chr(c)).startswith("M")
    ]
    assert outside == []


def test_a_str_subclass_embeds_as_its_text() -> None:
    class Shouting(str):
        def casefold(self) -> str:
            return "something else"

        def lower(self) -> str:
            return "something else"

    e = HashingEmbedder()
    np.testing.assert_array_equal(e.embed(Shouting("Hello there"), 32), e.embed("Hello there", 32))
    np.testing.assert_array_equal(e.embed(np.str_("Hello there"), 32), e.embed("Hello there", 32))


# ---------------------------------------------------------------- long text


def test_text_beyond_max_chars_is_refused_with_the_limit_named() -> None:
    e = HashingEmbedder(max_chars=1000)
    assert e.embed("a" * 1000, 16).any()
    with pytest.raises(InvalidInputError, match="max_chars=1,000"):
        e.embed("a" * 1001, 16)
    with pytest.raises(InvalidInputError, match="max_chars"):
        HashingEmbedder().embed("word " * 200_001, 16)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_bad_max_chars_is_refused(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="max_chars"):
        HashingEmbedder(max_chars=bad)  # type: ignore[arg-type]


def test_long_text_is_counted_in_chunks_with_the_same_result() -> None:
    """Words beyond one chunk (8192) still pair with their neighbours across the boundary."""
    e = HashingEmbedder()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 300, 20_000)]
    expected = np.zeros(97)
    for f in e.features(" ".join(words)):  # one feature at a time, no counting, no chunks
        d = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
        expected[d % 97] += -1.0 if d >> 63 else 1.0
    expected /= np.linalg.norm(expected)
    np.testing.assert_array_equal(e.embed(" ".join(words), 97), expected.astype(np.float32))
    assert "w2:" + " ".join(words[8191:8193]) in e.features(" ".join(words))


def test_bool_width_is_refused() -> None:
    with pytest.raises(TypeError, match="dim"):
        HashingEmbedder().embed("text", True)


def test_memory_kept_between_calls_does_not_grow_with_the_texts_embedded() -> None:
    """Whatever the embedder keeps for later calls must not hold on to the texts themselves:
    a service embedding long, distinct texts (IDs, hex digests, long tokens) would otherwise
    grow by their whole length on every request."""
    e = HashingEmbedder(char_ngrams=())  # word features only: the long words, and fast
    e.embed("warm up", 16)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(200):
            e.embed(f"{i:06d}" + "x" * 50_000 + " tail", 16)  # 200 texts, 10 MB in all
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 1_000_000


@given(st.text(max_size=30), st.integers(1, 8))
@settings(max_examples=500, deadline=None)
def test_text_with_a_word_is_never_the_zero_vector(text: str, dim: int) -> None:
    """Signed buckets can cancel exactly at small widths (at width 1, a quarter of one-word
    texts did); the zero vector is kept for text without words, which is what it documents."""
    v = HashingEmbedder().embed(text, dim)
    if HashingEmbedder().words(text):
        assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-6)
    else:
        assert not v.any()


@pytest.mark.parametrize(("text", "dim"), [("a0", 1), ("p15", 2), ("e56", 3), ("v515", 8)])
def test_words_whose_features_cancel_still_give_a_unit_vector(text: str, dim: int) -> None:
    v = HashingEmbedder().embed(text, dim)
    assert v.dtype == np.float32
    assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-6)


def _reference_features(words: list[str]) -> list[str]:
    """The documented features: words, word bigrams, character 3/4-grams of ``<word>``."""
    feats = [f"w:{w}" for w in words]
    feats += [f"w2:{a} {b}" for a, b in itertools.pairwise(words)]
    for w in words:
        padded = f"<{w}>"
        feats += [f"c:{padded[i : i + n]}" for n in (3, 4) for i in range(len(padded) - n + 1)]
    return feats


@given(st.lists(st.text("abcxyz", min_size=1, max_size=6), max_size=6))
@settings(max_examples=200, deadline=None)
def test_features_are_every_word_bigram_and_padded_character_ngram(words: list[str]) -> None:
    got = HashingEmbedder().features(" ".join(words))
    assert sorted(got) == sorted(_reference_features(words))


def test_word_order_changes_the_vector() -> None:
    """Two words share unigrams and character n-grams in either order: only the bigram of the
    last pair tells "dog bites" from "bites dog"."""
    e = HashingEmbedder()
    assert not np.array_equal(e.embed("dog bites", 64), e.embed("bites dog", 64))


@pytest.mark.parametrize(
    "text", ["\u1f80\u0300", "\u1f80\u0301 word", "\u1f80\u0342", "\u1fb3\u0301"]
)
def test_iota_subscript_folds_alike_in_every_canonically_equivalent_spelling(text: str) -> None:
    """Case folding turns the iota subscript (U+0345) into ι. Folded in a partly composed
    spelling (ᾀ then a grave accent) it would land before the accent, in the decomposed one
    after it; folding the decomposed form gives all spellings one vector."""
    e = HashingEmbedder()
    spellings = [text, *(unicodedata.normalize(f, text) for f in ("NFC", "NFD"))]
    assert len(set(spellings)) > 1
    for other in spellings[1:]:
        assert e.words(other) == e.words(text)
        np.testing.assert_array_equal(e.embed(other, 64), e.embed(text, 64))
