"""Small dense linear algebra shared by the importance sketch and the shift detector."""

from __future__ import annotations

import numpy as np


def principal_directions(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and unit eigenvectors (rows) of zᵀz, for z of shape (n, d).

    Inputs are wide (a window of ~100 embeddings of width 4096): an SVD of z costs O(n·d²)
    memory traffic for vectors nobody uses, while the n × n Gram matrix gives the same top
    directions in O(n²·d). Directions with zero eigenvalue are dropped.
    """
    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    if n == 0:
        return np.zeros(0), np.zeros((0, d))
    if n >= d:
        _, sv, vt = np.linalg.svd(z, full_matrices=False)
        return sv**2, vt
    gram = z @ z.T
    ev, u = np.linalg.eigh(gram)
    order = np.argsort(ev)[::-1]
    ev, u = ev[order], u[:, order]
    keep = ev > max(float(ev[0]), 0.0) * 1e-12 if ev.size else ev > 0
    ev, u = ev[keep], u[:, keep]
    vt = (u.T @ z) / np.sqrt(ev)[:, None]
    return ev, vt
