"""EWC++ penalty kernels with the importance in ΔW space.

The penalty is P/λ = ‖(ΔW − ΔW*)·C^½‖² with ΔW = s·Bᵀᵀ·A (``bt`` is B transposed) and the
importance sketched as C = Uᵀ·diag(c)·U: ``ut`` holds k orthonormal input directions as rows
(k, in), ``c`` their weights, and ``mt`` (k, out) the anchor ΔW*·u_j of each direction. With
Q = A·Uᵀ (rank, k) the residual on direction j is d_j = s·Σ_r Q[r, j]·Bᵀ[r] − mt[j], so nothing of
size in × in or out × in is ever formed: every kernel costs O(rank·(in + out)·k).

The step is proximal rather than an explicit gradient step, which diverges once η·λ·c > 1:
first the component of A on the protected directions (Q) given B, column by column, then Bᵀ
given the new A, each an r×r solve of (I + τ·H) with τ = 2·η·λ and H >= 0. The solves never
amplify, so any λ is stable; as λ grows the step approaches the exact projection onto
ΔW·C = ΔW*·C.
"""

from __future__ import annotations

import numpy as np
from sona.kernels.jit import inline, kernel

# Smallest Cholesky pivot relative to the matrix's largest diagonal entry (see _cholesky).
_PIVOT_FLOOR = 1e-12


@inline
def _project(a: np.ndarray, ut: np.ndarray, q: np.ndarray) -> None:
    """q[r, j] = A[r]·U[j] for every rank row r and direction j, four directions per pass
    over A's row (each loaded element of it used four times)."""
    rank, n_in = a.shape
    k = ut.shape[0]
    k4 = k - k % 4
    for r in range(rank):
        for j in range(0, k4, 4):
            acc0 = np.float32(0.0)
            acc1 = np.float32(0.0)
            acc2 = np.float32(0.0)
            acc3 = np.float32(0.0)
            for i in range(n_in):
                ai = a[r, i]
                acc0 += ai * ut[j, i]
                acc1 += ai * ut[j + 1, i]
                acc2 += ai * ut[j + 2, i]
                acc3 += ai * ut[j + 3, i]
            q[r, j] = acc0
            q[r, j + 1] = acc1
            q[r, j + 2] = acc2
            q[r, j + 3] = acc3
        for j in range(k4, k):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += a[r, i] * ut[j, i]
            q[r, j] = acc


@inline
def _dots64(m: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[r, j] = m[r]·rows[j] in float64, four rows of ``rows`` per pass over m[r].

    Elements are widened with np.float64, not float(): Numba's float() keeps a float32 a
    float32, so each product would be rounded to float32 before the float64 sum."""
    n_m, n = m.shape
    k = rows.shape[0]
    k4 = k - k % 4
    for r in range(n_m):
        for j in range(0, k4, 4):
            acc0 = 0.0
            acc1 = 0.0
            acc2 = 0.0
            acc3 = 0.0
            for i in range(n):
                mi = np.float64(m[r, i])
                acc0 += mi * np.float64(rows[j, i])
                acc1 += mi * np.float64(rows[j + 1, i])
                acc2 += mi * np.float64(rows[j + 2, i])
                acc3 += mi * np.float64(rows[j + 3, i])
            out[r, j] = acc0
            out[r, j + 1] = acc1
            out[r, j + 2] = acc2
            out[r, j + 3] = acc3
        for j in range(k4, k):
            acc = 0.0
            for i in range(n):
                acc += np.float64(m[r, i]) * np.float64(rows[j, i])
            out[r, j] = acc


@inline
def _cholesky(m: np.ndarray, lower: np.ndarray, floor: float) -> None:
    """lower·lowerᵀ ≈ m for a symmetric r×r ``m`` = floor·I + H, H positive semi-definite.

    Every pivot of such a matrix is at least ``floor`` in exact arithmetic. When H is singular
    (collinear rows of B) and ``floor`` = 1/τ is below H's round-off, the computed pivot was
    noise, negative (a NaN root) or tiny (the right-hand side's round-off along H's null
    space, divided by it, blew the step up). So the floor is raised to ``_PIVOT_FLOOR`` times
    m's largest diagonal entry, and a pivot below half of it is replaced by it: a direction
    H barely constrains is then solved as if slightly more constrained, which only shortens
    the step along it, and (I/τ + H' >= I/τ + H) the penalty still cannot grow. Pivots near
    1/τ, where round-off of either sign is harmless, are left alone, so a well-posed solve is
    unchanged.
    """
    n = m.shape[0]
    big = 0.0
    for i in range(n):
        big = max(big, m[i, i])
    floor = max(floor, _PIVOT_FLOOR * big)
    for i in range(n):
        for j in range(i + 1):
            acc = m[i, j]
            for p in range(j):
                acc -= lower[i, p] * lower[j, p]
            if i == j:
                lower[i, i] = np.sqrt(acc if acc >= 0.5 * floor else floor)
            else:
                lower[i, j] = acc / lower[j, j]
        for j in range(i + 1, n):
            lower[i, j] = 0.0


@inline
def _solve_vec(lower: np.ndarray, v: np.ndarray) -> None:
    """v ← (lower·lowerᵀ)⁻¹·v in place."""
    n = lower.shape[0]
    for i in range(n):
        acc = v[i]
        for p in range(i):
            acc -= lower[i, p] * v[p]
        v[i] = acc / lower[i, i]
    for i in range(n - 1, -1, -1):
        acc = v[i]
        for p in range(i + 1, n):
            acc -= lower[p, i] * v[p]
        v[i] = acc / lower[i, i]


@inline
def _residual_sq(
    bt: np.ndarray, scale: float, c: np.ndarray, mt: np.ndarray, q: np.ndarray, row: np.ndarray
) -> float:
    """Σ_j c_j·‖s·Σ_r q[r, j]·Bᵀ[r] − mt[j]‖² in float64; ``row`` is (out,) float32 scratch,
    so the sum over r runs along whole rows (vectorised) rather than innermost."""
    rank, n_out = bt.shape
    k = mt.shape[0]
    s = np.float32(scale)
    total = 0.0
    for j in range(k):
        cj = c[j]
        if cj == 0.0:
            continue
        for t in range(n_out):
            row[t] = -mt[j, t]
        for r in range(rank):
            f = s * q[r, j]
            for t in range(n_out):
                row[t] += f * bt[r, t]
        acc = 0.0
        for t in range(n_out):
            v = np.float64(row[t])  # float() would keep it float32: v·v could overflow
            acc += v * v
        total += np.float64(cj) * acc
    return total


@kernel
def penalty(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    ut: np.ndarray,
    c: np.ndarray,
    mt: np.ndarray,
    q: np.ndarray,
) -> float:
    """‖(ΔW − ΔW*)·C^½‖² (without λ); ``q`` is (rank, k) scratch."""
    _project(a, ut, q)
    return _residual_sq(bt, scale, c, mt, q, np.empty(bt.shape[1], np.float32))


@kernel
def anchor(
    a: np.ndarray, bt: np.ndarray, scale: float, ut: np.ndarray, q: np.ndarray, mt: np.ndarray
) -> None:
    """mt[j] = ΔW·u_j = s·Σ_r (A·u_j)[r]·Bᵀ[r]: the current delta on each protected direction."""
    _project(a, ut, q)
    rank, n_out = bt.shape
    k = ut.shape[0]
    s = np.float32(scale)
    for j in range(k):
        for t in range(n_out):
            v = np.float32(0.0)
            for r in range(rank):
                v += q[r, j] * bt[r, t]
            mt[j, t] = s * v


@kernel
def prox_step(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    ut: np.ndarray,
    c: np.ndarray,
    mt: np.ndarray,
    tau: float,
    q: np.ndarray,
    dq: np.ndarray,
    w: np.ndarray,
    gram: np.ndarray,
    kmat: np.ndarray,
    lower: np.ndarray,
    vec: np.ndarray,
    bt_new: np.ndarray,
) -> float:
    """One proximal step of τ/2·‖(ΔW − ΔW*)·C^½‖² on A (protected part) then Bᵀ, in place.

    Scratch: q, dq (rank, k) float32; w (rank, k), gram, kmat, lower (rank, rank) and vec
    (rank,) float64; bt_new (rank, out) float32. Each solve is written for the increment,
    (I/τ + H)·Δ = −∇, so no entry grows with τ: in float32, (I + τ·H)·x = rhs would lose every
    significant digit once τ reaches ~1e4. The r×r systems are float64, products included,
    because for large τ a direction H does not constrain has a pivot of only 1/τ.
    Returns the penalty (without λ) after the step, or −1.0 with A and Bᵀ untouched when the
    step would not be finite.
    """
    rank, n_out = bt.shape
    n_in = a.shape[1]
    k = ut.shape[0]
    s = float(scale)
    inv_tau = 1.0 / float(tau)
    _project(a, ut, q)
    # A-part, per direction j: (I/τ + s²·c_j·Bᵀ·B)·Δq_j = −s·c_j·Bᵀ·d_j with the residual
    # d_j = s·Bᵀᵀ·q_j − m_j, and Bᵀ·d_j = s·(Bᵀ·B)·q_j − Bᵀ·m_j.
    _dots64(bt, bt, gram)
    _dots64(bt, mt, w)
    for j in range(k):
        cj = np.float64(c[j])
        if cj == 0.0:
            for r in range(rank):
                dq[r, j] = 0.0
            continue
        for r1 in range(rank):
            grad = -w[r1, j]
            for r2 in range(rank):
                kmat[r1, r2] = s * s * cj * gram[r1, r2]
                grad += s * gram[r1, r2] * np.float64(q[r2, j])
            kmat[r1, r1] += inv_tau
            vec[r1] = -s * cj * grad
        _cholesky(kmat, lower, inv_tau)
        _solve_vec(lower, vec)
        for r in range(rank):
            dq[r, j] = vec[r]
            q[r, j] = q[r, j] + np.float32(vec[r])
    # B-part with the new Q: (I/τ + G)·ΔBᵀ = −s·Σ_j c_j·q_j·d_jᵀ with G = s²·Q·diag(c)·Qᵀ.
    # The solve is applied to the coefficients, not to a float32 right-hand side: with
    # W = s·(I/τ + G)⁻¹·Q·diag(c) (r × k), ΔBᵀ = −s·W·D = −(s·W·Qᵀ)·Bᵀ + W·M, where
    # s·W·Qᵀ = (I/τ + G)⁻¹·G has norm at most 1. Round-off of a right-hand side formed in
    # float32 (a difference of terms of size s²·‖Q‖²·‖B‖) has a component along G's null
    # space, which the solve multiplies by τ; W has none, so nothing is amplified.
    for r1 in range(rank):
        for r2 in range(rank):
            acc = 0.0
            for j in range(k):
                acc += np.float64(c[j]) * np.float64(q[r1, j]) * np.float64(q[r2, j])
            kmat[r1, r2] = s * s * acc
        kmat[r1, r1] += inv_tau
    _cholesky(kmat, lower, inv_tau)
    for j in range(k):
        cj = np.float64(c[j])
        for r in range(rank):
            vec[r] = s * cj * np.float64(q[r, j])
        if cj != 0.0:
            _solve_vec(lower, vec)
        for r in range(rank):
            w[r, j] = vec[r]
    for r1 in range(rank):
        for r2 in range(rank):
            acc = 0.0
            for j in range(k):
                acc += w[r1, j] * np.float64(q[r2, j])
            gram[r1, r2] = s * acc
    for r1 in range(rank):
        for o in range(n_out):
            bt_new[r1, o] = 0.0
        for r2 in range(rank):
            f = np.float32(-gram[r1, r2])
            if f != 0.0:
                for o in range(n_out):
                    bt_new[r1, o] += f * bt[r2, o]
        for j in range(k):
            f = np.float32(w[r1, j])
            if f != 0.0:
                for o in range(n_out):
                    bt_new[r1, o] += f * mt[j, o]
    ok = np.float32(0.0)
    for r in range(rank):
        for j in range(k):
            ok += dq[r, j] * np.float32(0.0)
        for o in range(n_out):
            ok += bt_new[r, o] * np.float32(0.0)
    if ok != 0.0:
        return -1.0
    k4 = k - k % 4
    for r in range(rank):
        for j in range(0, k4, 4):  # four directions per pass over A's row
            d0 = dq[r, j]
            d1 = dq[r, j + 1]
            d2 = dq[r, j + 2]
            d3 = dq[r, j + 3]
            for i in range(n_in):
                a[r, i] += d0 * ut[j, i] + d1 * ut[j + 1, i] + d2 * ut[j + 2, i] + d3 * ut[j + 3, i]
        for j in range(k4, k):
            d = dq[r, j]
            for i in range(n_in):
                a[r, i] += d * ut[j, i]
        for o in range(n_out):
            bt[r, o] += bt_new[r, o]
    return _residual_sq(bt, scale, c, mt, q, bt_new[0])
