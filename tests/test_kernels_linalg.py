"""The Background loop's dense linear algebra kernels against numpy's LAPACK."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sona.kernels import linalg as k_linalg

from sona.linalg import principal_directions

F32 = np.float32


def _rows(seed: int, n: int, d: int, rank: int | None = None, dtype: type = F32) -> np.ndarray:
    """n rows of width d, of the given rank (full by default), some with large norms."""
    rng = np.random.default_rng(seed)
    r = min(n, d) if rank is None else rank
    z = rng.standard_normal((n, r)) @ rng.standard_normal((r, d))
    z *= np.exp(rng.uniform(-2, 2, n))[:, None]
    return np.ascontiguousarray(z, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 14), d=st.integers(1, 40))
def test_gram_matches_numpy(seed: int, n: int, d: int) -> None:
    for dtype in (F32, np.float64):
        z = _rows(seed, n, d, dtype=dtype)
        out = np.empty((n, n))
        k_linalg.gram(z, out)
        want = z.astype(np.float64) @ z.astype(np.float64).T
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        assert np.array_equal(out, out.T)


def _check_eig(a: np.ndarray) -> None:
    n = a.shape[0]
    w = np.empty(n)
    vt = np.empty((n, n))
    assert k_linalg.sym_eig(a, w, vt)
    want = np.linalg.eigvalsh(a)
    scale = max(float(np.abs(want).max()), 1e-300)
    np.testing.assert_allclose(w, want, atol=1e-11 * scale)
    assert np.all(np.diff(w) >= 0)
    np.testing.assert_allclose(vt @ vt.T, np.eye(n), atol=1e-11)
    np.testing.assert_allclose(vt.T @ np.diag(w) @ vt, a, atol=1e-10 * scale)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), rank=st.integers(0, 30))
def test_sym_eig_matches_numpy_on_gram_matrices_of_any_rank(seed: int, n: int, rank: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, min(rank, n))) if rank else np.zeros((n, 1))
    _check_eig(z @ z.T)


def test_sym_eig_on_repeated_and_indefinite_spectra() -> None:
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    for w in ([1.0] * 9, [2.0, 2.0, 2.0, -1.0, -1.0, 0.0, 0.0, 5.0, 1e-9], list(range(-4, 5))):
        _check_eig(q @ np.diag(w) @ q.T)
    _check_eig(np.zeros((4, 4)))
    _check_eig(np.array([[3.0]]))


def test_sym_eig_reports_non_finite_input() -> None:
    a = np.eye(5)
    a[2, 1] = a[1, 2] = np.nan
    assert not k_linalg.sym_eig(a, np.empty(5), np.empty((5, 5)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), n=st.integers(1, 12), d=st.integers(1, 40))
def test_combine_rows_is_a_matrix_product(seed: int, k: int, n: int, d: int) -> None:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, n))
    c[rng.random((k, n)) < 0.2] = 0.0
    for dtype in (F32, np.float64):
        z = _rows(seed, n, d, dtype=dtype)
        out = np.empty((k, d))
        k_linalg.combine_rows(c, z, out)
        np.testing.assert_allclose(out, c @ z.astype(np.float64), rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 10),
    extra=st.integers(0, 40),
    rank=st.integers(0, 10),
)
def test_householder_qr_reconstructs_with_orthonormal_q(
    seed: int, k: int, extra: int, rank: int
) -> None:
    d = k + extra
    m = _rows(seed, k, d, rank=min(rank, k), dtype=np.float64) if rank else np.zeros((k, d))
    q = np.empty((k, d))
    r = np.empty((k, k))
    k_linalg.householder_rows(m.copy(), q, r)
    scale = max(float(np.abs(m).max()), 1.0)
    np.testing.assert_allclose(q.T @ r, m.T, atol=1e-12 * scale)
    np.testing.assert_allclose(q @ q.T, np.eye(k), atol=1e-12)
    assert not np.tril(r, -1).any()
    # the same R as LAPACK's up to the sign of each row
    _, r_np = np.linalg.qr(m.T)
    np.testing.assert_allclose(np.abs(r), np.abs(r_np), atol=1e-10 * scale)


@pytest.mark.parametrize("tail", [1e-7, 1e-8, 1e-9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_householder_qr_is_accurate_for_rows_nearly_along_the_axes(
    tail: float, sign: float
) -> None:
    """A column already almost along its axis is the case where a reflector built with the
    wrong sign cancels (v = x − ‖x‖·e₁ loses every digit): the QR must stay as accurate as
    for any other input."""
    k, d = 3, 6
    rng = np.random.default_rng(1)
    m = np.eye(k, d) * sign + tail * rng.standard_normal((k, d))
    q = np.empty((k, d))
    r = np.empty((k, k))
    k_linalg.householder_rows(m.copy(), q, r)
    np.testing.assert_allclose(q.T @ r, m.T, atol=1e-14)
    np.testing.assert_allclose(q @ q.T, np.eye(k), atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), rank=st.integers(0, 12))
def test_jacobi_svd_matches_numpy(seed: int, n: int, rank: int) -> None:
    rng = np.random.default_rng(seed)
    r = min(rank, n)
    a = rng.standard_normal((n, r)) @ rng.standard_normal((r, n)) if r else np.zeros((n, n))
    u = np.empty((n, n))
    s = np.empty(n)
    v = np.empty((n, n))
    assert k_linalg.jacobi_svd(a, u, s, v)
    want = np.linalg.svd(a, compute_uv=False)
    scale = max(float(want[0]), 1.0)
    np.testing.assert_allclose(s, want, atol=1e-12 * scale)
    np.testing.assert_allclose(u @ np.diag(s) @ v.T, a, atol=1e-12 * scale)
    np.testing.assert_allclose(v.T @ v, np.eye(n), atol=1e-12)
    big = s > 1e-9 * scale
    np.testing.assert_allclose(u[:, big].T @ u[:, big], np.eye(int(big.sum())), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), e=st.integers(-450, 450))
@example(seed=0, n=4, e=300)  # α·β of two columns overflows float64
@example(seed=0, n=4, e=-300)  # and underflows
def test_jacobi_svd_at_any_magnitude(seed: int, n: int, e: int) -> None:
    """A scaled by 2**e (exact) has singular values scaled by 2**e, from 2**-450 to 2**450:
    the merge's core reaches ~1e82 from float32 factors (tiny adapter scaling, huge weights)
    and ~1e-90 from the smallest ones."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    u = np.empty((n, n))
    s = np.empty(n)
    v = np.empty((n, n))
    assert k_linalg.jacobi_svd(np.ldexp(a, e), u, s, v)
    np.testing.assert_allclose(np.ldexp(s, -e), np.linalg.svd(a, compute_uv=False), rtol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.ldexp(u * s @ v.T, -e), a, atol=1e-12)


@pytest.mark.parametrize(
    "a",
    [
        [[1e100, 1e-60], [0.0, 1e-60]],
        [[1e100, 1e-60, 0.0], [0.0, 1e-60, 1.0], [1.0, 0.0, 1e-50]],
    ],
)
def test_jacobi_svd_of_columns_far_apart_in_size(a: list[list[float]]) -> None:
    """Columns 1e100 and 1e-60 long, not orthogonal: ζ² of their rotation overflows, yet the
    sweeps converge to the singular values, the smallest ones included."""
    m = np.array(a)
    n = m.shape[0]
    u = np.empty((n, n))
    s = np.empty(n)
    v = np.empty((n, n))
    assert k_linalg.jacobi_svd(m, u, s, v)
    np.testing.assert_allclose(s, np.linalg.svd(m, compute_uv=False), rtol=1e-10)
    np.testing.assert_allclose(u * s @ v.T, m, rtol=0.0, atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(n), atol=1e-12)


def _principal_reference(
    z: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The former numpy implementation: eigh of the weighted Gram matrix."""
    z = z.astype(np.float64)
    if weights is not None:
        z = z * np.sqrt(np.maximum(weights, 0.0))[:, None]
    ev, u = np.linalg.eigh(z @ z.T)
    order = np.argsort(ev)[::-1]
    ev, u = ev[order], u[:, order]
    keep = ev > max(float(ev[0]), 0.0) * 1e-12
    ev, u = ev[keep], u[:, keep]
    return ev, (u.T @ z) / np.sqrt(ev)[:, None]  # (0, d) when nothing is kept


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 20),
    d=st.integers(21, 60),
    rank=st.integers(1, 20),
    weighted=st.booleans(),
    top=st.one_of(st.none(), st.integers(0, 8)),
    tall=st.booleans(),  # n >= d: the SVD branch
)
def test_principal_directions_match_the_numpy_reference(
    seed: int, n: int, d: int, rank: int, weighted: bool, top: int | None, tall: bool
) -> None:
    if tall:
        n, d = d, n
    z = _rows(seed, n, d, rank=min(rank, n, d))
    rng = np.random.default_rng(seed + 1)
    weights = rng.uniform(-0.2, 2.0, n) if weighted else None
    ev, vt = principal_directions(z, top=top, weights=weights)
    want_ev, want_vt = _principal_reference(z, weights)
    if want_ev.size == 0:  # every weight <= 0: no direction
        assert ev.size == 0 and vt.shape == (0, d)
        return
    np.testing.assert_allclose(ev, want_ev, rtol=1e-9, atol=1e-9 * want_ev[0])
    t = len(want_ev) if top is None else min(top, len(want_ev))
    assert vt.shape == (t, d)
    # the same unit directions up to sign, where the spectrum separates them from each other
    # and from round-off (both sides form them from the Gram matrix: an eigenvalue near
    # eps·ev[0] gives a direction neither computes accurately)
    gaps = np.abs(np.diff(want_ev)) > 1e-6 * want_ev[0]
    for i in range(t):
        clear = (i == 0 or gaps[i - 1]) and (i == len(want_ev) - 1 or gaps[i])
        if clear and want_ev[i] > 1e-8 * want_ev[0]:
            dot = abs(float(vt[i] @ want_vt[i]))
            assert dot == pytest.approx(1.0, abs=1e-6)
