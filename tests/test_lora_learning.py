"""MicroLoRA really learns: each feedback form lifts a measured held-out quality.

World (tests/world.py): frozen random linear base, hidden rank-2 correction, unit-norm inputs,
d = 256, quality = held-out cosine between output and ideal output mapped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest
from world import LinearWorld

from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule

Q = TargetModule.Q_PROJ
D = 256


def _adapter(seed: int, **overrides: object) -> MicroLoRA:
    cfg = MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q,), **overrides)
    return MicroLoRA(cfg, seed=seed)


def test_target_feedback_reaches_097_within_5000_updates() -> None:
    world = LinearWorld.make(d=D, seed=0)
    lora = _adapter(0)
    base = world.adapter_quality(lora)
    assert base == pytest.approx(0.83, abs=0.01)
    for x in world.inputs(5000):
        assert lora.adapt(x, AdaptFeedback.from_quality(1.0).with_target(world.target_delta(x)))
        assert lora.apply_updates(0.05)
    assert world.adapter_quality(lora) >= 0.97


def test_group_feedback_improves_by_003_within_10000_inputs() -> None:
    world = LinearWorld.make(d=D, seed=1)
    lora = _adapter(1)
    base = world.adapter_quality(lora)
    for x in world.inputs(10_000):
        current = lora.forward(x, Q)
        sd = 0.5 * world.base_rms(x[None])
        outs = current + sd * world.rng.standard_normal((4, D)).astype(np.float32)
        qs = world.rate(np.repeat(x[None], 4, axis=0), outs)
        assert lora.adapt(x, AdaptFeedback.from_group(outs, qs))
        assert lora.apply_updates(0.3)
    assert world.adapter_quality(lora) >= base + 0.03


@pytest.mark.slow
def test_quality_only_with_exploration_improves_mean_of_three_seeds() -> None:
    gains = []
    for seed in range(3):
        world = LinearWorld.make(d=D, seed=seed)
        lora = _adapter(seed, explore_std=2.0)
        base = world.adapter_quality(lora)
        for x in world.inputs(30_000):
            y = lora.forward(x, Q, explore=True)
            q = float(world.rate(x[None], y[None])[0])
            if lora.adapt(x, AdaptFeedback.from_quality(q)):
                assert lora.apply_updates(0.03)
        gains.append(world.adapter_quality(lora) - base)
    assert float(np.mean(gains)) >= 0.01, gains


def test_quality_only_without_exploration_is_declined_and_changes_nothing() -> None:
    world = LinearWorld.make(d=D, seed=2)
    lora = _adapter(2)
    before = [arr.tobytes() for _, a, bt in lora.iter_factors() for arr in (a, bt)]
    x = world.inputs(1)[0]
    lora.forward(x, Q)  # a plain forward is not exploration
    assert lora.adapt(x, AdaptFeedback.from_quality(0.9)) is False
    assert lora.last_note is not None and "explore" in lora.last_note
    assert lora.pending_updates == 0
    after = [arr.tobytes() for _, a, bt in lora.iter_factors() for arr in (a, bt)]
    assert before == after


def test_exploration_noise_is_regenerated_not_a_fresh_draw() -> None:
    """The rating of an explored output steps along exactly the noise that was added."""
    lora = _adapter(3)
    world = LinearWorld.make(d=D, seed=3)
    x = world.inputs(1)[0]
    clean = lora.forward(x, Q)
    noise = lora.forward(x, Q, explore=True) - clean
    # seed the baseline, then rate x's exploration above it: B moves along h ⊗ noise
    seed_x = world.inputs(1)[0]
    lora.forward(seed_x, Q, explore=True)
    assert lora.adapt(seed_x, AdaptFeedback.from_quality(0.5)) is False  # baseline seeded
    lora.forward(x, Q, explore=True)
    assert lora.adapt(x, AdaptFeedback.from_quality(0.9), Q)
    _, g_bt = lora.gradients(Q)
    direction = g_bt.sum(axis=0)
    cos = float(np.dot(direction, noise) / (np.linalg.norm(direction) * np.linalg.norm(noise)))
    assert abs(cos) > 0.999


@pytest.mark.parametrize("form", ["target", "group"])
def test_large_input_norm_does_not_diverge(form: str) -> None:
    """Inputs of norm 50 with the same settings: clipping keeps every step bounded."""
    world = LinearWorld.make(d=D, seed=4)
    lora = _adapter(4)
    n = 3000
    for x in world.inputs(n, norm=50.0):
        if form == "target":
            fb = AdaptFeedback.from_quality(1.0).with_target(world.target_delta(x))
            lr = 0.05
        else:
            current = lora.forward(x, Q)
            sd = 0.5 * world.base_rms(x[None])
            outs = current + sd * world.rng.standard_normal((4, D)).astype(np.float32)
            fb = AdaptFeedback.from_group(outs, world.rate(np.repeat(x[None], 4, axis=0), outs))
            lr = 0.3
        lora.adapt(x, fb)
        lora.apply_updates(lr)
    for _, a, bt in lora.iter_factors():
        assert np.isfinite(a).all() and np.isfinite(bt).all()
    held = world.held_out * 50.0
    q = world.quality_of(lora.forward(held, Q), held)
    assert np.isfinite(q)
    assert q >= world.quality_of(np.zeros_like(held), held) - 0.02
