"""Bringing your own embedder, with the synchronous engine.

sona embeds text only when you hand it text (``instant_adapt(query, response, quality)``). The
default embedder hashes words and character n-grams; any object with an
``embed(text, dim) -> np.ndarray`` method can replace it — a sentence-transformer, your LLM's
own hidden states, or, here, a small keyword embedder that maps known words to fixed random
directions, so that requests about the same thing land close together.

The synchronous ``SonaLlm`` runs the same loop logic as ``SonaRuntime`` but is driven by the
caller: ``instant_adapt`` applies one update now, ``maybe_background`` consolidates when the
interval has passed, ``deep_optimize`` replays what it kept. Deterministic given a seed.

Run it as is: ``python examples/custom_embedder.py``; it exits 0.
"""

from __future__ import annotations

import hashlib
import re
import sys

import numpy as np

from sona import Embedder, MicroLoraConfig, SonaLlm, SonaLlmConfig, TargetModule

DIM = 96
MODULE = TargetModule.Q_PROJ


class KeywordEmbedder:
    """Each word is a fixed pseudo-random direction (seeded by a stable hash of the word); a
    text is the normalised sum of its words. Stable across processes, unlike ``hash()``."""

    def __init__(self, stopwords: frozenset[str] = frozenset({"the", "a", "my", "is", "to"})):
        self.stopwords = stopwords

    def embed(self, text: str, dim: int) -> np.ndarray:
        vec = np.zeros(dim, np.float64)
        for word in re.findall(r"\w+", text.lower()):
            if word in self.stopwords:
                continue
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            vec += np.random.default_rng(seed).standard_normal(dim)
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm else vec).astype(np.float32)


def main() -> int:
    embedder = KeywordEmbedder()
    assert isinstance(embedder, Embedder)  # the protocol sona checks at construction
    clock = [0.0]  # a manual clock: the engine's Background interval runs on it
    engine = SonaLlm(
        SonaLlmConfig(
            instant_lr=0.05,
            background_min_samples=8,
            micro_lora=MicroLoraConfig.for_hidden_dim(DIM, rank=2, target_modules=(MODULE,)),
        ),
        embedder=embedder,
        seed=0,
        clock=lambda: clock[0],
    )
    good = "open settings then choose reset password"
    pairs = [
        ("how do I reset my password", good, 0.95),
        ("reset password please", good, 0.9),
        ("I forgot my password", good, 0.85),
        ("how do I reset my password", "contact the sales team", 0.1),
        ("password reset link", good, 0.9),
    ]
    for round_ in range(20):
        for query, response, quality in pairs:
            result = engine.instant_adapt(query, response, quality)
            if round_ == 0:
                print(f"{query!r} -> {response!r} q={quality}: applied={result.applied} "
                      f"in {result.latency_us:.1f} µs")  # fmt: skip
        clock[0] += 0.1  # 100 ms pass: the Background loop may consolidate
        engine.maybe_background()
    deep = engine.deep_optimize()
    print(
        f"deep run: {deep.samples_used} samples, {deep.epochs} epochs, installed={deep.installed}"
    )

    query = embedder.embed("how can I reset the password", DIM)
    wanted = embedder.embed(good, DIM)
    delta = engine.forward(query, MODULE)
    cos = float(delta @ wanted) / (np.linalg.norm(delta) * np.linalg.norm(wanted) + 1e-12)
    print(f"a new phrasing of the question: its delta points toward the good answer, cos {cos:.2f}")
    stats = engine.stats()
    print(f"instant {stats.instant_count}, skipped {stats.skipped_count}, "
          f"background {stats.background_count}, deep {stats.deep_count}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
