"""EWC++ in ΔW space: kernels against dense numpy references, sketching and folding."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sona.kernels import ewc as k_ewc

from sona.errors import FormatError
from sona.ewc import EwcImportance, InputWindow, covariance_sketch
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule

F32 = np.float32


def _problem(
    seed: int, rank: int, n_in: int, n_out: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(F32)
    bt = rng.standard_normal((rank, n_out)).astype(F32)
    u, _ = np.linalg.qr(rng.standard_normal((n_in, k)))
    ut = np.ascontiguousarray(u.T, dtype=F32)
    c = rng.uniform(0.1, 1.0, k).astype(F32)
    a0 = (a + 0.3 * rng.standard_normal(a.shape)).astype(F32)
    bt0 = (bt + 0.3 * rng.standard_normal(bt.shape)).astype(F32)
    mt = np.asarray((0.5 * bt0.T @ a0 @ u).T, dtype=F32)  # anchor ΔW*·u_j with s = 0.5
    return a, bt, ut, c, np.ascontiguousarray(mt), 0.5


def _dense_penalty(
    a: np.ndarray, bt: np.ndarray, s: float, ut: np.ndarray, c: np.ndarray, mt: np.ndarray
) -> float:
    dw = s * bt.astype(np.float64).T @ a.astype(np.float64)
    resid = dw @ ut.T.astype(np.float64) - mt.T
    return float(np.sum(resid**2 * c))


def _scratch(rank: int, k: int, n_out: int) -> list[np.ndarray]:
    f64 = np.float64
    return [
        np.zeros((rank, k), F32),
        np.zeros((rank, k), F32),
        np.zeros((rank, k), f64),
        np.zeros((rank, rank), f64),
        np.zeros((rank, rank), f64),
        np.zeros((rank, rank), f64),
        np.zeros(rank, f64),
        np.zeros((rank, n_out), F32),
    ]


def _reference_prox(
    a: np.ndarray,
    bt: np.ndarray,
    s: float,
    ut: np.ndarray,
    c: np.ndarray,
    mt: np.ndarray,
    tau: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The same two proximal solves, written densely in float64."""
    a64, bt64, u = a.astype(np.float64), bt.astype(np.float64), ut.astype(np.float64).T
    m = mt.astype(np.float64).T  # (out, k)
    rank = a.shape[0]
    q = a64 @ u
    qn = q.copy()
    for j in range(u.shape[1]):
        lhs = np.eye(rank) + tau * s * s * c[j] * bt64 @ bt64.T
        qn[:, j] = np.linalg.solve(lhs, q[:, j] + tau * s * c[j] * bt64 @ m[:, j])
    a_new = a64 + (qn - q) @ u.T
    lhs = np.eye(rank) + tau * s * s * (qn * c) @ qn.T
    bt_new = np.linalg.solve(lhs, bt64 + tau * s * (qn * c) @ m.T)
    return a_new, bt_new


def test_penalty_of_a_residual_whose_squares_overflow_float32_is_finite_and_exact() -> None:
    """A residual entry of 1e20 is a finite float32, its square is not: the penalty sums in
    float64 and must not report inf for an adapter that is far from, but not beyond, float32."""
    a, bt, ut, c, mt, s = _problem(3, 2, 12, 8, 3)
    mt = (mt + np.float32(1e20)).astype(F32)
    q = np.zeros((2, ut.shape[0]), F32)
    got = k_ewc.penalty(a, bt, s, ut, c, mt, q)
    want = _dense_penalty(a, bt, s, ut, c, mt)
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rank=st.integers(1, 4),
    n_in=st.integers(8, 40),
    n_out=st.integers(4, 40),
    k=st.integers(1, 6),
)
def test_penalty_kernel_matches_dense_reference(
    seed: int, rank: int, n_in: int, n_out: int, k: int
) -> None:
    a, bt, ut, c, mt, s = _problem(seed, rank, n_in, n_out, min(k, n_in))
    q = np.zeros((rank, ut.shape[0]), F32)
    got = k_ewc.penalty(a, bt, s, ut, c, mt, q)
    want = _dense_penalty(a, bt, s, ut, c, mt)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rank=st.integers(1, 4),
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    k=st.integers(1, 18),
)
def test_anchor_kernel_matches_dense_reference(
    seed: int, rank: int, n_in: int, n_out: int, k: int
) -> None:
    a, bt, ut, _, _, s = _problem(seed, rank, n_in, n_out, min(k, n_in))
    q = np.zeros((rank, ut.shape[0]), F32)
    mt = np.full((ut.shape[0], n_out), np.nan, F32)
    k_ewc.anchor(a, bt, s, ut, q, mt)
    dw = s * bt.astype(np.float64).T @ a.astype(np.float64)  # (out, in)
    np.testing.assert_allclose(mt, (dw @ ut.T.astype(np.float64)).T, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rank=st.integers(1, 4),
    n_in=st.integers(8, 40),
    n_out=st.integers(4, 40),
    tau=st.sampled_from([0.01, 0.3, 3.0]),
)
def test_prox_step_matches_dense_reference(
    seed: int, rank: int, n_in: int, n_out: int, tau: float
) -> None:
    a, bt, ut, c, mt, s = _problem(seed, rank, n_in, n_out, min(5, n_in))
    want_a, want_bt = _reference_prox(a, bt, s, ut, c, mt, tau)
    got_a, got_bt = a.copy(), bt.copy()
    after = k_ewc.prox_step(got_a, got_bt, s, ut, c, mt, tau, *_scratch(rank, ut.shape[0], n_out))
    np.testing.assert_allclose(got_a, want_a, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got_bt, want_bt, rtol=1e-3, atol=1e-4)
    assert after == pytest.approx(_dense_penalty(got_a, got_bt, s, ut, c, mt), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("tau", [0.1, 10.0, 1e3, 1e6])
def test_prox_step_never_increases_the_penalty_and_is_stable_for_huge_lambda(tau: float) -> None:
    a, bt, ut, c, mt, s = _problem(3, 2, 48, 32, 6)
    before = _dense_penalty(a, bt, s, ut, c, mt)
    scratch = _scratch(2, 6, 32)
    values = [k_ewc.prox_step(a, bt, s, ut, c, mt, tau, *scratch) for _ in range(50)]
    assert np.isfinite(a).all() and np.isfinite(bt).all()
    assert values[0] < before
    assert all(v2 <= v1 * (1 + 1e-4) + 1e-9 for v1, v2 in itertools.pairwise(values))
    if tau >= 1e3:  # the step approaches the projection onto ΔW·C = ΔW*·C
        assert values[-1] < 1e-4 * before


@pytest.mark.parametrize("tau", [1e12, 1e18, 1e30, 1e300])
def test_prox_step_is_taken_for_collinear_rows_of_b_at_any_lambda(tau: float) -> None:
    """B's rows are collinear after the first updates from B = 0 (each is a multiple of the
    same output gradient), so Bᵀ·B is singular and the r×r systems are I/τ + (rank-one).
    Their second pivot is 1/τ in exact arithmetic but came out as float64 round-off, negative
    once τ passed ~1e15: the step was refused as not finite at every call, so a large λ
    protected nothing."""
    a, bt, ut, c, mt, s = _problem(7, 2, 40, 24, 6)
    bt[1] = 2.0 * bt[0]
    c[4:] = 0.0  # padding directions of the sketch
    a_before = a.copy()
    before = _dense_penalty(a, bt, s, ut, c, mt)
    scratch = _scratch(2, 6, 24)
    values = [k_ewc.prox_step(a, bt, s, ut, c, mt, tau, *scratch) for _ in range(5)]
    assert np.isfinite(a).all() and np.isfinite(bt).all()
    assert min(values) >= 0.0, values
    assert values[0] < before
    assert all(v2 <= v1 * (1 + 1e-4) + 1e-9 for v1, v2 in itertools.pairwise(values))
    assert values[-1] == pytest.approx(_dense_penalty(a, bt, s, ut, c, mt), rel=1e-3, abs=1e-6)
    u = ut.T.astype(np.float64)
    free = np.eye(40) - u @ u.T
    np.testing.assert_allclose(a @ free, a_before @ free, atol=1e-5)


@pytest.mark.parametrize("tau", [1e4, 1e6])
@pytest.mark.parametrize("seed", range(6))
def test_prox_step_matches_the_float64_reference_for_large_nearly_collinear_rows_of_a(
    tau: float, seed: int
) -> None:
    """Large, nearly collinear rows of A (as training with a huge λ leaves them) make the
    B-part's s²·Q·diag(c)·Qᵀ ill-conditioned (eigenvalues ~1e8 apart). Its entries were
    float32 products (Numba's float() keeps float32), and its right-hand side a float32
    difference of terms of size s²·‖Q‖²·‖B‖ whose round-off the solve multiplied by up to τ
    along the small eigenvector: Bᵀ came out up to 100× its norm away from the exact step and
    the penalty rose. The residual here is orthogonal to B's columns, so the A-part has
    nothing to do and the B-part meets exactly this Q."""
    a, bt, ut, c, mt, s = _problem(seed, 2, 40, 24, 6)
    a[1] = 0.5 * a[0] + 1e-4 * a[1]
    a *= 1000.0
    u = ut.T.astype(np.float64)
    fit = s * bt.T.astype(np.float64) @ a.astype(np.float64) @ u  # ΔW·u_j, (out, k)
    basis, _ = np.linalg.qr(bt.T.astype(np.float64))
    off = np.random.default_rng(seed).standard_normal(fit.shape)
    off -= basis @ (basis.T @ off)
    mt = np.ascontiguousarray((fit - off).T, dtype=F32)
    before = _dense_penalty(a, bt, s, ut, c, mt)
    want_a, want_bt = _reference_prox(a, bt, s, ut, c, mt, tau)
    after = k_ewc.prox_step(a, bt, s, ut, c, mt, tau, *_scratch(2, 6, 24))
    assert after <= before
    np.testing.assert_allclose(bt, want_bt, atol=2e-3 * np.abs(want_bt).max())
    np.testing.assert_allclose(a, want_a, atol=1e-4 * np.abs(want_a).max())
    assert after == pytest.approx(_dense_penalty(want_a, want_bt, s, ut, c, mt), rel=1e-3)


def test_prox_step_leaves_unprotected_directions_of_a_alone() -> None:
    a, bt, ut, c, mt, s = _problem(5, 2, 40, 16, 4)
    a_before = a.copy()
    k_ewc.prox_step(a, bt, s, ut, c, mt, 1.0, *_scratch(2, 4, 16))
    u = ut.T.astype(np.float64)
    free = np.eye(40) - u @ u.T  # the complement of the protected directions
    np.testing.assert_allclose(a @ free, a_before @ free, atol=1e-5)


def test_prox_step_refuses_a_non_finite_result_and_writes_nothing() -> None:
    a, bt, ut, c, mt, s = _problem(1, 2, 16, 8, 3)
    mt[0, 0] = np.inf
    a0, bt0 = a.copy(), bt.copy()
    assert k_ewc.prox_step(a, bt, s, ut, c, mt, 1.0, *_scratch(2, 3, 8)) == -1.0
    assert np.array_equal(a, a0) and np.array_equal(bt, bt0)


def test_covariance_sketch_finds_the_top_eigenvectors() -> None:
    rng = np.random.default_rng(0)
    scales = np.array([3.0, 2.0, 1.0, 0.1])
    basis, _ = np.linalg.qr(rng.standard_normal((20, 4)))
    rows = (rng.standard_normal((500, 4)) * scales) @ basis.T
    ut, c = covariance_sketch(rows, 3)
    cov = rows.T @ rows
    w, v = np.linalg.eigh(cov)
    top = v[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(ut @ top), np.eye(3), atol=1e-3)
    np.testing.assert_allclose(c, w[::-1][:3] / w[-1], rtol=1e-4)
    assert c[0] == pytest.approx(1.0)


def test_covariance_sketch_pads_with_zero_weights() -> None:
    rows = np.zeros((10, 8), F32)
    rows[:, 0] = 1.0
    ut, c = covariance_sketch(rows, 4)
    assert c[0] == pytest.approx(1.0) and not c[1:].any() and not ut[1:].any()


def _lora(n: int = 24) -> MicroLoRA:
    cfg = MicroLoraConfig(
        in_features=n, out_features=n, rank=2, target_modules=(TargetModule.Q_PROJ,)
    )
    return MicroLoRA(cfg, seed=0)


def test_fold_protects_old_subspaces_with_gamma_decay() -> None:
    lora = _lora()
    ewc = EwcImportance.for_lora(lora, rank=8, gamma=0.5)
    assert not ewc.active and ewc.penalty(lora) == 0.0
    rng = np.random.default_rng(1)
    first = np.zeros((50, 24), F32)
    first[:, :2] = rng.standard_normal((50, 2))
    second = np.zeros((50, 24), F32)
    second[:, 2:4] = rng.standard_normal((50, 2))
    ewc.fold(lora, first)
    ewc.fold(lora, second)
    assert ewc.active
    cov = ewc.ut.T @ np.diag(ewc.c) @ ewc.ut
    old = np.trace(cov[:2, :2])
    new = np.trace(cov[2:4, 2:4])
    assert new == pytest.approx(2 * old, rel=0.15)  # the first task decayed by gamma = 0.5
    assert abs(cov[4:, 4:]).max() < 1e-6  # directions no task used stay free


def _two_module_lora(n: int = 24) -> MicroLoRA:
    q, v = TargetModule.Q_PROJ, TargetModule.V_PROJ
    cfg = MicroLoraConfig(in_features=n, out_features=n, rank=2, target_modules=(q, v))
    lora = MicroLoRA(cfg, seed=0)
    rng = np.random.default_rng(2)
    for m, a, bt in lora.iter_factors():
        lora.set_factors(m, a, rng.standard_normal(bt.shape).astype(F32))
    return lora


def test_a_step_that_would_not_be_finite_is_reported_and_leaves_that_module_alone() -> None:
    """step promises −1.0 when some module's step would not be finite, so the pipeline says
    the EWC++ step was skipped instead of reporting a penalty for a step not taken."""
    q = TargetModule.Q_PROJ
    lora = _two_module_lora()
    ewc = EwcImportance.for_lora(lora, rank=4, gamma=0.5)
    ewc.fold(lora, np.random.default_rng(3).standard_normal((30, 24)).astype(F32))
    ewc.anchors[q].mt[0, 0] = np.inf
    a0, bt0 = (arr.copy() for arr in lora.factors(q))
    assert ewc.step(lora, 1.0, lora.modules) == -1.0
    a, bt = lora.factors(q)
    assert np.array_equal(a, a0) and np.array_equal(bt, bt0)


def test_load_refuses_negative_importance_and_changes_nothing() -> None:
    """A negative weight in C would turn the penalty into a reward for leaving the anchor."""
    lora = _two_module_lora()
    ewc = EwcImportance.for_lora(lora, rank=4, gamma=0.5)
    ewc.fold(lora, np.random.default_rng(4).standard_normal((30, 24)).astype(F32))
    meta, arrays = ewc.state()
    c_before, ut_before = ewc.c.copy(), ewc.ut.copy()
    arrays["ewc.c"] = arrays["ewc.c"].copy()
    arrays["ewc.c"][1] = -0.5
    with pytest.raises(FormatError, match=r"ewc\.c"):
        ewc.load(meta, arrays)
    assert np.array_equal(ewc.c, c_before) and np.array_equal(ewc.ut, ut_before)


def test_shifting_the_anchor_by_a_change_beyond_float32s_range_keeps_it_exact() -> None:
    """The change of ΔW·u (−3e38 to 3e38) is beyond float32's range; the shifted anchor, the
    later adapter's ΔW·u, is not."""
    m = TargetModule.Q_PROJ
    lora = _lora(4)
    a = np.zeros((2, 4), F32)
    a[0, 0] = 1.0
    bt = np.zeros((2, 4), F32)
    bt[0, :2] = (3e38 / lora.scaling, 1.0)
    before, after = lora.clone(), lora.clone()
    before.set_factors(m, a, -bt)
    after.set_factors(m, a, bt)
    ewc = EwcImportance.for_lora(lora, rank=1, gamma=0.5)
    ewc.ut = np.eye(1, 4, dtype=F32)
    ewc.c = np.ones(1, F32)
    ewc.reanchor(before)
    ewc.shift_anchor(before, after)
    want = lora.scaling * bt[:1].astype(np.float64)  # ΔW·e₀ of ``after``
    np.testing.assert_allclose(ewc.anchors[m].mt, want, rtol=1e-6)


def test_input_window_keeps_the_newest_rows_in_order() -> None:
    w = InputWindow(3, 2)
    for i in range(5):
        w.push(np.full(2, i, F32))
    np.testing.assert_array_equal(w.ordered()[:, 0], [2, 3, 4])
    meta, rows = w.state()
    twin = InputWindow(3, 2)
    twin.load(meta, rows)
    np.testing.assert_array_equal(twin.ordered(), w.ordered())
