"""Applying accumulated gradients safely.

An update is published only if every resulting weight is finite and delta_weight = s·B·A cannot
overflow float32. The check runs on the candidate values before anything is written, so a
rejected update leaves the weights bit-identical without keeping a copy.
"""

from __future__ import annotations

import numpy as np
from sona.kernels.jit import gil_kernel, inline, kernel

F32_MAX = float(np.finfo(np.float32).max)  # the bound every published delta stays below


@kernel
def sq_norm(x: np.ndarray) -> float:
    """Sum of squares in float64 (float32 would overflow for the gradients we must reject)."""
    acc = 0.0
    for v in x.flat:
        w = np.float64(v)  # Numba's float() keeps float32 as float32
        acc += w * w
    return acc


@inline
def _all_finite(x: np.ndarray) -> bool:
    acc = np.float32(0.0)
    for v in x.flat:
        acc += v * np.float32(0.0)
    return bool(acc == 0.0)


@kernel
def all_finite(x: np.ndarray) -> bool:
    """True when no entry is NaN or inf; vectorises because the sum is reassociable."""
    return _all_finite(x)


@gil_kernel
def vec_all_finite(x: np.ndarray) -> bool:
    """``all_finite`` for one embedding on the request path, holding the GIL (see
    ``jit.gil_kernel``)."""
    return _all_finite(x)


@gil_kernel
def add_if_finite(out: np.ndarray, delta: np.ndarray) -> bool:
    """out += delta when every sum is finite, else False with ``out`` untouched: a first pass
    counts the sums that are not, a second writes them. Each entry is one addition, so both
    passes round it alike and the check holds for what is written."""
    inf = np.float32(np.inf)
    bad = 0
    for j in range(out.shape[0]):
        bad += not (abs(out[j] + delta[j]) < inf)
    if bad:
        return False
    for j in range(out.shape[0]):
        out[j] += delta[j]
    return True


# The largest ‖x‖² an input embedding may have. Updates divide the gradient by ‖x‖² (see
# ``kernels.lora``), and beyond float32's range (3.4e38) that quotient is 0: the step would be
# counted as learned while changing nothing, and every distance or energy taken from the input
# in float32 would be inf or NaN. 1e38 (‖x‖ = 1e19) keeps a margin below that range, so a
# float32 sum of squares cannot overflow for an input that is let through.
MAX_INPUT_SQ_NORM = 1e38
# A float32 sum of squares below this cannot stand for an exact one above MAX_INPUT_SQ_NORM
# (that would take a rounding error of 50 %, n·eps for millions of entries); at or above it,
# or when it overflowed, the exact float64 sum decides.
_EXACT_ABOVE = np.float32(5e37)

INPUT_OK = 0
INPUT_NOT_FINITE = 1
INPUT_TOO_LARGE = 2


@inline
def sq_norm64(x: np.ndarray) -> float:
    """‖x‖² of a vector in float64."""
    acc = 0.0
    for i in range(x.shape[0]):
        w = np.float64(x[i])
        acc += w * w
    return acc


@inline
def input_norm_fits(xx: np.float32, x: np.ndarray) -> bool:
    """‖x‖² <= ``MAX_INPUT_SQ_NORM``, given ``xx``, the float32 sum of squares a kernel took
    of finite ``x`` anyway: free unless ``xx`` is near the limit or overflowed."""
    if xx < _EXACT_ABOVE:
        return True
    return bool(sq_norm64(x) <= MAX_INPUT_SQ_NORM)


@inline
def _input_status(x: np.ndarray) -> int:
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        v = x[i]
        acc += v * v
    if acc < _EXACT_ABOVE:  # finite and small: NaN and inf make the sum NaN or inf
        return INPUT_OK
    if not _all_finite(x):
        return INPUT_NOT_FINITE
    return INPUT_OK if sq_norm64(x) <= MAX_INPUT_SQ_NORM else INPUT_TOO_LARGE


@gil_kernel
def vec_input_status(x: np.ndarray) -> int:
    """``INPUT_OK``, ``INPUT_NOT_FINITE`` or ``INPUT_TOO_LARGE`` for one input embedding, in the
    one pass a finiteness check costs anyway."""
    return _input_status(x)


@kernel
def rows_input_status(xs: np.ndarray) -> int:
    """``vec_input_status`` of each row of ``xs`` (n, d): -1 when all are fine, else
    ``row · 4 + status`` of the first row that is not."""
    for r in range(xs.shape[0]):
        status = _input_status(xs[r])
        if status != INPUT_OK:
            return r * 4 + status
    return -1


@gil_kernel
def vec_sq_norm_finite(x: np.ndarray) -> bool:
    """True when ‖x‖² of one embedding is finite in float32: numpy's dot would hand the GIL
    over per vector from a worker thread (see ``jit.gil_kernel``)."""
    acc = np.float32(0.0)
    for v in x.flat:
        acc += v * v
    return bool(np.isfinite(acc))


@gil_kernel
def vectors_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` for two 1-D vectors (float equality: -0.0 equals 0.0, NaN nothing):
    numpy's comparison hands the GIL over per pair from a worker thread, and taking it back
    from a busy event loop can wait a switch interval (see ``jit.gil_kernel``)."""
    same: bool = a.shape[0] == b.shape[0]
    if same:
        for i in range(a.shape[0]):
            if a[i] != b[i]:
                same = False
                break
    return same


@kernel
def grad_sq_norm(grad_a: np.ndarray, grad_bt: np.ndarray) -> float:
    """‖dA‖² + ‖dBᵀ‖² in float64 (float32 would overflow for gradients we must reject)."""
    acc = 0.0
    for v in grad_a.flat:
        w = np.float64(v)
        acc += w * w
    for v in grad_bt.flat:
        w = np.float64(v)
        acc += w * w
    return acc


@kernel
def candidate_sq_norms(
    a: np.ndarray, grad_a: np.ndarray, bt: np.ndarray, grad_bt: np.ndarray, step: float
) -> tuple[float, float]:
    """(‖A − step·dA‖², ‖Bᵀ − step·dBᵀ‖²) of the float32 candidates, without writing them.

    A non-finite candidate entry makes its sum inf or NaN, which the caller rejects.
    """
    s = np.float32(step)
    na = 0.0
    af = a.ravel()
    gaf = grad_a.ravel()
    for i in range(af.shape[0]):
        v = np.float64(af[i] - s * gaf[i])
        na += v * v
    nb = 0.0
    bf = bt.ravel()
    gbf = grad_bt.ravel()
    for i in range(bf.shape[0]):
        v = np.float64(bf[i] - s * gbf[i])
        nb += v * v
    return na, nb


@gil_kernel
def apply_step(
    a: np.ndarray, grad_a: np.ndarray, bt: np.ndarray, grad_bt: np.ndarray, step: float
) -> None:
    """A −= step·dA, Bᵀ −= step·dBᵀ, then both accumulators are zeroed (consumed)."""
    s = np.float32(step)
    af = a.ravel()
    gaf = grad_a.ravel()
    for i in range(af.shape[0]):
        af[i] = af[i] - s * gaf[i]
        gaf[i] = 0.0
    bf = bt.ravel()
    gbf = grad_bt.ravel()
    for i in range(bf.shape[0]):
        bf[i] = bf[i] - s * gbf[i]
        gbf[i] = 0.0
