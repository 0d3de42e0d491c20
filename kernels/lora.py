"""LoRA forward and gradient kernels.

Layout: ``A`` is (rank, in), ``Bt`` is B transposed, (rank, out), both C-contiguous float32, so
every inner loop runs over a contiguous row and vectorises; the rank loop (a runtime length) is
always outermost. ``scale`` (alpha / rank) is folded into the rank-sized hidden vector h = s·A·x,
which costs ``rank`` multiplications instead of a pass over B.

Kernels never allocate. They check finiteness of the cheap intermediate (h, rank values) rather
than of x: NaN or inf anywhere in x reaches h through the dot products.
"""

from __future__ import annotations

import numpy as np
from sona.kernels.baseline import output_weight, update_baseline
from sona.kernels.jit import gil_kernel, held_kernel, inline, kernel
from sona.kernels.ownership import is_free
from sona.kernels.prefetch import prefetch
from sona.kernels.random import normal, uniform01
from sona.kernels.update import F32_MAX as _F32_MAX
from sona.kernels.update import MAX_INPUT_SQ_NORM, _all_finite, input_norm_fits, sq_norm64

_INF = np.float32(np.inf)  # |v| < _INF: v is finite (False for NaN and inf alike)


@inline
def _hidden(a: np.ndarray, scale: float, x: np.ndarray, h: np.ndarray) -> bool:
    """h = scale · A·x; False when any entry is non-finite."""
    rank, n_in = a.shape
    if rank == 2:  # the common micro rank: one pass over x for both rows
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        for i in range(n_in):
            xi = x[i]
            acc0 += a[0, i] * xi
            acc1 += a[1, i] * xi
        h[0] = np.float32(acc0 * scale)
        h[1] = np.float32(acc1 * scale)
        return bool(np.isfinite(h[0]) and np.isfinite(h[1]))
    return _scaled_matvec(a, scale, x, h)


@inline
def _scaled_matvec_sq(
    m: np.ndarray, scale: float, v: np.ndarray, out: np.ndarray
) -> tuple[bool, float]:
    """out = scale · m·v, and ‖m‖² from the same pass over m; False when an entry of out is
    not finite. The squares are summed in float32 (it vectorises) and again in float64 only if
    that overflowed: huge but finite weights must be judged on their true norm."""
    rank, n = m.shape
    sq = np.float32(0.0)
    ok = True
    for k in range(rank):
        acc = np.float32(0.0)
        for i in range(n):
            mi = m[k, i]
            acc += mi * v[i]
            sq += mi * mi
        val = np.float32(acc * scale)
        out[k] = val
        ok = ok and np.isfinite(val)
    if np.isfinite(sq):
        return ok, float(sq)
    sq64 = 0.0
    for e in m.flat:
        sq64 += np.float64(e) * np.float64(e)
    return ok, sq64


@inline
def _scaled_matvec(m: np.ndarray, scale: float, v: np.ndarray, out: np.ndarray) -> bool:
    """out = scale · m·v for a (rank, n) matrix; False when any entry is non-finite."""
    rank, n = m.shape
    ok = True
    for k in range(rank):
        acc = np.float32(0.0)
        for i in range(n):
            acc += m[k, i] * v[i]
        val = np.float32(acc * scale)
        out[k] = val
        ok = ok and np.isfinite(val)
    return ok


@gil_kernel
def forward_vec(
    a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray, h: np.ndarray, out: np.ndarray
) -> bool:
    """out = s·B·A·x for one vector. Returns False (``out`` untouched) if x is not finite."""
    if not _hidden(a, scale, x, h):
        return False
    rank, n_out = bt.shape
    h0 = h[0]
    if rank == 2:
        h1 = h[1]
        for j in range(n_out):
            out[j] = h0 * bt[0, j] + h1 * bt[1, j]
        return True
    for j in range(n_out):
        out[j] = h0 * bt[0, j]
    for k in range(1, rank):
        hk = h[k]
        for j in range(n_out):
            out[j] += hk * bt[k, j]
    return True


@gil_kernel
def forward_add_vec(
    a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray, h: np.ndarray, out: np.ndarray
) -> bool:
    """out += s·B·A·x for one vector. Returns False (``out`` untouched) if x is not finite."""
    if not _hidden(a, scale, x, h):
        return False
    rank, n_out = bt.shape
    for k in range(rank):
        hk = h[k]
        for j in range(n_out):
            out[j] += hk * bt[k, j]
    return True


@inline
def _hidden_pair(
    a: np.ndarray, scale: float, xa: np.ndarray, xb: np.ndarray, ha: np.ndarray, hb: np.ndarray
) -> None:
    """ha = scale·A·xa and hb = scale·A·xb, the rows of A four at a time, then two, then one:
    one pass over both inputs per group, so each load of A serves two rows and each load of an
    input up to four ranks."""
    rank, n_in = a.shape
    k = 0
    while k + 4 <= rank:
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = np.float32(0.0)
        for i in range(n_in):
            u = xa[i]
            v = xb[i]
            p0 += a0[i] * u
            p1 += a1[i] * u
            p2 += a2[i] * u
            p3 += a3[i] * u
            q0 += a0[i] * v
            q1 += a1[i] * v
            q2 += a2[i] * v
            q3 += a3[i] * v
        ha[k], ha[k + 1], ha[k + 2], ha[k + 3] = p0 * scale, p1 * scale, p2 * scale, p3 * scale
        hb[k], hb[k + 1], hb[k + 2], hb[k + 3] = q0 * scale, q1 * scale, q2 * scale, q3 * scale
        k += 4
    if k + 2 <= rank:
        a0, a1 = a[k], a[k + 1]
        p0 = p1 = q0 = q1 = np.float32(0.0)
        for i in range(n_in):
            u = xa[i]
            v = xb[i]
            p0 += a0[i] * u
            p1 += a1[i] * u
            q0 += a0[i] * v
            q1 += a1[i] * v
        ha[k], ha[k + 1] = p0 * scale, p1 * scale
        hb[k], hb[k + 1] = q0 * scale, q1 * scale
        k += 2
    if k < rank:
        a0 = a[k]
        p0 = q0 = np.float32(0.0)
        for i in range(n_in):
            p0 += a0[i] * xa[i]
            q0 += a0[i] * xb[i]
        ha[k] = p0 * scale
        hb[k] = q0 * scale


@inline
def _expand_tile(tile: np.ndarray, h: np.ndarray, out: np.ndarray, first: bool) -> np.float32:
    """out (+)= tileᵀ·h (``first``: =) for a tile of Bᵀ's columns (its first len(out) columns
    are read), its rows four at a time, then two, then one: one pass over ``out`` per group.
    Returns the sum of the values written (see ``_forward``)."""
    rank = tile.shape[0]
    width = out.shape[0]
    chk = np.float32(0.0)
    k = 0
    while k + 4 <= rank:
        h0, h1, h2, h3 = h[k], h[k + 1], h[k + 2], h[k + 3]
        if first:
            for j in range(width):
                v = (
                    h0 * tile[k, j] + h1 * tile[k + 1, j] + h2 * tile[k + 2, j]
                    + h3 * tile[k + 3, j]
                )  # fmt: skip
                out[j] = v
                chk += v
        else:
            for j in range(width):
                v = out[j] + (
                    h0 * tile[k, j] + h1 * tile[k + 1, j] + h2 * tile[k + 2, j]
                    + h3 * tile[k + 3, j]
                )  # fmt: skip
                out[j] = v
                chk += v
        first = False
        k += 4
    if k + 2 <= rank:
        h0, h1 = h[k], h[k + 1]
        if first:
            for j in range(width):
                v = h0 * tile[k, j] + h1 * tile[k + 1, j]
                out[j] = v
                chk += v
        else:
            for j in range(width):
                v = out[j] + (h0 * tile[k, j] + h1 * tile[k + 1, j])
                out[j] = v
                chk += v
        first = False
        k += 2
    if k < rank:
        h0 = h[k]
        if first:
            for j in range(width):
                v = h0 * tile[k, j]
                out[j] = v
                chk += v
        else:
            for j in range(width):
                v = out[j] + h0 * tile[k, j]
                out[j] = v
                chk += v
    return chk


# forward_batch's tile: this many columns of every row of Bᵀ, copied together, stay in L1
# while they serve each row of the batch, instead of the whole of Bᵀ streaming from L2 once per
# row
_TILE = 512


@kernel
def forward_batch(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    h: np.ndarray,
    out: np.ndarray,
    accumulate: bool,
) -> bool:
    """out[n] (+)= s·B·A·x[n] for a batch; h is (batch, rank) scratch.

    All hidden vectors are computed and checked before ``out`` is written, so a non-finite row
    leaves ``out`` untouched; a delta beyond float32 from finite hidden vectors (weights near
    its largest value) shows as ``out`` is written, and returns False with ``out`` written.
    Inputs go in pairs (an odd last one paired with itself) and
    ranks four at a time through A, and the output in column tiles (rank 8, batch 32, width
    4096: 147 µs one row and one rank at a time, 71 µs so).
    """
    n = x.shape[0]
    n_out = out.shape[1]
    for r in range(0, n - 1, 2):
        _hidden_pair(a, scale, x[r], x[r + 1], h[r], h[r + 1])
    if n % 2:
        _hidden_pair(a, scale, x[n - 1], x[n - 1], h[n - 1], h[n - 1])
    for v in h.flat:
        if not np.isfinite(v):
            return False
    rank = bt.shape[0]
    tile = np.empty((rank, min(_TILE, n_out)), np.float32)
    chk = np.float32(0.0)
    for j0 in range(0, n_out, _TILE):
        width = min(_TILE, n_out - j0)
        for k in range(rank):
            tile[k, :width] = bt[k][j0 : j0 + width]
        for r in range(n):
            chk += _expand_tile(tile, h[r], out[r][j0 : j0 + width], not accumulate)
    return bool(abs(chk) < _INF) or _all_finite(out)


@held_kernel
def forward_batch_held(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    h: np.ndarray,
    out: np.ndarray,
    accumulate: bool,
) -> bool:
    """:func:`forward_batch` holding the GIL, to read a live adapter (``held_kernel``)."""
    return forward_batch(a, bt, scale, x, h, out, accumulate)


# forward_into's status codes
FORWARD_OK = 0
FORWARD_NOT_FINITE = 1  # x is not finite, or A·x or the delta overflows
FORWARD_BAD_X = 2  # x has the wrong length or is not contiguous
FORWARD_BAD_OUT = 3  # out has the wrong length, is not contiguous or (reused) is not free


@inline
def _forward(a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray, out: np.ndarray) -> int:
    rank, n_in = a.shape
    n_out = bt.shape[1]
    if x.shape[0] != n_in or x.strides[0] != 4:
        return FORWARD_BAD_X
    if out.shape[0] != n_out or out.strides[0] != 4:
        return FORWARD_BAD_OUT
    # Rows of A four at a time, then in pairs: one pass over x and one over out per group
    # (rank 2: one each; the consolidated rank 8: two). A non-finite x already shows in the
    # first h (NaN·0 is NaN), so a later failure is an overflow; out may then be partly written.
    # Finite factors and h can still give a delta beyond float32 (weights near its largest
    # value). Each pass over out also sums what it writes, one add in a loop that waits on
    # the loads of Bᵀ; a sum that is not finite (an inf or NaN written, or only large values)
    # sends out through an exact check. (A sum of v·0 or v - v would not do: fast-math may
    # reassociate h·b·0 into h·(b·0), and c + v - v into c.)
    chk = np.float32(0.0)
    k4 = rank - rank % 4
    for k in range(0, k4, 4):
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        acc2 = np.float32(0.0)
        acc3 = np.float32(0.0)
        for i in range(n_in):
            xi = x[i]
            acc0 += a[k, i] * xi
            acc1 += a[k + 1, i] * xi
            acc2 += a[k + 2, i] * xi
            acc3 += a[k + 3, i] * xi
        h0 = np.float32(acc0 * scale)
        h1 = np.float32(acc1 * scale)
        h2 = np.float32(acc2 * scale)
        h3 = np.float32(acc3 * scale)
        if not (np.isfinite(h0) and np.isfinite(h1) and np.isfinite(h2) and np.isfinite(h3)):
            return FORWARD_NOT_FINITE
        if k == 0:
            for j in range(n_out):
                v = h0 * bt[0, j] + h1 * bt[1, j] + h2 * bt[2, j] + h3 * bt[3, j]
                out[j] = v
                chk += v
        else:
            for j in range(n_out):
                v = out[j] + (
                    h0 * bt[k, j] + h1 * bt[k + 1, j] + h2 * bt[k + 2, j] + h3 * bt[k + 3, j]
                )
                out[j] = v
                chk += v
    for k in range(k4, rank - 1, 2):
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        for i in range(n_in):
            xi = x[i]
            acc0 += a[k, i] * xi
            acc1 += a[k + 1, i] * xi
        h0 = np.float32(acc0 * scale)
        h1 = np.float32(acc1 * scale)
        if not (np.isfinite(h0) and np.isfinite(h1)):
            return FORWARD_NOT_FINITE
        if k == 0:
            for j in range(n_out):
                v = h0 * bt[0, j] + h1 * bt[1, j]
                out[j] = v
                chk += v
        else:
            for j in range(n_out):
                v = out[j] + (h0 * bt[k, j] + h1 * bt[k + 1, j])
                out[j] = v
                chk += v
    if rank % 2:
        k = rank - 1
        acc = np.float32(0.0)
        for i in range(n_in):
            acc += a[k, i] * x[i]
        hk = np.float32(acc * scale)
        if not np.isfinite(hk):
            return FORWARD_NOT_FINITE
        if k == 0:
            for j in range(n_out):
                v = hk * bt[0, j]
                out[j] = v
                chk += v
        else:
            for j in range(n_out):
                v = out[j] + hk * bt[k, j]
                out[j] = v
                chk += v
    if not abs(chk) < _INF and not _all_finite(out):
        return FORWARD_NOT_FINITE
    return FORWARD_OK


@gil_kernel
def forward_into(
    a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray, out: np.ndarray
) -> int:
    """out = s·B·A·x for one vector, without scratch: returns a ``FORWARD_*`` status.

    The hidden values live in registers, so concurrent calls share no buffer. The caller
    guarantees float32 vectors (one dimension); their lengths and strides are checked here,
    before any element is read, so a strided vector passed for a contiguous one is refused,
    not misread. On failure ``out`` holds nothing meaningful. For rank <= 2, one pass over x
    and one over Bᵀ; higher ranks take the rows of A and Bᵀ in pairs.
    """
    return _forward(a, bt, scale, x, out)


@gil_kernel
def forward_reused(
    a: np.ndarray, bt: np.ndarray, scale: float, x: np.ndarray, out: np.ndarray
) -> int:
    """``forward_into`` the module's own result buffer, refused with ``FORWARD_BAD_OUT`` before
    anything is written unless the buffer is free (``ownership.is_free``)."""
    if not is_free(out):
        return FORWARD_BAD_OUT
    return _forward(a, bt, scale, x, out)


@gil_kernel
def forward_reused_packed(w: np.ndarray, scale: float, x: np.ndarray, out: np.ndarray) -> int:
    """``forward_reused`` for factors stored together, w = [A, Bᵀ] of shape (2, rank, n).

    A square adapter (in == out) keeps both factors in one array: one array argument fewer
    per call is ~0.05 µs of a ~1.3 µs forward at d = 4096.
    """
    if not is_free(out):
        return FORWARD_BAD_OUT
    return _forward(w[0], w[1], scale, x, out)


# prepare_grad modes: how the output-space gradient g is formed
MODE_REGRESS = 0  # g = weight · (μ(x) − vec)
MODE_GRADIENT = 1  # g = vec
MODE_NOISE = 2  # g = weight · N(0, I) keyed on ``key`` (REINFORCE on explored noise)
MODE_RESIDUAL = 3  # g = weight · (μ(x) − (vec − off)); step_fused only


@inline
def _output_grad(
    bt: np.ndarray,
    h: np.ndarray,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    mode: int,
    key: np.uint64,
    g: np.ndarray,
) -> None:
    """g, the output-space gradient times ``weight``, divided by max(‖x‖², 1), from h = s·A·x."""
    rank, n_out = bt.shape
    # Normalised LMS: a step changes μ(x) by ~lr·‖x‖²·g, so dividing by ‖x‖² (for ‖x‖ > 1)
    # makes the output-space step independent of the input scale.
    xx = np.float32(0.0)
    for i in range(x.shape[0]):
        xx += x[i] * x[i]
    w = np.float32(weight / max(float(xx), 1.0))
    if mode == MODE_REGRESS:
        if rank == 2:
            h0 = h[0]
            h1 = h[1]
            for j in range(n_out):
                g[j] = w * (h0 * bt[0, j] + h1 * bt[1, j] - vec[j])
        else:
            for j in range(n_out):
                g[j] = -vec[j]
            for k in range(rank):
                hk = h[k]
                for j in range(n_out):
                    g[j] += hk * bt[k, j]
            for j in range(n_out):
                g[j] *= w
    elif mode == MODE_GRADIENT:
        for j in range(n_out):
            g[j] = w * vec[j]
    else:
        for j in range(n_out):
            g[j] = w * normal(key, np.uint64(j))


@kernel
def prepare_grad(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    mode: int,
    key: np.uint64,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
) -> bool:
    """Phase one of a gradient step: fill the scratch h = s·A·x, g and u = s·Bᵀg.

    g is the output-space gradient times ``weight`` and divided by max(‖x‖², 1).

    Writes only scratch, so a multi-module update can check every module before committing.
    Returns False when any of h, g, u is not finite (NaN/inf in x reaches h through the dot
    products; overflow shows up in g or u).
    """
    if not _hidden(a, scale, x, h):
        return False
    _output_grad(bt, h, x, vec, weight, mode, key, g)
    return _scaled_matvec(bt, scale, g, u)


@inline
def _rank_sums(u: np.ndarray, h: np.ndarray) -> tuple[float, float, float]:
    """(‖u‖², ‖h‖², u·h) of the rank-sized scratch vectors, in float64."""
    uu = 0.0
    hh = 0.0
    uh = 0.0
    for k in range(h.shape[0]):
        uu += np.float64(u[k]) * np.float64(u[k])
        hh += np.float64(h[k]) * np.float64(h[k])
        uh += np.float64(u[k]) * np.float64(h[k])
    return uu, hh, uh


@kernel
def step_sums(
    a: np.ndarray,
    bt: np.ndarray,
    x: np.ndarray,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    sums: np.ndarray,
) -> None:
    """The squared norms a fused single-sample step needs, after ``prepare_grad``.

    sums = [‖x‖², ‖g‖², ‖A‖², ‖Bᵀ‖², ‖u‖², ‖h‖², u·h], in float64. With them the norm of the
    rank-one gradients (u⊗x, h⊗g) and of the updated factors are known exactly before any
    weight is written: ‖A − c·u⊗x‖² = ‖A‖² − 2c·(u·h)/s + c²‖u‖²‖x‖², and likewise for Bᵀ.
    """
    aa = 0.0
    for v in a.flat:
        aa += np.float64(v) * np.float64(v)
    bb = 0.0
    for v in bt.flat:
        bb += np.float64(v) * np.float64(v)
    uu, hh, uh = _rank_sums(u, h)
    sums[0] = sq_norm64(x)
    sums[1] = sq_norm64(g)
    sums[2] = aa
    sums[3] = bb
    sums[4] = uu
    sums[5] = hh
    sums[6] = uh


@gil_kernel
def apply_rank_one(
    a: np.ndarray,
    bt: np.ndarray,
    x: np.ndarray,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    c: float,
) -> None:
    """A −= c·u⊗x and Bᵀ −= c·h⊗g: one sample's clipped gradient step, without accumulators.

    The factors c·u and c·h are formed in float32, unless one of them overflows there (a tiny
    g or x can make the update itself small): then the step is computed in float64. The caller
    has checked that the updated weights are finite and that c·u and c·h are finite in float64.
    """
    rank, n_in = a.shape
    n_out = bt.shape[1]
    cf = np.float32(c)
    exact = False
    for k in range(rank):
        exact = exact or not (np.isfinite(cf * u[k]) and np.isfinite(cf * h[k]))
    for k in range(rank):
        if exact:
            uk64 = c * np.float64(u[k])
            for i in range(n_in):
                a[k, i] = np.float32(np.float64(a[k, i]) - uk64 * np.float64(x[i]))
            hk64 = c * np.float64(h[k])
            for j in range(n_out):
                bt[k, j] = np.float32(np.float64(bt[k, j]) - hk64 * np.float64(g[j]))
            continue
        uk = cf * u[k]
        for i in range(n_in):
            a[k, i] -= uk * x[i]
        hk = cf * h[k]
        for j in range(n_out):
            bt[k, j] -= hk * g[j]


@inline
def _factors_finite(c: float, uu: float, hh: float) -> bool:
    """c·‖u‖ and c·‖h‖ are finite in float64, so ``apply_rank_one`` can form its factors."""
    return bool(np.isfinite(c * np.sqrt(uu)) and np.isfinite(c * np.sqrt(hh)))


# Releases the GIL: the Deep loop steps its private copies (rank 8) with it in a worker thread
# (MicroLoRA.step takes step_one_held).
@kernel
def step_one(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    mode: int,
    lr: float,
    max_norm: float,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    sums: np.ndarray,
) -> int:
    """One sample's whole clipped step on one module, in one call (``MicroLoRA.step``).

    ``prepare_grad``, the closed-form norms of ``step_sums``, the clip (``max_norm`` <= 0: none)
    and ``apply_rank_one``; the weights are written only when the result is safe. Returns 0
    when applied (sums[7] = the applied step's norm / lr), 1 when x or the gradient is not
    finite, 2 when the gradient norm is not finite, 3 when the weights would not be finite,
    4 when delta_weight would overflow, ``STEP_INPUT_NORM`` when ‖x‖² is beyond
    ``MAX_INPUT_SQ_NORM`` (the normalised gradient would be zero).
    """
    # prepare_grad and step_sums with ‖A‖² and ‖Bᵀ‖² taken from the passes that read A and Bᵀ
    # anyway: two passes over the factors fewer (rank 8, width 4096: 15.7 -> 13 µs).
    ok, aa = _scaled_matvec_sq(a, scale, x, h)
    if not ok:
        return 1
    xx = sq_norm64(x)
    if not xx <= MAX_INPUT_SQ_NORM:  # checked where step_fused checks it: same decisions
        return STEP_INPUT_NORM
    _output_grad(bt, h, x, vec, weight, mode, np.uint64(0), g)
    ok, bb = _scaled_matvec_sq(bt, scale, g, u)
    if not ok:
        return 1
    gg = sq_norm64(g)
    uu, hh, uh = _rank_sums(u, h)
    norm = np.sqrt(uu * xx + hh * gg)
    if not np.isfinite(norm):
        return 2
    c = lr
    if max_norm > 0.0 and norm > max_norm:
        c = lr * max_norm / norm
    status = step_guards(scale, c, uu, hh, uh, xx, gg, aa, bb)
    if status:
        return status
    apply_rank_one(a, bt, x, h, u, g, c)
    sums[7] = norm * c / lr
    return 0


@held_kernel
def step_one_held(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    mode: int,
    lr: float,
    max_norm: float,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    sums: np.ndarray,
) -> int:
    """:func:`step_one` holding the GIL, for ``MicroLoRA.step``: the adapter it writes in
    place may be the live one (``held_kernel``)."""
    return step_one(a, bt, scale, x, vec, weight, mode, lr, max_norm, h, u, g, sums)


# step_fused's rejections, returned negated (a non-negative result is the applied step's norm)
STEP_NOT_FINITE = 1  # x or the gradient is not finite: the caller raises
STEP_GRAD_NORM = 2  # the gradient norm is not finite
STEP_WEIGHTS = 3  # the updated weights would not be finite
STEP_OVERFLOW = 4  # delta_weight would overflow
STEP_UNSUPPORTED = 5  # shapes that do not match, rank > 2 or another mode: the general path
STEP_INPUT_NORM = 6  # ‖x‖² above MAX_INPUT_SQ_NORM: the caller raises


@inline
def _grad_j(mode: int, w: np.float32, mu: np.float32, v: np.float32, o: np.float32) -> np.float32:
    """One entry of the output-space gradient (see the ``MODE_*`` constants)."""
    if mode == MODE_GRADIENT:
        return w * v
    if mode == MODE_RESIDUAL:
        return w * (mu - (v - o))
    return w * (mu - v)


@inline
def _step_fused_exact(
    a0: np.ndarray,
    a1: np.ndarray,
    b0: np.ndarray,
    b1: np.ndarray,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    w: np.float32,
    h0: np.float32,
    h1: np.float32,
    u0: np.float32,
    u1: np.float32,
    c: float,
    rank: int,
    mode: int,
) -> None:
    """``step_fused``'s pass 3 in float64, for when c·u or c·h overflows float32 (see
    ``apply_rank_one``)."""
    cu0 = c * np.float64(u0)
    cu1 = c * np.float64(u1)
    ch0 = c * np.float64(h0)
    ch1 = c * np.float64(h1)
    for i in range(x.shape[0]):
        xi = np.float64(x[i])
        a0[i] = np.float32(np.float64(a0[i]) - cu0 * xi)
        if rank == 2:
            a1[i] = np.float32(np.float64(a1[i]) - cu1 * xi)
    for j in range(vec.shape[0]):
        p = b0[j]
        if rank == 2:
            q = b1[j]
            gj = _grad_j(mode, w, h0 * p + h1 * q, vec[j], off[j])
            b1[j] = np.float32(np.float64(q) - ch1 * np.float64(gj))
        else:
            gj = _grad_j(mode, w, h0 * p, vec[j], off[j])
        b0[j] = np.float32(np.float64(p) - ch0 * np.float64(gj))


@inline
def step_guards(
    scale: float,
    c: float,
    uu: float,
    hh: float,
    uh: float,
    xx: float,
    gg: float,
    aa: float,
    bb: float,
) -> int:
    """``step_one``'s closed-form guards for one module stepped by c: 0, ``STEP_WEIGHTS`` (the
    factors would not be finite) or ``STEP_OVERFLOW`` (delta_weight would overflow)."""
    cross = 2.0 * c * uh / scale
    na = aa - cross + c * c * uu * xx
    nb = bb - cross + c * c * hh * gg
    if not (np.isfinite(na) and np.isfinite(nb)) or max(na, nb) >= _F32_MAX * _F32_MAX:
        return STEP_WEIGHTS
    if not _factors_finite(c, uu, hh):
        return STEP_WEIGHTS
    if scale * np.sqrt(max(na, 0.0)) * np.sqrt(max(nb, 0.0)) >= _F32_MAX:
        return STEP_OVERFLOW
    return 0


@inline
def _apply_pass(
    a: np.ndarray,
    bt: np.ndarray,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    mode: int,
    w: np.float32,
    h0: np.float32,
    h1: np.float32,
    u0: np.float32,
    u1: np.float32,
    c: float,
) -> None:
    """Pass 3 of a fused step (rank 1-2), once the guards passed: A −= c·u⊗x, Bᵀ −= c·h⊗g,
    g recomputed from the old Bᵀ column; in float64 when c·u or c·h overflows float32."""
    rank = a.shape[0]
    n_in = x.shape[0]
    n_out = vec.shape[0]
    a0 = a[0]
    a1 = a[rank - 1]
    b0 = bt[0]
    b1 = bt[rank - 1]
    cf = np.float32(c)
    cu0 = cf * u0
    cu1 = cf * u1
    ch0 = cf * h0
    ch1 = cf * h1
    if not (np.isfinite(cu0) and np.isfinite(cu1) and np.isfinite(ch0) and np.isfinite(ch1)):
        _step_fused_exact(a0, a1, b0, b1, x, vec, off, w, h0, h1, u0, u1, c, rank, mode)
        return
    # One loop per rank: for rank 1, a1 and b1 are a0 and b0 again, and stores through two
    # views of one row would defeat the vectoriser's alias checks.
    if rank == 2:
        for i in range(n_in):
            xi = x[i]
            a0[i] -= cu0 * xi
            a1[i] -= cu1 * xi
        for j in range(n_out):
            p = b0[j]
            q = b1[j]
            gj = _grad_j(mode, w, h0 * p + h1 * q, vec[j], off[j])
            b0[j] = p - ch0 * gj
            b1[j] = q - ch1 * gj
    else:
        for i in range(n_in):
            a0[i] -= cu0 * x[i]
        for j in range(n_out):
            p = b0[j]
            b0[j] = p - ch0 * _grad_j(mode, w, h0 * p, vec[j], off[j])


@inline
def _fused_sums(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    weight: float,
    mode: int,
) -> tuple[bool, np.float32, np.float32, np.float32, np.float32, np.float32,
           np.float32, np.float32, np.float32, np.float32]:  # fmt: skip
    """Passes 1 and 2 of a fused step (rank 1-2, shapes already checked), in float32.

    Pass 1 over x: h = s·A·x, ‖x‖², ‖A‖²; pass 2 over the output: g (not stored), s⁻¹u = Bᵀg,
    ‖g‖², ‖Bᵀ‖². Returns (h finite, h0, h1, ua0, ua1, w, xx, aa, bb, gg); a sum that overflowed
    is redone in float64 by :func:`_exact_sums`.
    """
    rank = a.shape[0]
    n_in = x.shape[0]
    n_out = vec.shape[0]
    a0 = a[0]
    a1 = a[rank - 1]
    b0 = bt[0]
    b1 = bt[rank - 1]
    zero = np.float32(0.0)
    acc0 = zero
    acc1 = zero
    xx = zero
    aa = zero
    for i in range(n_in):
        xi = x[i]
        p = a0[i]
        acc0 += p * xi
        xx += xi * xi
        if rank == 2:
            q = a1[i]
            acc1 += q * xi
            aa += p * p + q * q
        else:
            aa += p * p
    h0 = np.float32(acc0 * scale)
    h1 = np.float32(acc1 * scale)
    if not (np.isfinite(h0) and np.isfinite(h1)):
        return False, h0, h1, zero, zero, zero, xx, aa, zero, zero
    w = np.float32(weight / max(float(xx), 1.0))
    ua0 = zero
    ua1 = zero
    gg = zero
    bb = zero
    for j in range(n_out):
        p = b0[j]
        if rank == 2:
            q = b1[j]
            gj = _grad_j(mode, w, h0 * p + h1 * q, vec[j], off[j])
            ua1 += q * gj
            bb += p * p + q * q
        else:
            gj = _grad_j(mode, w, h0 * p, vec[j], off[j])
            bb += p * p
        ua0 += p * gj
        gg += gj * gj
    return True, h0, h1, ua0, ua1, w, xx, aa, bb, gg


@inline
def _exact_sums(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    mode: int,
    w: np.float32,
    h0: np.float32,
    h1: np.float32,
    ua0: np.float32,
    ua1: np.float32,
    xx: np.float32,
    aa: np.float32,
    bb: np.float32,
    gg: np.float32,
) -> tuple[bool, np.float32, np.float32, float, float, float, float]:
    """u = s·ua (checked) and the squared norms in float64: a float32 sum that overflowed is
    recomputed in float64, so huge but finite weights are judged as ``step_one`` judges them.
    Returns (u finite, u0, u1, ‖x‖², ‖A‖², ‖Bᵀ‖², ‖g‖²)."""
    rank = a.shape[0]
    n_out = vec.shape[0]
    a0 = a[0]
    a1 = a[rank - 1]
    b0 = bt[0]
    b1 = bt[rank - 1]
    u0 = np.float32(ua0 * scale)
    u1 = np.float32(ua1 * scale)
    if not (np.isfinite(u0) and np.isfinite(u1)):
        return False, u0, u1, 0.0, 0.0, 0.0, 0.0
    xx64: float = np.float64(xx) if np.isfinite(xx) else sq_norm64(x)
    aa64: float = np.float64(aa)
    if not np.isfinite(aa):
        aa64 = sq_norm64(a0) + (sq_norm64(a1) if rank == 2 else 0.0)
    bb64: float = np.float64(bb)
    if not np.isfinite(bb):
        bb64 = sq_norm64(b0) + (sq_norm64(b1) if rank == 2 else 0.0)
    gg64: float = np.float64(gg)
    if not np.isfinite(gg):
        gg64 = 0.0
        for j in range(n_out):
            if rank == 2:
                gj = _grad_j(mode, w, h0 * b0[j] + h1 * b1[j], vec[j], off[j])
            else:
                gj = _grad_j(mode, w, h0 * b0[j], vec[j], off[j])
            gg64 += np.float64(gj) * np.float64(gj)
    return True, u0, u1, xx64, aa64, bb64, gg64


@gil_kernel
def step_fused(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    weight: float,
    mode: int,
    lr: float,
    max_norm: float,
) -> float:
    """``step_one`` for rank 1 and 2 in three passes and no scratch: the Instant loop's step
    (see ``_step_fused``)."""
    return _step_fused(a, bt, scale, x, vec, off, weight, mode, lr, max_norm)


@inline
def _step_fused(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    weight: float,
    mode: int,
    lr: float,
    max_norm: float,
) -> float:
    """``step_one`` for rank 1 and 2 in three passes and no scratch.

    ``mode`` is ``MODE_REGRESS``, ``MODE_GRADIENT`` or ``MODE_RESIDUAL`` (``off`` is read only
    by the last; pass ``vec`` otherwise). The caller guarantees float32 vectors; lengths and
    strides are checked here before any element is read.

    Pass 1 reads A and x (h, ‖x‖², ‖A‖²), pass 2 reads Bᵀ and vec (u = s·Bᵀg, ‖g‖², ‖Bᵀ‖²;
    g itself is not stored), then the clip and the guards of ``step_one`` decide from closed
    forms, and only then pass 3 writes A and Bᵀ, recomputing g from the old Bᵀ. Norms
    accumulate in float32 (float64 accumulators made passes 1 and 2 twice as slow) and a sum
    that overflows is recomputed in float64, so huge but finite weights are judged as before.

    Returns the applied step's norm / lr (>= 0), or a negated ``STEP_*`` code with every weight
    untouched.
    """
    rank = a.shape[0]
    if (
        rank > 2
        or mode not in (MODE_REGRESS, MODE_GRADIENT, MODE_RESIDUAL)
        or x.shape[0] != a.shape[1]
        or x.strides[0] != 4
        or vec.shape[0] != bt.shape[1]
        or vec.strides[0] != 4
        or (mode == MODE_RESIDUAL and (off.shape[0] != vec.shape[0] or off.strides[0] != 4))
    ):
        return -STEP_UNSUPPORTED
    ok, h0, h1, ua0, ua1, w, xx, aa, bb, gg = _fused_sums(a, bt, scale, x, vec, off, weight, mode)
    if not ok:
        return -STEP_NOT_FINITE
    if not input_norm_fits(xx, x):
        return -STEP_INPUT_NORM
    ok, u0, u1, xx64, aa64, bb64, gg64 = _exact_sums(
        a, bt, scale, x, vec, off, mode, w, h0, h1, ua0, ua1, xx, aa, bb, gg
    )
    if not ok:
        return -STEP_NOT_FINITE
    uu = np.float64(u0) * np.float64(u0) + np.float64(u1) * np.float64(u1)
    hh = np.float64(h0) * np.float64(h0) + np.float64(h1) * np.float64(h1)
    uh = np.float64(u0) * np.float64(h0) + np.float64(u1) * np.float64(h1)
    # the clip and the closed-form guards, exactly as in step_one
    norm = np.sqrt(uu * xx64 + hh * gg64)
    if not np.isfinite(norm):
        return -STEP_GRAD_NORM
    c = lr
    if max_norm > 0.0 and norm > max_norm:
        c = lr * max_norm / norm
    status = step_guards(scale, c, uu, hh, uh, xx64, gg64, aa64, bb64)
    if status:
        return -status
    _apply_pass(a, bt, x, vec, off, mode, w, h0, h1, u0, u1, c)
    return float(norm * c / lr)


@gil_kernel
def step_rated_over(
    ca: np.ndarray,
    cbt: np.ndarray,
    cscale: float,
    ta: np.ndarray,
    tbt: np.ndarray,
    tscale: float,
    th: np.ndarray,
    transit: bool,
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    quality: float,
    rating: np.ndarray,
    decay: float,
    temperature: float,
    cap: float,
    mode: int,
    lr: float,
    max_norm: float,
) -> float:
    """The Instant loop's rated step on one module in one call: off = the consolidated delta
    (``forward_into`` with ``ca``, ``cbt``), plus, with ``transit``, the delta of the adapter
    in transit (``forward_add_vec`` with ``ta``, ``tbt`` and its scratch ``th``), then
    ``step_fused`` with ``mode`` (``MODE_RESIDUAL``) on the output ``vec`` rated ``quality``.
    The same code as those three calls, so the same offsets and weights; one call instead of
    three saves their dispatch and the Python between them on every request. ``mode`` is an
    argument rather than a constant because a constant lets the compiler specialise the
    step's loops, and then their float32 sums round differently from ``step_fused``'s.

    The rating's weight comes from the baseline ``rating`` ([count, mean, var], see
    :mod:`sona.kernels.baseline`, with ``decay``, ``temperature`` and ``cap``), which the
    rating then joins as ``MicroLoRA.step`` has it join (:func:`_rating_joins`).

    Returns what ``step_fused`` returns, or ``-STEP_UNSUPPORTED`` with no weight written when
    an offset could not be computed (a length, a stride, or x·A beyond float32): the caller's
    general path then says why. The sample's vectors are prefetched first (see
    :mod:`sona.kernels.prefetch`)."""
    prefetch(x)
    prefetch(vec)
    if not _rated_offset(ca, cbt, cscale, ta, tbt, tscale, th, transit, x, off):
        return -STEP_UNSUPPORTED
    w = output_weight(rating, quality, temperature, cap)
    r = _step_fused(a, bt, scale, x, vec, off, w, mode, lr, max_norm)
    if _rating_joins(r, x):
        update_baseline(rating, quality, decay)
    return r


@inline
def _rating_joins(r: float, x: np.ndarray) -> bool:
    """Whether a fused step's result ``r`` folds its rating into the baseline, as
    ``MicroLoRA._fused_outcome`` decides: once the step is decided, applied or refused by a
    guard; not for a zero input (declined), nor where the general path decides (x or the
    gradient not finite, shapes it does not take)."""
    if r > 0.0:
        return True
    if r == 0.0:  # a zero input is declined; a zero gradient for another one is a step
        nonzero = False
        for e in x:
            if e != 0.0:
                nonzero = True
                break
        return nonzero
    return -r == STEP_GRAD_NORM or -r == STEP_WEIGHTS or -r == STEP_OVERFLOW


@inline
def _rated_offset(
    ca: np.ndarray,
    cbt: np.ndarray,
    cscale: float,
    ta: np.ndarray,
    tbt: np.ndarray,
    tscale: float,
    th: np.ndarray,
    transit: bool,
    x: np.ndarray,
    off: np.ndarray,
) -> bool:
    """off = the consolidated delta of x, plus, with ``transit``, the delta of the adapter in
    transit: ``forward_into``, then ``forward_add_vec``'s code. False where either refuses (a
    length, a stride, or x·A beyond float32)."""
    if _forward(ca, cbt, cscale, x, off) != FORWARD_OK:
        return False
    if transit:
        if (
            ta.shape[1] != x.shape[0]
            or tbt.shape[1] != off.shape[0]
            or tbt.shape[0] != ta.shape[0]
            or th.shape[0] < ta.shape[0]
            or not _hidden(ta, tscale, x, th)
        ):
            return False
        for k in range(ta.shape[0]):
            hk = th[k]
            for j in range(off.shape[0]):
                off[j] += hk * tbt[k, j]
    return True


# step_fused_grad's scratch row, per module (float64): what the decision and the update need
FG_H0, FG_H1, FG_U0, FG_U1, FG_W, FG_XX, FG_AA, FG_BB, FG_GG, FG_C = range(10)
FUSED_SCRATCH = 10


@inline
def _fused_unsupported(
    a: np.ndarray,
    bt: np.ndarray,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    mode: int,
    out: np.ndarray,
) -> bool:
    """Shapes, strides, rank or mode that ``step_fused``'s passes do not take."""
    return bool(
        a.shape[0] > 2
        or mode not in (MODE_REGRESS, MODE_GRADIENT, MODE_RESIDUAL)
        or x.shape[0] != a.shape[1]
        or x.strides[0] != 4
        or vec.shape[0] != bt.shape[1]
        or vec.strides[0] != 4
        or (mode == MODE_RESIDUAL and (off.shape[0] != vec.shape[0] or off.strides[0] != 4))
        or out.shape[0] < FUSED_SCRATCH
    )


@inline
def _fused_grad(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    weight: float,
    mode: int,
    out: np.ndarray,
) -> int:
    """``step_fused``'s passes 1 and 2 for one module of a multi-module step; writes no weight.

    Fills ``out`` (float64, ``FUSED_SCRATCH`` long) with h, u, the gradient weight w and the
    squared norms ‖x‖², ‖A‖², ‖Bᵀ‖², ‖g‖² (float32 sums, recomputed in float64 when they
    overflow, as in ``step_fused``). Returns 0, ``STEP_NOT_FINITE``, ``STEP_UNSUPPORTED``
    or ``STEP_INPUT_NORM`` (same checks as ``step_fused``). ``step_fused_decide`` then clips
    on the joint norm of every module and guards each, and only then ``step_fused_apply``
    writes the weights.
    """
    if _fused_unsupported(a, bt, x, vec, off, mode, out):
        return STEP_UNSUPPORTED
    ok, h0, h1, ua0, ua1, w, xx, aa, bb, gg = _fused_sums(a, bt, scale, x, vec, off, weight, mode)
    if not ok:
        return STEP_NOT_FINITE
    if not input_norm_fits(xx, x):
        return STEP_INPUT_NORM
    return _fused_row(a, bt, scale, x, vec, off, mode, w, h0, h1, ua0, ua1, xx, aa, bb, gg, out)


@inline
def _fused_row(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    mode: int,
    w: np.float32,
    h0: np.float32,
    h1: np.float32,
    ua0: np.float32,
    ua1: np.float32,
    xx: np.float32,
    aa: np.float32,
    bb: np.float32,
    gg: np.float32,
    out: np.ndarray,
) -> int:
    """The end of ``_fused_grad`` from its float32 sums: u = s·ua checked, a sum that
    overflowed redone in float64, the row written. Returns 0 or ``STEP_NOT_FINITE``."""
    ok, u0, u1, xx64, aa64, bb64, gg64 = _exact_sums(
        a, bt, scale, x, vec, off, mode, w, h0, h1, ua0, ua1, xx, aa, bb, gg
    )
    if not ok:
        return STEP_NOT_FINITE
    out[FG_H0] = h0
    out[FG_H1] = h1
    out[FG_U0] = u0
    out[FG_U1] = u1
    out[FG_W] = w
    out[FG_XX] = xx64
    out[FG_AA] = aa64
    out[FG_BB] = bb64
    out[FG_GG] = gg64
    return 0


@inline
def _fused_decide(sums: np.ndarray, scale: float, lr: float, max_norm: float) -> float:
    """The clip and the guards of a multi-module step, from every module's ``step_fused_grad``
    row of ``sums`` (modules, ``FUSED_SCRATCH``).

    The norm is the joint norm of all modules' rank-one gradients; each module's updated
    weights are then checked in module order (``step_one``'s guards). Returns the step's
    norm / lr (>= 0) with the step factor c in every row's ``FG_C``, or a negated ``STEP_*``
    code: then ``step_fused_apply`` must not run.
    """
    n = sums.shape[0]
    total = 0.0
    for m in range(n):
        r = sums[m]
        uu = r[FG_U0] * r[FG_U0] + r[FG_U1] * r[FG_U1]
        hh = r[FG_H0] * r[FG_H0] + r[FG_H1] * r[FG_H1]
        total += uu * r[FG_XX] + hh * r[FG_GG]
    norm = np.sqrt(total)
    if not np.isfinite(norm):
        return -STEP_GRAD_NORM
    c = lr
    if max_norm > 0.0 and norm > max_norm:
        c = lr * max_norm / norm
    for m in range(n):
        r = sums[m]
        uu = r[FG_U0] * r[FG_U0] + r[FG_U1] * r[FG_U1]
        hh = r[FG_H0] * r[FG_H0] + r[FG_H1] * r[FG_H1]
        uh = r[FG_U0] * r[FG_H0] + r[FG_U1] * r[FG_H1]
        status = step_guards(scale, c, uu, hh, uh, r[FG_XX], r[FG_GG], r[FG_AA], r[FG_BB])
        if status:
            return -status
    for m in range(n):
        sums[m, FG_C] = c
    return float(norm * c / lr)


@inline
def _fused_apply(
    a: np.ndarray,
    bt: np.ndarray,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    mode: int,
    row: np.ndarray,
) -> None:
    """``step_fused``'s pass 3 for one module, from its ``step_fused_grad`` row once
    ``step_fused_decide`` has accepted the step: A −= c·u⊗x, Bᵀ −= c·h⊗g, g recomputed from
    the old Bᵀ (the arguments must be those ``step_fused_grad`` saw)."""
    w = np.float32(row[FG_W])
    h0 = np.float32(row[FG_H0])
    h1 = np.float32(row[FG_H1])
    u0 = np.float32(row[FG_U0])
    u1 = np.float32(row[FG_U1])
    _apply_pass(a, bt, x, vec, off, mode, w, h0, h1, u0, u1, row[FG_C])


@kernel
def step_fused_grad(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    weight: float,
    mode: int,
    out: np.ndarray,
) -> int:
    """Phase one of a multi-module step, for one module (see ``_fused_grad``)."""
    return _fused_grad(a, bt, scale, x, vec, off, weight, mode, out)


@kernel
def step_fused_decide(sums: np.ndarray, scale: float, lr: float, max_norm: float) -> float:
    """Phase two of a multi-module step, for all modules (see ``_fused_decide``)."""
    return _fused_decide(sums, scale, lr, max_norm)


@gil_kernel
def step_fused_apply(
    a: np.ndarray,
    bt: np.ndarray,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    mode: int,
    row: np.ndarray,
) -> None:
    """Phase three of a multi-module step, for one module (see ``_fused_apply``)."""
    _fused_apply(a, bt, x, vec, off, mode, row)


@inline
def _fused_pair_rank2(
    a0: np.ndarray,
    bt0: np.ndarray,
    off0: np.ndarray,
    mode0: int,
    a1: np.ndarray,
    bt1: np.ndarray,
    off1: np.ndarray,
    mode1: int,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    lr: float,
    max_norm: float,
    sums: np.ndarray,
) -> float:
    """``step_fused_pair`` for two rank-2 modules: each pass runs over x (or the output) once
    for both modules, which reads x and vec once instead of twice (~10% at d = 4096). The
    same sums, guards and float64 fallbacks as the per-module phases."""
    r0 = sums[0]
    r1 = sums[1]
    if _fused_unsupported(a0, bt0, x, vec, off0, mode0, r0) or _fused_unsupported(
        a1, bt1, x, vec, off1, mode1, r1
    ):
        return -STEP_UNSUPPORTED
    n_in = x.shape[0]
    n_out = vec.shape[0]
    p0 = a0[0]
    p1 = a0[1]
    q0 = a1[0]
    q1 = a1[1]
    zero = np.float32(0.0)
    # pass 1 over x, both modules: h, ‖x‖², ‖A‖²
    acc00 = zero
    acc01 = zero
    acc10 = zero
    acc11 = zero
    xx = zero
    aa0 = zero
    aa1 = zero
    for i in range(n_in):
        xi = x[i]
        e00 = p0[i]
        e01 = p1[i]
        e10 = q0[i]
        e11 = q1[i]
        acc00 += e00 * xi
        acc01 += e01 * xi
        acc10 += e10 * xi
        acc11 += e11 * xi
        xx += xi * xi
        aa0 += e00 * e00 + e01 * e01
        aa1 += e10 * e10 + e11 * e11
    h00 = np.float32(acc00 * scale)
    h01 = np.float32(acc01 * scale)
    h10 = np.float32(acc10 * scale)
    h11 = np.float32(acc11 * scale)
    if not (np.isfinite(h00) and np.isfinite(h01) and np.isfinite(h10) and np.isfinite(h11)):
        return -STEP_NOT_FINITE
    if not input_norm_fits(xx, x):
        return -STEP_INPUT_NORM
    w = np.float32(weight / max(float(xx), 1.0))
    # pass 2 over the output, both modules: u = s·Bᵀg, ‖g‖², ‖Bᵀ‖² (g not stored)
    b00 = bt0[0]
    b01 = bt0[1]
    b10 = bt1[0]
    b11 = bt1[1]
    ua00 = zero
    ua01 = zero
    ua10 = zero
    ua11 = zero
    gg0 = zero
    gg1 = zero
    bb0 = zero
    bb1 = zero
    for j in range(n_out):
        c00 = b00[j]
        c01 = b01[j]
        c10 = b10[j]
        c11 = b11[j]
        v = vec[j]
        g0 = _grad_j(mode0, w, h00 * c00 + h01 * c01, v, off0[j])
        g1 = _grad_j(mode1, w, h10 * c10 + h11 * c11, v, off1[j])
        ua00 += c00 * g0
        ua01 += c01 * g0
        ua10 += c10 * g1
        ua11 += c11 * g1
        gg0 += g0 * g0
        gg1 += g1 * g1
        bb0 += c00 * c00 + c01 * c01
        bb1 += c10 * c10 + c11 * c11
    if _fused_row(a0, bt0, scale, x, vec, off0, mode0, w, h00, h01, ua00, ua01, xx, aa0, bb0,
                  gg0, r0):  # fmt: skip
        return -STEP_NOT_FINITE
    if _fused_row(a1, bt1, scale, x, vec, off1, mode1, w, h10, h11, ua10, ua11, xx, aa1, bb1,
                  gg1, r1):  # fmt: skip
        return -STEP_NOT_FINITE
    r = _fused_decide(sums, scale, lr, max_norm)
    if r < 0.0:
        return r
    # pass 3, both modules: A −= c·u⊗x, Bᵀ −= c·h⊗g with g recomputed from the old Bᵀ
    cf = np.float32(r0[FG_C])
    cu00 = cf * np.float32(r0[FG_U0])
    cu01 = cf * np.float32(r0[FG_U1])
    cu10 = cf * np.float32(r1[FG_U0])
    cu11 = cf * np.float32(r1[FG_U1])
    ch00 = cf * h00
    ch01 = cf * h01
    ch10 = cf * h10
    ch11 = cf * h11
    if not (
        np.isfinite(cu00)
        and np.isfinite(cu01)
        and np.isfinite(cu10)
        and np.isfinite(cu11)
        and np.isfinite(ch00)
        and np.isfinite(ch01)
        and np.isfinite(ch10)
        and np.isfinite(ch11)
    ):
        _fused_apply(a0, bt0, x, vec, off0, mode0, r0)  # each takes its float64 way if needed
        _fused_apply(a1, bt1, x, vec, off1, mode1, r1)
        return r
    for i in range(n_in):
        xi = x[i]
        p0[i] -= cu00 * xi
        p1[i] -= cu01 * xi
        q0[i] -= cu10 * xi
        q1[i] -= cu11 * xi
    for j in range(n_out):
        c00 = b00[j]
        c01 = b01[j]
        c10 = b10[j]
        c11 = b11[j]
        v = vec[j]
        g0 = _grad_j(mode0, w, h00 * c00 + h01 * c01, v, off0[j])
        g1 = _grad_j(mode1, w, h10 * c10 + h11 * c11, v, off1[j])
        b00[j] = c00 - ch00 * g0
        b01[j] = c01 - ch01 * g0
        b10[j] = c10 - ch10 * g1
        b11[j] = c11 - ch11 * g1
    return r


@gil_kernel
def step_fused_pair(
    a0: np.ndarray,
    bt0: np.ndarray,
    off0: np.ndarray,
    mode0: int,
    a1: np.ndarray,
    bt1: np.ndarray,
    off1: np.ndarray,
    mode1: int,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    lr: float,
    max_norm: float,
    sums: np.ndarray,
) -> float:
    """The three phases of a two-module step in one call (two target modules is the default
    configuration): ``step_fused``'s result and ``STEP_*`` codes, with the clip on the joint
    norm and both modules guarded before either is written. ``sums`` is (2, FUSED_SCRATCH).
    """
    return _step_fused_pair(
        a0, bt0, off0, mode0, a1, bt1, off1, mode1, scale, x, vec, weight, lr, max_norm, sums
    )


@inline
def _step_fused_pair(
    a0: np.ndarray,
    bt0: np.ndarray,
    off0: np.ndarray,
    mode0: int,
    a1: np.ndarray,
    bt1: np.ndarray,
    off1: np.ndarray,
    mode1: int,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    weight: float,
    lr: float,
    max_norm: float,
    sums: np.ndarray,
) -> float:
    if sums.shape[0] != 2:
        return -STEP_UNSUPPORTED
    if a0.shape[0] == 2 and a1.shape[0] == 2:
        return _fused_pair_rank2(
            a0, bt0, off0, mode0, a1, bt1, off1, mode1, scale, x, vec, weight, lr, max_norm, sums
        )
    status = _fused_grad(a0, bt0, scale, x, vec, off0, weight, mode0, sums[0])
    if status:
        return -status
    status = _fused_grad(a1, bt1, scale, x, vec, off1, weight, mode1, sums[1])
    if status:
        return -status
    r = _fused_decide(sums, scale, lr, max_norm)
    if r < 0.0:
        return r
    _fused_apply(a0, bt0, x, vec, off0, mode0, sums[0])
    _fused_apply(a1, bt1, x, vec, off1, mode1, sums[1])
    return r


@gil_kernel
def step_rated_over_pair(
    ca0: np.ndarray,
    cbt0: np.ndarray,
    ca1: np.ndarray,
    cbt1: np.ndarray,
    cscale: float,
    ta0: np.ndarray,
    tbt0: np.ndarray,
    ta1: np.ndarray,
    tbt1: np.ndarray,
    tscale: float,
    th: np.ndarray,
    transit: bool,
    a0: np.ndarray,
    bt0: np.ndarray,
    off0: np.ndarray,
    mode0: int,
    a1: np.ndarray,
    bt1: np.ndarray,
    off1: np.ndarray,
    mode1: int,
    scale: float,
    x: np.ndarray,
    vec: np.ndarray,
    quality: float,
    rating: np.ndarray,
    decay: float,
    temperature: float,
    cap: float,
    lr: float,
    max_norm: float,
    sums: np.ndarray,
) -> float:
    """``step_rated_over`` for two modules (the default configuration): each module's offset
    from the consolidated adapter (``ca0``, ``cbt0`` for the first) plus, with ``transit``,
    the adapter in transit (``ta0``, ``tbt0``; ``th`` its scratch), then ``step_fused_pair``
    with ``mode0`` and ``mode1``. The same code as those calls, so the same offsets and
    weights; ``-STEP_UNSUPPORTED`` with no weight written where an offset could not be
    computed. Each module gets its own mode argument, as in ``step_fused_pair``: one value
    for both lets the compiler merge the modules' branches, and the sums then round
    differently (see ``step_rated_over``). The sample's vectors are prefetched first."""
    prefetch(x)
    prefetch(vec)
    if not _rated_offset(ca0, cbt0, cscale, ta0, tbt0, tscale, th, transit, x, off0):
        return -STEP_UNSUPPORTED
    if not _rated_offset(ca1, cbt1, cscale, ta1, tbt1, tscale, th, transit, x, off1):
        return -STEP_UNSUPPORTED
    w = output_weight(rating, quality, temperature, cap)
    r = _step_fused_pair(
        a0, bt0, off0, mode0, a1, bt1, off1, mode1, scale, x, vec, w, lr, max_norm, sums
    )
    if _rating_joins(r, x):
        update_baseline(rating, quality, decay)
    return r


@kernel
def commit_grad(
    a: np.ndarray,
    scale: float,
    x: np.ndarray,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    grad_a: np.ndarray,
    grad_bt: np.ndarray,
    recompute_h: bool,
) -> None:
    """Phase two: dBᵀ += h·gᵀ, dA += u·xᵀ (gradients of ⟨g, s·B·A·x⟩).

    With ``recompute_h`` (gradient checkpointing) h = s·A·x is computed again here instead of
    being kept from phase one.
    """
    if recompute_h:
        _hidden(a, scale, x, h)
    rank, n_in = grad_a.shape
    n_out = grad_bt.shape[1]
    for k in range(rank):
        hk = h[k]
        for j in range(n_out):
            grad_bt[k, j] += hk * g[j]
        uk = u[k]
        for i in range(n_in):
            grad_a[k, i] += uk * x[i]


@kernel
def apply_dropout(
    x: np.ndarray, p: float, key: np.uint64, counter: np.uint64, out: np.ndarray
) -> None:
    """Inverted dropout: out = x·mask/(1 − p), mask keyed on (key, counter) for determinism."""
    keep = np.float32(1.0 / (1.0 - p))
    base = counter * np.uint64(x.shape[0])
    for i in range(x.shape[0]):
        if uniform01(key, base + np.uint64(i)) < p:
            out[i] = 0.0
        else:
            out[i] = x[i] * keep
