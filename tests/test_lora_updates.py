"""MicroLoRA.apply_updates and the state helpers around it (clone, reset_b, set_factors).

An update applies the mean accumulated gradient, clipped to max_norm, and is published only if
every weight stays finite and delta_weight cannot overflow; otherwise the weights stay bit-
identical, the gradient is discarded and last_note says why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_reference import (
    Q,
    Snapshot,
    V,
    config,
    f64,
    trained,
    vec,
    weights_bytes,
)

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA

F32_MAX = float(np.finfo(np.float32).max)


def target(q: float, y: np.ndarray) -> AdaptFeedback:
    return AdaptFeedback.from_quality(q).with_target(y)


def accumulate(lora: MicroLoRA, n: int, seed: int = 0, scale: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        assert lora.adapt(vec(rng, lora.config.in_features), target(1.0, vec(rng, 10, scale)))


def grads64(lora: MicroLoRA) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    return {m: (f64(lora.gradients(m)[0]), f64(lora.gradients(m)[1])) for m in lora.modules}


def factors64(lora: MicroLoRA) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    return {m: (f64(a), f64(bt)) for m, a, bt in lora.iter_factors()}


def total_norm(grads: dict[Any, tuple[np.ndarray, np.ndarray]]) -> float:
    return math.sqrt(sum(float(np.sum(ga**2) + np.sum(gb**2)) for ga, gb in grads.values()))


@pytest.mark.parametrize("n", [1, 3])
def test_apply_steps_along_the_mean_gradient(n: int) -> None:
    lora = trained(config(rank=3))
    accumulate(lora, n)
    g, w = grads64(lora), factors64(lora)
    norm = total_norm(g) / n
    assert norm < 1e3  # no clipping with max_norm=None below
    version = lora.version
    assert lora.apply_updates(0.01, max_norm=None) is True
    assert lora.pending_updates == 0 and lora.last_note is None
    assert lora.version == version + 1
    assert lora.last_update_norm == pytest.approx(norm, rel=1e-6)
    for m, a, bt in lora.iter_factors():
        np.testing.assert_allclose(a, w[m][0] - 0.01 * g[m][0] / n, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bt, w[m][1] - 0.01 * g[m][1] / n, rtol=1e-5, atol=1e-6)
        ga, gb = lora.gradients(m)
        assert not ga.any() and not gb.any()


def test_clipping_scales_the_step_to_max_norm() -> None:
    lora = trained(config())
    accumulate(lora, 2, scale=50.0)
    g, w = grads64(lora), factors64(lora)
    norm = total_norm(g) / 2
    max_norm = norm / 7.0
    assert lora.apply_updates(0.5, max_norm=max_norm)
    assert lora.last_update_norm == pytest.approx(max_norm, rel=1e-6)
    moved = math.sqrt(
        sum(
            float(np.sum((f64(a) - w[m][0]) ** 2) + np.sum((f64(bt) - w[m][1]) ** 2))
            for m, a, bt in lora.iter_factors()
        )
    )
    assert moved == pytest.approx(0.5 * max_norm, rel=1e-3)
    for m, a, _ in lora.iter_factors():  # the direction is the gradient's
        np.testing.assert_allclose(
            a, w[m][0] - 0.5 * (max_norm / norm) * g[m][0] / 2, rtol=1e-4, atol=1e-6
        )


def test_default_max_norm_is_one_and_small_steps_are_not_clipped() -> None:
    big = trained(config())
    accumulate(big, 1, scale=1e3)
    assert total_norm(grads64(big)) > 1.0
    assert big.apply_updates(0.1)
    assert big.last_update_norm == pytest.approx(1.0, rel=1e-6)
    small = trained(config())
    rng = np.random.default_rng(0)
    grad = AdaptFeedback.from_quality(1.0).with_gradient(vec(rng, 10, 0.01))
    assert small.adapt(vec(rng, 12), grad)
    norm = total_norm(grads64(small))
    assert 0 < norm < 1.0
    assert small.apply_updates(0.1)
    assert small.last_update_norm == pytest.approx(norm, rel=1e-6)


def test_nothing_to_apply_is_declined_with_a_note() -> None:
    lora = trained(config())
    before = weights_bytes(lora)
    version = lora.version
    assert lora.apply_updates(0.1) is False
    assert lora.last_note is not None and "nothing" in lora.last_note
    assert weights_bytes(lora) == before and lora.version == version


@pytest.mark.parametrize(
    ("kw", "error", "name"),
    [
        ({"learning_rate": 0.0}, InvalidInputError, "learning_rate"),
        ({"learning_rate": -0.1}, InvalidInputError, "learning_rate"),
        ({"learning_rate": float("nan")}, InvalidInputError, "learning_rate"),
        ({"learning_rate": float("inf")}, InvalidInputError, "learning_rate"),
        ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
        ({"learning_rate": True}, TypeError, "learning_rate"),
        ({"learning_rate": None}, TypeError, "learning_rate"),
        ({"learning_rate": 0.1, "max_norm": 0.0}, InvalidInputError, "max_norm"),
        ({"learning_rate": 0.1, "max_norm": -1.0}, InvalidInputError, "max_norm"),
        ({"learning_rate": 0.1, "max_norm": float("nan")}, InvalidInputError, "max_norm"),
        ({"learning_rate": 0.1, "max_norm": "1"}, TypeError, "max_norm"),
    ],
)
def test_invalid_step_arguments_raise_and_keep_the_pending_gradient(
    kw: dict[str, Any], error: type, name: str
) -> None:
    lora = trained(config())
    accumulate(lora, 2)
    before = Snapshot.of(lora)
    with pytest.raises(error, match=name):
        lora.apply_updates(**kw)
    assert Snapshot.of(lora) == before
    assert lora.apply_updates(0.1)  # the gradient is still there


def assert_rejected(lora: MicroLoRA, before: Snapshot, words: str) -> None:
    assert lora.last_note is not None and words in lora.last_note, lora.last_note
    after = Snapshot.of(lora)
    assert after.exported == before.exported  # weights, version, baseline: bit-identical
    assert after.version == before.version
    assert after.pending == 0
    assert all(not np.frombuffer(b, np.float32).any() for pair in after.grads for b in pair)


def test_a_non_finite_accumulated_gradient_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    lora = MicroLoRA(config(), seed=0)  # B = 0: u stays 0, dBt = h·gᵀ is large but finite
    a = lora.factors(Q)[0]
    x = a[0] / np.linalg.norm(a[0])  # unit norm: no per-sample normalisation, h[0] = s·‖A₀‖
    g = np.full(10, 3e38, np.float32)
    for _ in range(4):
        assert lora.adapt(x, AdaptFeedback.from_quality(1.0).with_gradient(g))
    assert not np.isfinite(lora.gradients(Q)[1]).all()  # the sum overflowed
    before = Snapshot.of(lora)
    assert lora.apply_updates(0.1) is False
    assert_rejected(lora, before, "not finite")
    assert capsys.readouterr() == ("", "")  # the library never prints


def test_an_update_that_would_make_weights_non_finite_is_rejected() -> None:
    lora = trained(config())
    accumulate(lora, 1, scale=1e3)
    assert np.isfinite(lora.gradients(Q)[1]).all()
    before = Snapshot.of(lora)
    assert lora.apply_updates(1e38, max_norm=None) is False
    assert_rejected(lora, before, "non-finite")


def test_an_update_that_would_overflow_delta_weight_is_rejected() -> None:
    cfg = config(n_in=12, n_out=64)
    lora = MicroLoRA(cfg, seed=0)
    x = vec(np.random.default_rng(1), 12)
    h = cfg.scaling * f64(lora.factors(Q)[0]) @ x
    step = 1.0 / max(float(x @ x), 1.0)
    # one unclipped step sets Bt = -lr·step·h·gᵀ: largest entry 1e38, finite, but
    # s·‖A‖·‖Bt‖ is far beyond float32's range
    c = 1e38 / (float(np.max(np.abs(h))) * step)
    fb = AdaptFeedback.from_quality(1.0).with_gradient(np.full(64, c / 1e10, np.float32))
    assert lora.adapt(x, fb, Q)
    before = Snapshot.of(lora)
    assert lora.apply_updates(1e10, max_norm=None) is False
    assert_rejected(lora, before, "overflow")
    # the same gradient at a sane scale is accepted: the check is not vacuous
    assert lora.adapt(x, fb, Q)
    assert lora.apply_updates(1.0, max_norm=None) is True
    dw = lora.delta_weight(Q)
    assert np.isfinite(dw).all() and dw.any()


@pytest.mark.parametrize("side", [0, 1], ids=["A", "Bt"])
def test_an_update_that_shrinks_an_adapter_near_the_bound_is_accepted(side: int) -> None:
    """The overflow check is on the weights the update leaves, A − step·dA and Bᵀ − step·dBᵀ:
    an adapter at 0.6 of float32's max whose step takes one factor to zero ends with no delta,
    while the same step taken the other way (that factor doubled) would pass the max."""
    cfg = config(n_in=1, n_out=1, rank=1, modules=(Q,), alpha=1.0)
    lora = MicroLoRA(cfg, seed=0)
    small, large = 1e10, 0.6 * F32_MAX / 1e10
    start = [small, large] if side == 0 else [large, small]
    lora.set_factors(Q, *(np.full((1, 1), w, np.float32) for w in start))
    fb = AdaptFeedback.from_quality(1.0).with_gradient(np.ones(1, np.float32))
    assert lora.adapt(np.ones(1, np.float32), fb, Q)
    grad = f64(lora.gradients(Q)[side])[0, 0]
    assert grad > 0.0
    assert lora.apply_updates(small / grad, max_norm=None), lora.last_note
    after = [f64(w)[0, 0] for w in lora.factors(Q)]
    assert abs(after[side]) < 1e-3 * small
    assert after[1 - side] == pytest.approx(large, rel=1e-5)
    assert np.abs(lora.delta_weight(Q)).max() < 1e-3 * 0.6 * F32_MAX


def test_delta_weight_stays_finite_when_only_the_scale_brings_it_into_range() -> None:
    """With s < 1, an accepted update can leave B·A beyond float32 while s·B·A fits."""
    cfg = config(n_in=1, n_out=1, rank=1, modules=(Q,), alpha=0.25)
    lora = next(
        lo
        for lo in (MicroLoRA(cfg, seed=k) for k in range(100))
        if abs(lo.factors(Q)[0][0, 0]) > 1.5
    )
    a = f64(lora.factors(Q)[0])
    fb = AdaptFeedback.from_quality(1.0).with_gradient(np.array([1e30], np.float32))
    assert lora.adapt(np.ones(1, np.float32), fb, Q)
    # one unclipped step sets Bᵀ to 0.9 of float32's maximum: |a·Bᵀ| > max > |s·a·Bᵀ|
    lr = 0.9 * float(np.finfo(np.float32).max) / abs(float(lora.gradients(Q)[1][0, 0]))
    assert lora.apply_updates(lr, max_norm=None), lora.last_note
    bt = f64(lora.factors(Q)[1])
    assert abs(bt[0, 0] * a[0, 0]) > np.finfo(np.float32).max
    dw = lora.delta_weight(Q)
    assert np.isfinite(dw).all()
    np.testing.assert_allclose(dw, cfg.scaling * bt.T @ a, rtol=1e-6)
    assert np.isfinite(lora.forward(np.ones(1, np.float32), Q)).all()


def test_after_a_rejection_the_adapter_learns_normally() -> None:
    lora = trained(config())
    accumulate(lora, 1, scale=1e3)
    assert not lora.apply_updates(1e38, max_norm=None)
    accumulate(lora, 2, seed=5)
    expected = grads64(lora)
    w = factors64(lora)
    assert lora.apply_updates(0.01, max_norm=None)
    for m, a, _ in lora.iter_factors():
        np.testing.assert_allclose(a, w[m][0] - 0.01 * expected[m][0] / 2, rtol=1e-5, atol=1e-7)


def test_mean_is_over_samples_even_when_they_touch_different_modules() -> None:
    lora = trained(config())
    rng = np.random.default_rng(2)
    lora.adapt(vec(rng, 12), target(1.0, vec(rng, 10)), Q)
    lora.adapt(vec(rng, 12), target(1.0, vec(rng, 10)), V)
    assert lora.pending_updates == 2
    g, w = grads64(lora), factors64(lora)
    assert lora.apply_updates(0.01, max_norm=None)
    for m, a, bt in lora.iter_factors():
        np.testing.assert_allclose(a, w[m][0] - 0.01 * g[m][0] / 2, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(bt, w[m][1] - 0.01 * g[m][1] / 2, rtol=1e-5, atol=1e-7)


def test_supervised_steps_descend_the_loss() -> None:
    lora = trained(config(n_in=12, n_out=10))
    rng = np.random.default_rng(3)
    x, y = vec(rng, 12), vec(rng, 10)

    def loss() -> float:
        r = lora.forward(x, Q).astype(np.float64) - y
        return float(r @ r)

    start = loss()
    for _ in range(20):  # small steps: each one is a descent step
        before = loss()
        lora.adapt(x, target(1.0, y), Q)
        assert lora.apply_updates(1e-3)
        assert loss() < before
    for _ in range(2000):
        lora.adapt(x, target(1.0, y), Q)
        assert lora.apply_updates(0.05)
    assert loss() < 1e-3 * start


# ---------------------------------------------------------------------------- state helpers


def test_clear_gradients_keeps_weights() -> None:
    lora = trained(config())
    accumulate(lora, 3)
    before = weights_bytes(lora)
    lora.clear_gradients()
    assert lora.pending_updates == 0 and weights_bytes(lora) == before
    assert all(not g.any() for m in lora.modules for g in lora.gradients(m))
    assert lora.apply_updates(0.1) is False


def test_reset_b_zeroes_the_delta_and_keeps_a() -> None:
    lora = trained(config())
    accumulate(lora, 1)
    a_before = [a.copy() for _, a, _ in lora.iter_factors()]
    version = lora.version
    lora.reset_b()
    assert lora.version == version + 1 and lora.pending_updates == 0
    for (m, a, bt), a0 in zip(lora.iter_factors(), a_before, strict=True):
        assert np.array_equal(a, a0) and not bt.any()
        assert not lora.delta_weight(m).any()


def test_set_factors_replaces_one_module_and_validates() -> None:
    lora = trained(config(rank=2))
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 12))
    bt = rng.standard_normal((2, 10))
    v_before = [x.copy() for x in lora.factors(V)]
    version = lora.version
    lora.set_factors(Q, a, bt)
    assert lora.version == version + 1
    np.testing.assert_array_equal(lora.factors(Q)[0], a.astype(np.float32))
    np.testing.assert_array_equal(lora.factors(Q)[1], bt.astype(np.float32))
    assert all(np.array_equal(x, y) for x, y in zip(lora.factors(V), v_before, strict=True))
    a[0, 0] = 99.0  # a copy was taken
    assert lora.factors(Q)[0][0, 0] != 99.0
    before = Snapshot.of(lora)
    nan_a = np.ones((2, 12))
    nan_a[1, 3] = np.nan
    for bad_a, bad_bt, error, reason in (
        (np.ones((3, 12)), bt, InvalidInputError, "shapes"),
        (np.ones((2, 12)), np.ones((2, 11)), InvalidInputError, "shapes"),
        (nan_a, bt, InvalidInputError, "NaN or inf"),
        (np.ones((2, 12)), np.full((2, 10), np.inf), InvalidInputError, "NaN or inf"),
        (np.ones((2, 12), complex), bt, TypeError, "real"),
    ):
        with pytest.raises(error, match=reason):  # says what is wrong, not "would overflow"
            lora.set_factors(Q, bad_a, bad_bt)
        assert Snapshot.of(lora) == before


def test_set_factors_refuses_finite_factors_whose_delta_overflows() -> None:
    """Entries of 1e30 are finite, but s·B·A would be inf: forward would return inf for any
    ordinary input. Refused like the import paths refuse them, and nothing changes."""
    lora = trained(config(rank=2))
    accumulate(lora, 1)  # pending gradients must survive the refusal too
    before = Snapshot.of(lora)
    factors_before = [arr.tobytes() for _, a, bt in lora.iter_factors() for arr in (a, bt)]
    huge_a, huge_bt = np.full((2, 12), 1e30, np.float32), np.full((2, 10), 1e30, np.float32)
    for a, bt in ((huge_a, huge_bt), (huge_a, np.full((2, 10), 1e9, np.float32))):
        with pytest.raises(InvalidInputError, match=r"v_proj .*overflow"):
            lora.set_factors(V, a, bt)
        assert Snapshot.of(lora) == before
        assert lora.version == before.version
        after = [arr.tobytes() for _, a, bt in lora.iter_factors() for arr in (a, bt)]
        assert after == factors_before


def test_set_factors_accepts_the_largest_delta_below_float32s_max() -> None:
    """The bound is the one every update keeps, s·‖A‖·‖B‖ < float32's max: one rank-1 term with
    s = 1 puts |a·b| exactly at the largest float32 below the max (accepted, forward finite),
    at the max itself and at twice it (refused)."""
    lora = MicroLoRA(config(n_in=1, n_out=1, rank=1, modules=(Q,), alpha=1.0), seed=0)
    a = np.float32(2.0**64)
    b_max = np.float32(F32_MAX / 2.0**64)  # exact: F32_MAX is a float32 times a power of two
    assert float(a) * float(b_max) == F32_MAX
    b_below = np.nextafter(b_max, np.float32(0.0))
    lora.set_factors(Q, [[a]], [[b_below]])
    version = lora.version
    assert f64(lora.delta_weight(Q))[0, 0] == float(a) * float(b_below) < F32_MAX
    assert np.isfinite(lora.forward(np.ones(1, np.float32), Q)).all()
    before = Snapshot.of(lora)
    for big_a, big_b in ((a, b_max), (2 * a, b_below), (-a, -b_max)):
        with pytest.raises(InvalidInputError, match="q_proj"):
            lora.set_factors(Q, [[big_a]], [[big_b]])
        assert Snapshot.of(lora) == before and lora.version == version


@settings(max_examples=60, deadline=None)
@given(
    a_exp=st.floats(10.0, 25.0),
    b_exp=st.floats(10.0, 25.0),
    module=st.sampled_from([Q, V]),
    seed=st.integers(0, 2**16),
)
@example(a_exp=18.0, b_exp=18.0, module=Q, seed=0)  # fits
@example(a_exp=19.0, b_exp=19.0, module=V, seed=0)  # overflows
def test_set_factors_keeps_the_bound_the_updates_keep(
    a_exp: float, b_exp: float, module: Any, seed: int
) -> None:
    """Accepted exactly when s·‖A‖·‖B‖ < float32's max, and then delta_weight and forward on
    unit inputs stay finite; refused otherwise with every bit and the version unchanged."""
    rng = np.random.default_rng(seed)
    lora = trained(config(rank=2), seed=seed)
    a = (10.0**a_exp * rng.standard_normal((2, 12))).astype(np.float32)
    bt = (10.0**b_exp * rng.standard_normal((2, 10))).astype(np.float32)
    bound = lora.scaling * float(np.linalg.norm(f64(a))) * float(np.linalg.norm(f64(bt)))
    before = Snapshot.of(lora)
    try:
        lora.set_factors(module, a, bt)
    except InvalidInputError as exc:
        assert module.value in str(exc) and "overflow" in str(exc)
        assert bound >= F32_MAX * (1 - 1e-9)
        assert Snapshot.of(lora) == before
        return
    assert bound < F32_MAX * (1 + 1e-9)
    assert lora.version == before.version + 1
    assert np.isfinite(lora.delta_weight(module)).all()
    for x in np.eye(12, dtype=np.float32):
        assert np.isfinite(lora.forward(x, module)).all()


def test_clone_is_an_independent_copy_that_continues_identically() -> None:
    cfg = config(dropout=0.3)
    lora = trained(cfg)
    lora.baseline.load({"count": 4.0, "mean": 0.6, "var": 0.02})
    accumulate(lora, 2)
    lora.apply_updates(0.1)
    accumulate(lora, 1, seed=9)  # pending gradients are not part of a clone
    twin = lora.clone()
    assert twin is not lora and twin.pending_updates == 0
    assert weights_bytes(twin) == weights_bytes(lora)
    assert twin.version == lora.version and twin.seed == lora.seed
    assert twin.baseline.state() == lora.baseline.state()
    lora.clear_gradients()
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    for who, rng in ((lora, rng1), (twin, rng2)):
        for _ in range(3):
            x = vec(rng, 12)
            who.adapt(x, AdaptFeedback.from_quality(0.9).with_output(vec(rng, 10)))
        who.apply_updates(0.1)
    assert weights_bytes(twin) == weights_bytes(lora)  # same dropout masks, same baseline
    twin.reset_b()
    assert lora.delta_weight(Q).any()  # mutating the clone leaves the original alone
