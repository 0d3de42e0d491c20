"""Rated outputs (``with_output``) learn through their ratings, not just their vectors.

Most rated outputs are junk and a few are good answers; advantage-weighted regression must pull
toward the good ones (DESIGN.md: "good answers pull hard, poor ones pull little"), so it beats
the same regression with every rating equal, which can only average good and junk.
"""

from __future__ import annotations

import numpy as np
from world import LinearWorld

from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule

Q = TargetModule.Q_PROJ
D = 64


def train(world: LinearWorld, *, use_ratings: bool, steps: int = 800) -> float:
    lora = MicroLoRA(MicroLoraConfig.for_hidden_dim(D, target_modules=(Q,)), seed=0)
    rng = np.random.default_rng(0)
    xs = np.random.default_rng(1).standard_normal((steps, D)).astype(np.float32)
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    for x in xs:
        target = world.target_delta(x)
        size = float(np.linalg.norm(target)) / np.sqrt(D)
        if rng.random() < 0.3:
            y = target + 0.1 * size * rng.standard_normal(D).astype(np.float32)
        else:
            y = size * rng.standard_normal(D).astype(np.float32)
        q = float(world.rate(x[None], y[None])[0]) if use_ratings else 0.5
        assert lora.adapt(x, AdaptFeedback.from_quality(q).with_output(y))
        assert lora.apply_updates(0.1)
    return world.adapter_quality(lora)


def test_ratings_steer_rated_output_regression_toward_good_answers() -> None:
    world = LinearWorld.make(d=D, seed=0)
    base = world.quality_of(np.zeros((world.held_out.shape[0], D), np.float32))
    rated = train(world, use_ratings=True)
    unrated = train(world, use_ratings=False)
    assert rated >= base + 0.04, (base, rated)
    assert rated >= unrated + 0.02, (rated, unrated)
