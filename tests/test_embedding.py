"""HashingEmbedder: stable across processes, unit norm, similar texts close, strict types."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sona.embedding import Embedder, HashingEmbedder

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
