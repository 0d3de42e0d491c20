"""Small dense linear algebra shared by the importance sketch and the shift detector."""

from __future__ import annotations

import numpy as np

from sona.kernels import linalg as k_linalg

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _kept(ev: np.ndarray, top: int | None) -> tuple[int, int]:
    """How many of the descending eigenvalues ``ev`` are not zero up to round-off, and how
    many of their directions to form (at most ``top``)."""
    count = int(np.count_nonzero(ev > max(float(ev[0]), 0.0) * 1e-12)) if ev.size else 0
    return count, count if top is None else max(0, min(int(top), count))


def principal_directions(
    z: np.ndarray, *, top: int | None = None, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and unit eigenvectors (rows) of zᵀ·diag(weights)·z, z (n, d).

    Eigenvalues that are zero up to round-off (at most 1e-12 of the largest) are dropped with
    their directions, whichever way they are computed; ``top`` limits how many eigenvectors
    are formed (every kept eigenvalue is still returned). Negative weights count as zero.

    Inputs are wide (a window of ~100 embeddings of width 4096): an SVD of z costs O(n·d²)
    memory traffic for vectors nobody uses, while the n × n Gram matrix gives the same top
    directions in O(n²·d). The Gram matrix, its eigen-decomposition and the eigenvectors are
    single-threaded Numba kernels that release the GIL (:mod:`sona.kernels.linalg` says why not
    LAPACK).
    """
    z = np.asarray(z)
    if z.dtype not in _FLOATS:
        z = z.astype(np.float64)
    z = np.ascontiguousarray(z)
    n, d = z.shape
    root = None if weights is None else np.sqrt(np.maximum(np.asarray(weights, np.float64), 0.0))
    if n == 0:
        return np.zeros(0), np.zeros((0, d))
    if n >= d:
        zw = z.astype(np.float64) if root is None else z * root[:, None]
        _, sv, vt = np.linalg.svd(zw, full_matrices=False)
        ev = sv**2
        count, t = _kept(ev, top)
        return ev[:count], vt[:t]
    gram = np.empty((n, n))
    k_linalg.gram(z, gram)
    if root is not None:
        gram *= root[:, None]
        gram *= root[None, :]
    ev = np.empty(n)
    vecs = np.empty((n, n))
    if not k_linalg.sym_eig(gram, ev, vecs):
        return np.full(n, np.nan), np.zeros((0, d))
    ev, vecs = ev[::-1], vecs[::-1]
    count, t = _kept(ev, top)
    ev = ev[:count].copy()
    coef = vecs[:t] / np.sqrt(ev[:t])[:, None]
    if root is not None:
        coef *= root[None, :]
    vt = np.empty((t, d))
    k_linalg.combine_rows(np.ascontiguousarray(coef), z, vt)
    return ev, vt
