"""The numeric core of an exact adapter merge (:func:`sona.merge.merge_adapters`), GIL-free.

Every Background consolidation under EWC_MERGE merges the live adapter into the consolidated
one in a worker thread beside the event loop. Written as numpy calls on (rank, d) arrays, one
merge gave the GIL up and took it back some forty times, and each take-back could hold up a
request the event loop was serving by 40-300 µs. Here the weighted concatenation is one call
per source, and the truncated SVD down to the float32 factors one call in all.
"""

from __future__ import annotations

import math

import numpy as np
from sona.kernels.jit import gil_kernel, inline, kernel
from sona.kernels.linalg import combine_rows, householder_rows, jacobi_svd
from sona.kernels.update import F32_MAX as _F32_MAX
from sona.kernels.update import sq_norm

# low_rank_into's outcomes
LOW_RANK_OK = 0
LOW_RANK_DIVERGED = -1  # the SVD sweeps did not converge: numpy's SVD decides instead
LOW_RANK_TOO_LARGE = -2  # no factors of the sum keep s·‖A‖·‖B‖ below float32's max

_F32_MAX_MANT, _F32_MAX_EXP = math.frexp(_F32_MAX)


@kernel
def weighted_rows(
    a: np.ndarray,
    bt: np.ndarray,
    factor: float,
    flush: float,
    a_cat: np.ndarray,
    bt_cat: np.ndarray,
    row0: int,
) -> None:
    """One source's rows of the concatenated factors, from ``row0`` on: A as float64, and
    ``factor``·Bᵀ in float64 with every entry whose magnitude is below ``flush`` set to zero
    (:func:`sona.merge._weighted_concat` says why)."""
    rank, n_in = a.shape
    n_out = bt.shape[1]
    for r in range(rank):
        for j in range(n_in):
            a_cat[row0 + r, j] = np.float64(a[r, j])
        for j in range(n_out):
            v = factor * np.float64(bt[r, j])
            bt_cat[row0 + r, j] = 0.0 if abs(v) < flush else v


@gil_kernel
def fits(value: float, e: int) -> bool:
    """value·2**e < float32's max, decided on the exponents so neither side overflows (a
    scalar test: it keeps the GIL, as a Python function would)."""
    if value == 0.0:
        return True
    if not np.isfinite(value):
        return False
    mant, exp = math.frexp(value)
    return exp + e < _F32_MAX_EXP or (exp + e == _F32_MAX_EXP and mant < _F32_MAX_MANT)


@inline
def _scaled_into(src: np.ndarray, e: int, out: np.ndarray) -> None:
    """out = float32(2**e·src). A product with a power of two that is a normal float64 rounds
    exactly as ``ldexp`` does, and it vectorises; beyond that range, ``ldexp`` per entry."""
    if -1022 <= e <= 1023:
        factor = math.ldexp(1.0, e)
        for r in range(src.shape[0]):
            for j in range(src.shape[1]):
                out[r, j] = np.float32(src[r, j] * factor)
        return
    for r in range(src.shape[0]):
        for j in range(src.shape[1]):
            out[r, j] = np.float32(math.ldexp(src[r, j], e))


@kernel
def low_rank_into(
    a_cat: np.ndarray,
    bt_cat: np.ndarray,
    rank: int,
    e: int,
    out_a: np.ndarray,
    out_bt: np.ndarray,
) -> int:
    """The best rank-``rank`` approximation of 2**e·Bᵀᵀ·A as float32 factors, √σ on each side.

    QR of each side (Householder), SVD of the small core (one-sided Jacobi), the factors
    recombined, the power of two split between them, then rounded into ``out_a`` (rank, in)
    and ``out_bt`` (rank, out). The inputs are not modified. Needs a total rank R no larger
    than either width. Returns a ``LOW_RANK_*`` outcome; after a failure the outputs hold
    nothing meaningful.
    """
    total, n_in = a_cat.shape
    n_out = bt_cat.shape[1]
    qa = np.empty((total, n_in))
    ra = np.empty((total, total))
    householder_rows(a_cat.copy(), qa, ra)  # aᵀ = qaᵀ·ra
    qb = np.empty((total, n_out))
    rb = np.empty((total, total))
    householder_rows(bt_cat.copy(), qb, rb)
    core = np.empty((total, total))  # btᵀ·a = qbᵀ·(rb·raᵀ)·qa
    for i in range(total):
        for j in range(total):
            acc = 0.0
            for p in range(total):
                acc += rb[i, p] * ra[j, p]
            core[i, j] = acc
    u = np.empty((total, total))
    s = np.empty(total)
    v = np.empty((total, total))
    if not jacobi_svd(core, u, s, v):
        return LOW_RANK_DIVERGED
    k = min(rank, total)
    coef_a = np.empty((k, total))
    coef_b = np.empty((k, total))
    for t in range(k):
        root = np.sqrt(s[t])
        for i in range(total):
            coef_a[t, i] = root * v[i, t]
            coef_b[t, i] = root * u[i, t]
    a_new = np.zeros((rank, n_in))
    bt_new = np.zeros((rank, n_out))
    combine_rows(coef_a, qa, a_new[:k])
    combine_rows(coef_b, qb, bt_new[:k])
    if not fits(np.sqrt(sq_norm(a_new)) * np.sqrt(sq_norm(bt_new)), e):
        return LOW_RANK_TOO_LARGE
    half = e // 2
    _scaled_into(a_new, half, out_a)
    _scaled_into(bt_new, e - half, out_bt)
    # rounding to float32 can carry the bound across float32's max: the factors as installed
    # must keep it (as MicroLoRA.set_factors requires)
    if not np.sqrt(sq_norm(out_a)) * np.sqrt(sq_norm(out_bt)) < _F32_MAX:
        return LOW_RANK_TOO_LARGE
    return LOW_RANK_OK


@kernel
def dead_rows(a: np.ndarray, bt: np.ndarray, dead: np.ndarray) -> int:
    """dead[r] = row r of A and row r of Bᵀ are both all zero; their number."""
    count = 0
    for r in range(a.shape[0]):
        zero = True
        for j in range(a.shape[1]):
            if a[r, j] != 0.0:
                zero = False
                break
        if zero:
            for j in range(bt.shape[1]):
                if bt[r, j] != 0.0:
                    zero = False
                    break
        dead[r] = zero
        if zero:
            count += 1
    return count


def warm_up() -> None:
    """Compile (or load from the cache) the kernels for the types the merge passes."""
    f32, f64 = np.float32, np.float64
    a = np.eye(2, 4, dtype=f32)
    a_cat = np.empty((2, 4), f64)
    bt_cat = np.empty((2, 4), f64)
    weighted_rows(a, a, 1.0, 0.0, a_cat, bt_cat, 0)
    low_rank_into(a_cat, bt_cat, 2, 0, np.empty((2, 4), f32), np.empty((2, 4), f32))
    dead_rows(a, a, np.empty(2, np.bool_))
    fits(1.0, 0)
