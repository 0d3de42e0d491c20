"""Small dense linear algebra for the Background loop, single-threaded and without the GIL.

numpy's LAPACK calls run on a multi-threaded OpenBLAS: on a 2-core machine whose other core is
busy (the event loop, another process) a 100 × 100 ``eigh`` was measured at ~130 ms instead of
~1 ms, and a 4096 × 10 ``qr`` at up to 160 ms, because its helper threads wait for a core. The
problems here are small (a window of ~100 inputs, adapters of total rank ~10), so plain
single-threaded kernels are as fast as LAPACK and never wait for another thread.

- :func:`gram`: zᵀ-free Gram matrix z·zᵀ of n wide rows, float64 sums of exact products.
- :func:`sym_eig`: eigen-decomposition of a symmetric matrix (Householder tridiagonalisation
  and implicit QL, as in EISPACK tred2/tql2 and JAMA).
- :func:`combine_rows`: out = c·z for a few coefficient rows c.
- :func:`householder_rows`: QR of the matrix whose columns are the rows of ``m``.
- :func:`jacobi_svd`: one-sided Jacobi SVD of a small square matrix.
"""

from __future__ import annotations

import numpy as np
from sona.kernels.jit import kernel

_EPS = 2.220446049250313e-16
_MAX_QL_ITERATIONS = 64
_MAX_JACOBI_SWEEPS = 64


@kernel
def gram(z: np.ndarray, out: np.ndarray) -> None:
    """out = z·zᵀ for z of shape (n, d); float64 sums of exact float64 products.

    Blocks of 4 × 4 row pairs share every load of a row; only the lower triangle is computed
    and mirrored.
    """
    n, d = z.shape
    full = n - n % 4
    for i0 in range(0, full, 4):
        a0 = z[i0]
        a1 = z[i0 + 1]
        a2 = z[i0 + 2]
        a3 = z[i0 + 3]
        for j0 in range(0, i0 + 1, 4):
            b0 = z[j0]
            b1 = z[j0 + 1]
            b2 = z[j0 + 2]
            b3 = z[j0 + 3]
            s00 = s01 = s02 = s03 = 0.0
            s10 = s11 = s12 = s13 = 0.0
            s20 = s21 = s22 = s23 = 0.0
            s30 = s31 = s32 = s33 = 0.0
            for t in range(d):
                x0 = np.float64(a0[t])
                x1 = np.float64(a1[t])
                x2 = np.float64(a2[t])
                x3 = np.float64(a3[t])
                y0 = np.float64(b0[t])
                y1 = np.float64(b1[t])
                y2 = np.float64(b2[t])
                y3 = np.float64(b3[t])
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            block = (
                (s00, s01, s02, s03),
                (s10, s11, s12, s13),
                (s20, s21, s22, s23),
                (s30, s31, s32, s33),
            )
            for p in range(4):
                for q in range(4):
                    out[i0 + p, j0 + q] = block[p][q]
                    out[j0 + q, i0 + p] = block[p][q]
    for i in range(full, n):
        a = z[i]
        for j in range(i + 1):
            b = z[j]
            s = 0.0
            for t in range(d):
                s += np.float64(a[t]) * np.float64(b[t])
            out[i, j] = s
            out[j, i] = s


@kernel
def sym_eig(a: np.ndarray, w: np.ndarray, vt: np.ndarray) -> bool:
    """Eigenvalues ``w`` (ascending) and eigenvectors (rows of ``vt``) of symmetric ``a``.

    ``a`` (n, n) float64 is read only (its lower triangle); ``w`` (n,) and ``vt`` (n, n) are
    written. Returns False when the QL iteration did not converge (non-finite input); ``w`` and
    ``vt`` are then meaningless.

    EISPACK's tred2/tql2 (as in JAMA) written on the transpose of their matrix V, so that every
    inner loop runs over a contiguous row, and over slices starting at 0, which LLVM vectorises
    (a loop starting at a runtime offset was measured 5x slower).
    """
    n = a.shape[0]
    if n == 0:
        return True
    x = vt  # x = Vᵀ; starts as the lower triangle of a mirrored, ends holding the eigenvectors
    for i in range(n):
        for j in range(i + 1):
            x[i, j] = a[i, j]
            x[j, i] = a[i, j]
    d = np.empty(n)
    e = np.empty(n)
    # -- tred2: Householder reduction to tridiagonal form, accumulating the transformation
    for j in range(n):
        d[j] = x[j, n - 1]
    for i in range(n - 1, 0, -1):
        scale = 0.0
        h = 0.0
        for k in range(i):
            scale += abs(d[k])
        if scale == 0.0:
            e[i] = d[i - 1]
            for j in range(i):
                d[j] = x[j, i - 1]
                x[j, i] = 0.0
                x[i, j] = 0.0
        else:
            for k in range(i):
                d[k] /= scale
                h += d[k] * d[k]
            f = d[i - 1]
            g = np.sqrt(h)
            if f > 0:
                g = -g
            e[i] = scale * g
            h = h - f * g
            d[i - 1] = f - g
            for j in range(i):
                e[j] = 0.0
            for j in range(i):
                f = d[j]
                x[i, j] = f
                g = e[j] + x[j, j] * f
                row = x[j, j + 1 : i]
                dd = d[j + 1 : i]
                ee = e[j + 1 : i]
                for k in range(row.shape[0]):
                    g += row[k] * dd[k]
                    ee[k] += row[k] * f
                e[j] = g
            f = 0.0
            for j in range(i):
                e[j] /= h
                f += e[j] * d[j]
            hh = f / (h + h)
            for j in range(i):
                e[j] -= hh * d[j]
            for j in range(i):
                f = d[j]
                g = e[j]
                row = x[j, j:i]
                dd = d[j:i]
                ee = e[j:i]
                for k in range(row.shape[0]):
                    row[k] -= f * ee[k] + g * dd[k]
                d[j] = x[j, i - 1]
                x[j, i] = 0.0
        d[i] = h
    for i in range(n - 1):
        x[i, n - 1] = x[i, i]
        x[i, i] = 1.0
        h = d[i + 1]
        nxt = x[i + 1, : i + 1]
        if h != 0.0:
            for k in range(i + 1):
                d[k] = nxt[k] / h
            for j in range(i + 1):
                row = x[j, : i + 1]
                g = 0.0
                for k in range(i + 1):
                    g += nxt[k] * row[k]
                for k in range(i + 1):
                    row[k] -= g * d[k]
        for k in range(i + 1):
            nxt[k] = 0.0
    for j in range(n):
        d[j] = x[j, n - 1]
        x[j, n - 1] = 0.0
    x[n - 1, n - 1] = 1.0
    e[0] = 0.0
    # -- tql2: implicit QL on the tridiagonal matrix, rotating rows of x
    for i in range(1, n):
        e[i - 1] = e[i]
    e[n - 1] = 0.0
    f = 0.0
    tst1 = 0.0
    for ll in range(n):
        tst1 = max(tst1, abs(d[ll]) + abs(e[ll]))
        m = ll
        while m < n:
            if abs(e[m]) <= _EPS * tst1:
                break
            m += 1
        if m == n:  # only with NaN: no subdiagonal entry is small
            return False
        if m > ll:
            iterations = 0
            while True:
                iterations += 1
                if iterations > _MAX_QL_ITERATIONS:
                    return False
                g = d[ll]
                p = (d[ll + 1] - g) / (2.0 * e[ll])
                r = np.hypot(p, 1.0)
                if p < 0:
                    r = -r
                d[ll] = e[ll] / (p + r)
                d[ll + 1] = e[ll] * (p + r)
                dl1 = d[ll + 1]
                h = g - d[ll]
                for i in range(ll + 2, n):
                    d[i] -= h
                f = f + h
                p = d[m]
                c = 1.0
                c2 = c
                c3 = c
                el1 = e[ll + 1]
                s = 0.0
                s2 = 0.0
                for i in range(m - 1, ll - 1, -1):
                    c3 = c2
                    c2 = c
                    s2 = s
                    g = c * e[i]
                    h = c * p
                    r = np.hypot(p, e[i])
                    e[i + 1] = s * r
                    s = e[i] / r
                    c = p / r
                    p = c * d[i] - s * g
                    d[i + 1] = h + s * (c * g + s * d[i])
                    lo = x[i]
                    hi = x[i + 1]
                    for k in range(n):
                        t = hi[k]
                        hi[k] = s * lo[k] + c * t
                        lo[k] = c * lo[k] - s * t
                p = -s * s2 * c3 * el1 * e[ll] / dl1
                e[ll] = s * p
                d[ll] = c * p
                if not abs(e[ll]) > _EPS * tst1:
                    break
        d[ll] = d[ll] + f
        e[ll] = 0.0
    # -- ascending order (selection sort, as tql2 does), vectors follow
    for i in range(n):
        w[i] = d[i]
    for i in range(n - 1):
        k = i
        p = w[i]
        for j in range(i + 1, n):
            if w[j] < p:
                k = j
                p = w[j]
        if k != i:
            w[k] = w[i]
            w[i] = p
            for j in range(n):
                t = x[i, j]
                x[i, j] = x[k, j]
                x[k, j] = t
    finite = True
    for i in range(n):
        finite = finite and np.isfinite(w[i])
    return finite


@kernel
def combine_rows(c: np.ndarray, z: np.ndarray, out: np.ndarray) -> None:
    """out = c·z: out[t] = Σ_i c[t, i]·z[i] for c (k, n) float64, z (n, d), out (k, d) float64.

    Over column chunks small enough that the k output chunks stay in L1 while every row of z
    streams through once.
    """
    k, n = c.shape
    d = z.shape[1]
    chunk = max(64, min(d, 4096 // max(k, 1)))
    for p0 in range(0, d, chunk):
        p1 = min(d, p0 + chunk)
        for t in range(k):
            o = out[t, p0:p1]
            for p in range(o.shape[0]):
                o[p] = 0.0
        for i in range(n):
            zi = z[i, p0:p1]
            for t in range(k):
                ci = c[t, i]
                if ci == 0.0:
                    continue
                o = out[t, p0:p1]
                for p in range(o.shape[0]):
                    o[p] += ci * np.float64(zi[p])


@kernel
def householder_rows(m: np.ndarray, q: np.ndarray, r: np.ndarray) -> None:
    """QR of M = mᵀ (d × k) for ``m`` (k, d) float64, k <= d; ``m`` is overwritten.

    Writes q (k, d), the orthonormal columns of Q as rows, and r (k, k) upper triangular with
    mᵀ = qᵀ·r. Householder reflections keep q orthonormal even when M is rank deficient (a zero
    or repeated row), as LAPACK's geqrf does.
    """
    k, d = m.shape
    vs = np.zeros((k, d))  # reflector j acts on coordinates j..d-1 (stored from 0)
    betas = np.zeros(k)
    for j in range(k):
        col = m[j, j:]
        v = vs[j, : d - j]
        norm = 0.0
        for p in range(col.shape[0]):
            norm += col[p] * col[p]
        norm = np.sqrt(norm)
        if norm > 0.0:
            alpha = -norm if col[0] >= 0.0 else norm
            for p in range(col.shape[0]):
                v[p] = col[p]
            v[0] -= alpha
            vv = 0.0
            for p in range(v.shape[0]):
                vv += v[p] * v[p]
            beta = 2.0 / vv if vv > 0.0 else 0.0
            betas[j] = beta
            for c in range(j, k):  # this column and the later ones
                other = m[c, j:]
                dot = 0.0
                for p in range(v.shape[0]):
                    dot += v[p] * other[p]
                f = beta * dot
                for p in range(v.shape[0]):
                    other[p] -= f * v[p]
        for c in range(k):
            r[j, c] = m[c, j] if c >= j else 0.0
    # Q = H_0 H_1 … H_{k-1} applied to the first k unit vectors, as rows
    for c in range(k):
        row = q[c]
        for p in range(d):
            row[p] = 0.0
        row[c] = 1.0
        for j in range(min(c, k - 1), -1, -1):  # H_j with j > c leaves e_c alone
            beta = betas[j]
            if beta == 0.0:
                continue
            v = vs[j, : d - j]
            part = row[j:]
            dot = 0.0
            for p in range(v.shape[0]):
                dot += v[p] * part[p]
            f = beta * dot
            for p in range(v.shape[0]):
                part[p] -= f * v[p]


@kernel
def jacobi_svd(a: np.ndarray, u: np.ndarray, s: np.ndarray, v: np.ndarray) -> bool:
    """a = u·diag(s)·vᵀ for a square ``a`` (n, n) float64, s descending and >= 0.

    One-sided Jacobi: rotate column pairs of a copy of ``a`` until all are orthogonal; the
    column norms are the singular values. Columns of ``u`` for a zero singular value are
    zero. Returns False when the sweeps did not converge (non-finite input).
    """
    n = a.shape[0]
    w = a.copy()
    for i in range(n):
        for j in range(n):
            v[i, j] = 1.0 if i == j else 0.0
    converged = False
    for _ in range(_MAX_JACOBI_SWEEPS):
        rotated = False
        for p in range(n - 1):
            for q in range(p + 1, n):
                alpha = 0.0
                beta = 0.0
                gamma = 0.0
                for i in range(n):
                    alpha += w[i, p] * w[i, p]
                    beta += w[i, q] * w[i, q]
                    gamma += w[i, p] * w[i, q]
                # √α·√β: α·β overflows for columns beyond ~1e77 (every pair then looked
                # orthogonal) and underflows below ~1e-77 (no pair ever did)
                if gamma == 0.0 or abs(gamma) <= _EPS * (np.sqrt(alpha) * np.sqrt(beta)):
                    continue
                rotated = True
                zeta = (beta - alpha) / (2.0 * gamma)
                # hypot: ζ² overflows for columns ~1e140 apart, t became 0 and the pair was
                # rotated by nothing in every sweep
                t = 1.0 / (abs(zeta) + np.hypot(1.0, zeta))
                if zeta < 0.0:
                    t = -t
                c = 1.0 / np.sqrt(1.0 + t * t)
                sn = c * t
                for i in range(n):
                    wp = w[i, p]
                    wq = w[i, q]
                    w[i, p] = c * wp - sn * wq
                    w[i, q] = sn * wp + c * wq
                    vp = v[i, p]
                    vq = v[i, q]
                    v[i, p] = c * vp - sn * vq
                    v[i, q] = sn * vp + c * vq
        if not rotated:
            converged = True
            break
    norms = np.empty(n)
    for j in range(n):
        acc = 0.0
        for i in range(n):
            acc += w[i, j] * w[i, j]
        norms[j] = np.sqrt(acc)
        if not np.isfinite(norms[j]):
            return False
    order = np.argsort(-norms, kind="mergesort")
    vc = v.copy()
    for jj in range(n):
        j = order[jj]
        sj = norms[j]
        s[jj] = sj
        for i in range(n):
            v[i, jj] = vc[i, j]
            u[i, jj] = w[i, j] / sj if sj > 0.0 else 0.0
    return converged


_warmed = False


def warm_up() -> None:
    """Compile (or load from the cache) every kernel here for the types the loops pass."""
    global _warmed
    if _warmed:
        return
    z = np.eye(2, 4, dtype=np.float32)
    g = np.empty((2, 2))
    gram(z, g)
    sym_eig(g, np.empty(2), np.empty((2, 2)))
    combine_rows(np.ones((1, 2)), z, np.empty((1, 4)))
    combine_rows(np.ones((1, 2)), z.astype(np.float64), np.empty((1, 4)))
    householder_rows(np.eye(2, 4), np.empty((2, 4)), np.empty((2, 2)))
    jacobi_svd(np.eye(2), np.empty((2, 2)), np.empty(2), np.empty((2, 2)))
    _warmed = True
