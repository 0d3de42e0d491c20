"""MicroLoRA.adapt: the gradient each feedback form accumulates, and when it declines.

Each form's objective is written down in DESIGN.md; the accumulated (dA, dBt) are compared with
a float64 reference (times the per-sample normalisation 1 / max(‖x‖², 1)), and the reference
itself with finite differences of that objective.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import (
    Q,
    Snapshot,
    V,
    config,
    f64,
    ref_forward,
    ref_grads,
    step_weight,
    trained,
    vec,
)

from sona.errors import InvalidInputError, UnknownModuleError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig


def fb(q: float) -> AdaptFeedback:
    return AdaptFeedback.from_quality(q)


def assert_grads(lora: MicroLoRA, module: Any, da: np.ndarray, dbt: np.ndarray) -> None:
    ga, gb = lora.gradients(module)
    for got, want in ((ga, da), (gb, dbt)):
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-30)


def test_reference_gradients_are_the_derivatives_of_the_supervised_loss() -> None:
    """Finite differences of ½·q·‖s·Btᵀ·A·x − y‖², so the reference cannot share a mistake."""
    rng = np.random.default_rng(0)
    a, bt = rng.standard_normal((2, 5)), rng.standard_normal((2, 4))
    x, y, s, q = rng.standard_normal(5), rng.standard_normal(4), 1.7, 0.6

    def loss(a_: np.ndarray, bt_: np.ndarray) -> float:
        r = ref_forward(a_, bt_, s, x) - y
        return 0.5 * q * float(r @ r)

    g = q * (ref_forward(a, bt, s, x) - y)
    da, dbt = ref_grads(a, bt, s, x, g)
    eps = 1e-6
    for arr, grad in ((a, da), (bt, dbt)):
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss(a, bt)
            arr[idx] = old - eps
            down = loss(a, bt)
            arr[idx] = old
            assert (up - down) / (2 * eps) == pytest.approx(grad[idx], rel=1e-6, abs=1e-8)


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    rank=st.integers(1, 6),
    q=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    checkpointing=st.booleans(),
)
def test_target_feedback_accumulates_the_supervised_gradient(
    n_in: int, n_out: int, rank: int, q: float, seed: int, checkpointing: bool
) -> None:
    rank = min(rank, n_in, n_out)
    cfg = config(n_in, n_out, rank, alpha=3.0, gradient_checkpointing=checkpointing)
    lora = trained(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    x, y = vec(rng, n_in), vec(rng, n_out)
    assert lora.adapt(x, fb(q).with_target(y)) is True
    assert lora.pending_updates == 1 and lora.last_note is None
    for m in (Q, V):
        a, bt = lora.factors(m)
        g = q * step_weight(x) * (ref_forward(a, bt, cfg.scaling, x) - y)
        assert_grads(lora, m, *ref_grads(a, bt, cfg.scaling, x, g))


def test_gradient_feedback_applies_the_hosts_gradient_and_sums_over_samples() -> None:
    cfg = config(rank=3)
    lora = trained(cfg)
    rng = np.random.default_rng(1)
    total_a, total_bt = np.zeros((3, 12)), np.zeros((3, 10))
    a, bt = lora.factors(V)
    for i in range(4):
        x, g = vec(rng, 12), vec(rng, 10)
        assert lora.adapt(x, fb(0.1 * i).with_gradient(g), V)  # quality does not scale it
        da, dbt = ref_grads(a, bt, cfg.scaling, x, step_weight(x) * g)
        total_a += da
        total_bt += dbt
        assert lora.pending_updates == i + 1
    assert_grads(lora, V, total_a, total_bt)
    assert not np.any(lora.gradients(Q)[0]) and not np.any(lora.gradients(Q)[1])


def test_gradient_of_residual_equals_target_with_full_quality() -> None:
    cfg = config()
    one, two = trained(cfg), trained(cfg)
    rng = np.random.default_rng(2)
    x, y = vec(rng, 12), vec(rng, 10)
    one.adapt(x, fb(1.0).with_target(y), Q)
    two.adapt(x, fb(0.3).with_gradient(two.forward(x, Q) - y), Q)
    for got, want in zip(two.gradients(Q), one.gradients(Q), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_target_with_zero_quality_learns_nothing() -> None:
    lora = trained(config())
    rng = np.random.default_rng(3)
    assert lora.adapt(vec(rng, 12), fb(0.0).with_target(vec(rng, 10)))
    for m in (Q, V):
        assert not any(np.any(g) for g in lora.gradients(m))


def test_first_steps_move_only_b() -> None:
    """B starts at zero, so dA = s·(Bt·g)·xᵀ is zero until B has moved."""
    lora = MicroLoRA(config(), seed=0)
    rng = np.random.default_rng(4)
    lora.adapt(vec(rng, 12), fb(1.0).with_target(vec(rng, 10)))
    ga, gb = lora.gradients(Q)
    assert not np.any(ga) and np.any(gb)


def test_rated_output_is_advantage_weighted_regression() -> None:
    cfg = config(advantage_temperature=0.5, advantage_cap=5.0)
    lora = trained(cfg)
    rng = np.random.default_rng(5)
    a, bt = lora.factors(Q)

    def expected_weight(q: float) -> float:
        b = lora.baseline
        if b.count == 0:
            return 1.0
        z = (q - b.mean) / max(math.sqrt(b.var), 1e-4)
        return min(math.exp(min(z / 0.5, 50.0)), 5.0)

    lora.baseline.load({"count": 20.0, "mean": 0.5, "var": 0.04})
    for q in (0.5, 0.6, 0.9, 0.1, 1.0):
        w = expected_weight(q)
        x, y = vec(rng, 12), vec(rng, 10)
        lora.clear_gradients()
        count = lora.baseline.count
        assert lora.adapt(x, fb(q).with_output(y), Q)
        g = w * step_weight(x) * (ref_forward(a, bt, cfg.scaling, x) - y)
        assert_grads(lora, Q, *ref_grads(a, bt, cfg.scaling, x, g))
        assert lora.baseline.count == count + 1  # the rating joins the baseline after use
    assert expected_weight(1.0) == 5.0  # the cap was exercised


def test_rated_outputs_right_after_the_first_do_not_overflow() -> None:
    """Two ratings in: the spread is ~0, so z-scores reach thousands; the weight is just capped."""
    lora = trained(config())
    rng = np.random.default_rng(6)
    x = vec(rng, 12)
    assert lora.adapt(x, fb(0.5).with_output(vec(rng, 10)))
    assert lora.adapt(x, fb(0.9).with_output(vec(rng, 10)))
    assert lora.adapt(x, fb(0.0).with_output(vec(rng, 10)))
    assert lora.pending_updates == 3
    for m in (Q, V):
        assert all(np.isfinite(g).all() for g in lora.gradients(m))


def test_group_feedback_regresses_toward_its_pull_target() -> None:
    cfg = config()
    lora = trained(cfg)
    rng = np.random.default_rng(7)
    x = vec(rng, 12)
    outs = rng.standard_normal((4, 10)).astype(np.float32)
    group = AdaptFeedback.from_group(outs, [0.1, 0.9, 0.4, 0.5])
    assert group.vector is not None
    assert lora.adapt(x, group, V)
    a, bt = lora.factors(V)
    g = step_weight(x) * (ref_forward(a, bt, cfg.scaling, x) - f64(group.vector))
    assert_grads(lora, V, *ref_grads(a, bt, cfg.scaling, x, g))
    assert lora.baseline.count == 0  # the group is its own baseline


def test_gradient_checkpointing_gives_bit_identical_gradients() -> None:
    plain = trained(config(dropout=0.3))
    ckpt = trained(config(dropout=0.3, gradient_checkpointing=True))
    rng = np.random.default_rng(8)
    for _ in range(3):
        x, y = vec(rng, 12), vec(rng, 10)
        plain.adapt(x, fb(0.8).with_target(y))
        ckpt.adapt(x, fb(0.8).with_target(y))
    for m in (Q, V):
        for got, want in zip(ckpt.gradients(m), plain.gradients(m), strict=True):
            assert np.array_equal(got, want)


def test_dropout_masks_the_training_input_only() -> None:
    p, n_in = 0.4, 4000
    cfg = MicroLoraConfig(in_features=n_in, out_features=8, rank=2, dropout=p)
    lora = trained(cfg, seed=9)
    rng = np.random.default_rng(9)
    x = vec(rng, n_in) + 2.0  # no zeros of its own
    y = vec(rng, 8)
    dw = lora.delta_weight(Q).astype(np.float64)
    np.testing.assert_allclose(lora.forward(x, Q), dw @ x, rtol=1e-4, atol=1e-4)  # inference
    lora.adapt(x, fb(1.0).with_target(y), Q)
    ga, gb = lora.gradients(Q)
    kept = ga[0] != 0
    assert abs(1.0 - float(np.mean(kept)) - p) < 0.03
    # dA = u·x_dropᵀ with x_drop = mask·x/(1 − p): rebuild x_drop and check both gradients
    x_drop = np.where(kept, x / (1.0 - p), 0.0)
    a, bt = lora.factors(Q)
    g = step_weight(x_drop) * (ref_forward(a, bt, cfg.scaling, x_drop) - y)
    da, dbt = ref_grads(a, bt, cfg.scaling, x_drop, g)
    np.testing.assert_allclose(ga, da, rtol=2e-3, atol=1e-4 * np.abs(da).max())
    np.testing.assert_allclose(gb, dbt, rtol=2e-3, atol=1e-4 * np.abs(dbt).max())


def test_dropout_masks_are_deterministic_per_seed_and_change_per_step() -> None:
    cfg = MicroLoraConfig(in_features=256, out_features=8, rank=2, dropout=0.5)
    x, y = np.ones(256, np.float32), np.ones(8, np.float32)
    masks = []
    for _ in range(2):
        lora = trained(cfg, seed=10)
        lora.adapt(x, fb(1.0).with_target(y), Q)
        first = lora.gradients(Q)[0][0] != 0
        lora.clear_gradients()
        lora.adapt(x, fb(1.0).with_target(y), Q)
        masks.append((first, lora.gradients(Q)[0][0] != 0))
    assert np.array_equal(masks[0][0], masks[1][0]) and np.array_equal(masks[0][1], masks[1][1])
    assert not np.array_equal(masks[0][0], masks[0][1])
    other = trained(cfg, seed=11)
    other.adapt(x, fb(1.0).with_target(y), Q)
    assert not np.array_equal(other.gradients(Q)[0][0] != 0, masks[0][0])


@pytest.mark.parametrize("w", [0.0, 0.25, 3.0])
def test_sample_weight_scales_the_gradient_linearly(w: float) -> None:
    one, weighted = trained(config()), trained(config())
    rng = np.random.default_rng(14)
    for _ in range(2):
        x, y = vec(rng, 12), vec(rng, 10)
        one.adapt(x, fb(0.8).with_output(y))
        weighted.adapt(x, fb(0.8).with_output(y), weight=w)
    assert weighted.pending_updates == 2
    assert weighted.baseline.state() == one.baseline.state()
    for m in (Q, V):
        for got, ref in zip(weighted.gradients(m), one.gradients(m), strict=True):
            np.testing.assert_allclose(got, w * f64(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w", [-0.5, float("nan"), float("inf"), "1"])
def test_invalid_sample_weight_raises_and_changes_nothing(w: Any) -> None:
    lora = trained(config())
    before = Snapshot.of(lora)
    with pytest.raises((InvalidInputError, TypeError), match="weight"):
        lora.adapt(np.ones(12, np.float32), fb(0.5).with_target(np.ones(10)), weight=w)
    assert Snapshot.of(lora) == before


# ---------------------------------------------------------------------------- quality only


def test_quality_only_without_exploration_is_declined_with_a_note() -> None:
    lora = trained(config())
    before = Snapshot.of(lora)
    assert lora.adapt(np.ones(12, np.float32), fb(0.9)) is False
    assert lora.last_note is not None and "explore" in lora.last_note
    lora.last_note = before.note
    assert Snapshot.of(lora) == before
    assert lora.baseline.count == 0


def test_first_rated_exploration_only_seeds_the_baseline() -> None:
    lora = trained(config(n_out=32))
    x = np.ones(12, np.float32)
    lora.forward(x, Q, explore=True)
    assert lora.adapt(x, fb(0.7)) is False
    assert lora.last_note is not None and "baseline" in lora.last_note
    assert lora.pending_updates == 0
    assert (lora.baseline.count, lora.baseline.mean) == (1, 0.7)
    assert lora.adapt(x, fb(0.9)) is False  # the exploration was used up
    assert lora.last_note is not None and "explore" in lora.last_note


@pytest.mark.parametrize("q", [0.9, 0.2])
def test_quality_after_exploration_is_a_reinforce_step_on_the_same_noise(q: float) -> None:
    cfg = config(n_out=64)
    lora = trained(cfg)
    lora.baseline.load({"count": 50.0, "mean": 0.5, "var": 0.01})
    adv = (q - 0.5) / 0.1
    x = vec(np.random.default_rng(11), 12)
    noise = lora.forward(x, V, explore=True).astype(np.float64) - lora.forward(x, V)
    assert lora.adapt(x, fb(q)) is True  # module None: finds the module that explored
    assert lora.pending_updates == 1 and lora.last_note is None
    a, bt = lora.factors(V)
    da, dbt = ref_grads(a, bt, cfg.scaling, x, -adv * step_weight(x) * noise)
    np.testing.assert_allclose(lora.gradients(V)[0], da, rtol=1e-3, atol=1e-4 * np.abs(da).max())
    np.testing.assert_allclose(lora.gradients(V)[1], dbt, rtol=1e-3, atol=1e-4 * np.abs(dbt).max())
    assert not any(np.any(g) for g in lora.gradients(Q))
    # a good rating pulls the output toward the explored one, a poor one pushes it away
    before = lora.forward(x, V).astype(np.float64)
    assert lora.apply_updates(1e-3, max_norm=None)
    moved = lora.forward(x, V) - before
    assert np.sign(float(moved @ noise)) == np.sign(adv)
    assert lora.adapt(x, fb(q)) is False  # each exploration is rated once


def test_explorations_are_remembered_within_a_bounded_window() -> None:
    lora = trained(config(n_in=4, n_out=4))
    lora.baseline.load({"count": 5.0, "mean": 0.5, "var": 0.01})
    xs = np.random.default_rng(12).standard_normal((4097, 4)).astype(np.float32)
    lora.forward(xs, Q, explore=True)
    assert lora.adapt(xs[0], fb(0.9)) is False  # the oldest was forgotten
    assert lora.adapt(xs[1], fb(0.9)) is True
    assert lora.adapt(xs[4096], fb(0.9)) is True


# ---------------------------------------------------------------------------- bad input


def bad_calls() -> list[tuple[str, Any, Any, Any, type]]:
    ok_x = np.ones(12, np.float32)
    nan_x = ok_x.copy()
    nan_x[3] = np.nan
    tgt = fb(0.5).with_target(np.ones(10))
    return [
        ("feedback type", ok_x, 0.5, None, TypeError),
        ("feedback type", ok_x, None, Q, TypeError),
        ("x", nan_x, tgt, None, InvalidInputError),
        ("x", nan_x, fb(0.5), None, InvalidInputError),
        ("x", nan_x, fb(0.5).with_output(np.ones(10)), None, InvalidInputError),
        ("x", np.full(12, 3e38, np.float32), tgt, None, InvalidInputError),  # h overflows
        ("x", np.ones(13, np.float32), tgt, None, InvalidInputError),
        ("x", np.ones((2, 12), np.float32), tgt, None, InvalidInputError),
        ("x", np.ones(12, complex), tgt, None, TypeError),
        ("target", ok_x, fb(0.5).with_target(np.ones(9)), None, InvalidInputError),
        ("output", ok_x, fb(0.5).with_output(np.ones(11)), None, InvalidInputError),
        ("grad", ok_x, fb(0.5).with_gradient(np.ones(3)), Q, InvalidInputError),
        ("module", ok_x, tgt, "k_proj", UnknownModuleError),
        ("module", ok_x, tgt, 7, TypeError),
    ]


@pytest.mark.parametrize(("what", "x", "feedback", "module", "error"), bad_calls())
def test_adapt_rejects_bad_input_and_changes_nothing(
    what: str, x: Any, feedback: Any, module: Any, error: type
) -> None:
    lora = trained(config(dropout=0.2))
    lora.baseline.load({"count": 3.0, "mean": 0.4, "var": 0.01})
    rng = np.random.default_rng(13)
    lora.adapt(vec(rng, 12), fb(0.5).with_target(vec(rng, 10)))  # some pending state
    x_row = np.ones(12, np.float32)
    lora.forward(x_row, Q, explore=True)
    before = Snapshot.of(lora)
    baseline = lora.baseline.state()
    with pytest.raises(error) as info:
        lora.adapt(x, feedback, module)
    key = what.split()[0]
    assert key in str(info.value) or (key == "feedback" and "feedback" in str(info.value))
    assert Snapshot.of(lora) == before
    assert lora.baseline.state() == baseline
    assert lora.adapt(x_row, fb(0.9), Q) is True  # the exploration is still there
