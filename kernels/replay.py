"""Replaying stored samples into an adapter in one GIL-free call.

Stepping an adapter sample by sample from Python hands the GIL back and forth twice per sample:
a worker thread replaying ~13,000 steps per Deep run then needs the GIL ~13,000 times, and
while the event loop is busy each of those waits (the run took ~2 s instead of 0.5 s under a
latency benchmark's load). This kernel runs a whole epoch: per sample exactly the step
``MicroLoRA.step`` takes on its general path (``step_one`` for one module; for several,
``prepare_grad`` and ``step_sums`` per module, the clip on their joint norm, the closed-form
guards, then ``apply_rank_one``), the rating baseline of rated outputs, and every ``every``
applied steps an EWC++ proximal step on each module.

It is compiled without fast-math flags: the scalar bookkeeping (the baseline, the joint norm,
the clip factor, the guards) must round exactly like the Python floats of the per-sample path,
so both give the same weights. The kernels it calls keep their own flags.

``relearn`` does the same for the Background loop's mini-batch strategies: per sample what
``MicroLoRA.adapt`` accumulates, and per mini-batch ``apply_updates`` followed by the EWC++ step.
"""

from __future__ import annotations

import math

import numpy as np
from sona.kernels.baseline import output_weight, update_baseline
from sona.kernels.ewc import prox_step
from sona.kernels.jit import strict_inline, strict_kernel
from sona.kernels.lora import (
    STEP_INPUT_NORM,
    apply_rank_one,
    commit_grad,
    prepare_grad,
    step_guards,
    step_one,
    step_sums,
)
from sona.kernels.update import (
    F32_MAX,
    MAX_INPUT_SQ_NORM,
    apply_step,
    candidate_sq_norms,
    grad_sq_norm,
    sq_norm64,
)

# replay_epoch's EWC++ arguments: ut, c, mt (one anchor per module), then one module's scratch
# q, dq, w, gram, kmat, lower, vec, bt_new (see kernels.ewc.prox_step)
EwcArrays = tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
    np.ndarray, np.ndarray, np.ndarray, np.ndarray,
]  # fmt: skip

# replay_epoch's outcome slots
OUT_APPLIED = 0  # steps applied
OUT_NORM = 1  # the last applied step's norm / lr (MicroLoRA.last_update_norm)
OUT_LAST = 2  # status of the last sample that was not refused as non-finite (-1: none)
# OUT_LAST's codes for samples declined as step and adapt decline them, apart from the
# kernels' STEP_* and BATCH_* codes
DECLINED_ZERO = 16  # a zero input
DECLINED_RATING = 17  # quality-only feedback: a rating of noise this adapter never explored


@strict_inline
def _declined(x: np.ndarray, rating_only: bool) -> int:
    """0, or the ``DECLINED_*`` code of a sample ``step`` and ``adapt`` decline: a zero input
    (it has no gradient; checked up to the first non-zero element) or, for a valid one,
    quality-only feedback. A quality-only sample with a non-finite input, or one with ‖x‖²
    beyond ``MAX_INPUT_SQ_NORM``, returns ``DECLINED_RATING`` + 1: the per-sample path
    refuses it."""
    zero = True
    for e in x:
        if e != 0.0:
            zero = False
            break
    if zero:
        return DECLINED_ZERO
    if rating_only:
        # NaN or inf in x makes the float64 sum NaN or inf
        return DECLINED_RATING if sq_norm64(x) <= MAX_INPUT_SQ_NORM else DECLINED_RATING + 1
    return 0


@strict_inline
def _joint_step(
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
    out: np.ndarray,
) -> int:
    """One sample's step on every module with the clip on their joint norm (the several-module
    branch of ``MicroLoRA._step_general``); statuses as ``step_one``'s, ``STEP_INPUT_NORM``
    included."""
    m = a.shape[0]
    for i in range(m):
        key = np.uint64(0)
        if not prepare_grad(a[i], bt[i], scale, x, vec, weight, mode, key, h[i], u[i], g[i]):
            return 1
        step_sums(a[i], bt[i], x, h[i], u[i], g[i], sums[i])
    # ‖x‖² (float64, sums[i, 0]) beyond the limit: step refuses x, as step_one does; g was
    # divided by it in float32 and is ~0 or, once that overflowed, exactly 0
    if not sums[0, 0] <= MAX_INPUT_SQ_NORM:
        return STEP_INPUT_NORM
    total = 0.0
    for i in range(m):
        total += sums[i, 4] * sums[i, 0] + sums[i, 5] * sums[i, 1]
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        return 2
    c = lr
    if max_norm > 0.0 and norm > max_norm:
        c = lr * (max_norm / norm)
    for i in range(m):
        s = sums[i]  # xx, gg, aa, bb, uu, hh, uh as step_sums leaves them
        status = step_guards(scale, c, s[4], s[5], s[6], s[0], s[1], s[2], s[3])
        if status:
            return status
    for i in range(m):
        apply_rank_one(a[i], bt[i], x, h[i], u[i], g[i], c)
    out[OUT_NORM] = norm * (c / lr)
    return 0


@strict_inline
def _prox_all(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    tau: float,
    ut: np.ndarray,
    c: np.ndarray,
    mt: np.ndarray,
    q: np.ndarray,
    dq: np.ndarray,
    w: np.ndarray,
    gram: np.ndarray,
    kmat: np.ndarray,
    lower: np.ndarray,
    vec: np.ndarray,
    bt_new: np.ndarray,
) -> None:
    """``EwcImportance.step``: each module in turn, stopping at the first that is skipped.

    Numba's on-disk cache does not track the import of ``prox_step``: the cached kernels of
    this file keep the step they were compiled with until this file itself changes."""
    for i in range(a.shape[0]):
        p = prox_step(
            a[i], bt[i], scale, ut, c, mt[i], tau, q, dq, w, gram, kmat, lower, vec, bt_new
        )
        if p < 0.0:
            return


@strict_kernel
def replay_epoch(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    xs: np.ndarray,
    vecs: np.ndarray,
    rows: np.ndarray,
    modes: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    qualities: np.ndarray,
    rating_only: np.ndarray,
    baseline: np.ndarray,
    decay: float,
    temperature: float,
    cap: float,
    lr: float,
    max_norm: float,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    sums: np.ndarray,
    every: int,
    lam: float,
    ut: np.ndarray,
    c: np.ndarray,
    mt: np.ndarray,
    q: np.ndarray,
    dq: np.ndarray,
    w: np.ndarray,
    gram: np.ndarray,
    kmat: np.ndarray,
    lower: np.ndarray,
    vec: np.ndarray,
    bt_new: np.ndarray,
    out: np.ndarray,
) -> None:
    """Step the adapter (a, bt: (modules, rank, in) and (modules, rank, out), written in place)
    on the samples ``rows`` of ``xs`` / ``vecs``, in that order, at ``lr`` (``max_norm`` <= 0:
    no clip).

    Per sample: ``modes`` (``MODE_REGRESS`` / ``MODE_GRADIENT``), ``targets`` (the one module
    index it steps, or -1 for all of them, clipped jointly) and ``weights``; a NaN weight
    marks a rated output, whose weight comes from ``baseline`` ([count, mean, var], updated
    after its step unless the step was refused as non-finite) and ``qualities``. ``lam`` > 0
    takes an EWC++ proximal step of 2·lr·lam·(steps since the last one) after every ``every``
    applied steps and after the last. Samples ``step`` declines (a zero input; ``rating_only``
    ones) are passed over with their ``DECLINED_*`` code. ``out`` receives the counts
    (``OUT_*``).
    """
    m = a.shape[0]
    out[OUT_APPLIED] = 0.0
    out[OUT_LAST] = -1.0
    since = 0
    for r in range(rows.shape[0]):
        k = rows[r]
        x = xs[k]
        declined = _declined(x, rating_only[k])
        if declined:
            if declined <= DECLINED_RATING:  # else not finite: refused, the note stays
                out[OUT_LAST] = declined
            continue
        target = vecs[k]
        rated = math.isnan(weights[k])
        wk = output_weight(baseline, qualities[k], temperature, cap) if rated else weights[k]
        t = targets[k]
        if m == 1 or t >= 0:
            i = max(t, 0)
            status = step_one(
                a[i], bt[i], scale, x, target, wk, modes[k], lr, max_norm, h[i], u[i], g[i], sums[i]
            )
            if status == 0:
                out[OUT_NORM] = sums[i, 7]
        else:
            status = _joint_step(
                a, bt, scale, x, target, wk, modes[k], lr, max_norm, h, u, g, sums, out
            )
        # refused as step raises (x or the gradient not finite, ‖x‖ beyond the limit): no
        # step, and the baseline does not move
        if status == 1 or status == STEP_INPUT_NORM:
            continue
        if rated:
            update_baseline(baseline, qualities[k], decay)
        out[OUT_LAST] = status
        if status != 0:
            continue
        out[OUT_APPLIED] += 1.0
        since += 1
        if since == every:
            if lam > 0.0:
                tau = 2.0 * lr * lam * since
                _prox_all(a, bt, scale, tau, ut, c, mt, q, dq, w, gram, kmat, lower, vec, bt_new)
            since = 0
    if since and lam > 0.0:
        tau = 2.0 * lr * lam * since
        _prox_all(a, bt, scale, tau, ut, c, mt, q, dq, w, gram, kmat, lower, vec, bt_new)


# relearn's outcome slots (replay_epoch's layout, counted per mini-batch) and its per-batch
# codes (0 applied, else the rejection)
RE_APPLIED = OUT_APPLIED  # mini-batches applied
RE_NORM = OUT_NORM  # the last applied batch's clipped norm (MicroLoRA.last_update_norm)
RE_LAST = OUT_LAST  # code of the last batch (-1: none)
RE_PASSED = 3  # samples passed over because their gradient overflows float32
RE_SLOTS = 4
BATCH_NOT_FINITE = 1  # the accumulated gradient is not finite
BATCH_WEIGHTS = 2  # the update would make the weights non-finite
BATCH_OVERFLOW = 3  # the update would make delta_weight overflow


@strict_inline
def _apply_batch(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    ga: np.ndarray,
    gbt: np.ndarray,
    n: int,
    lr: float,
    max_norm: float,
    out: np.ndarray,
) -> int:
    """``MicroLoRA.apply_updates`` on n accumulated samples: 0, or the rejection's code (the
    accumulators are then cleared and the weights untouched)."""
    m = a.shape[0]
    sq = 0.0
    for i in range(m):
        sq += grad_sq_norm(ga[i], gbt[i])
    norm = math.sqrt(sq) / n
    code = 0
    clip = 1.0
    step = 0.0
    if not math.isfinite(norm):
        code = BATCH_NOT_FINITE
    else:
        clip = 1.0 if norm <= max_norm else max_norm / norm
        step = lr * clip / n
        for i in range(m):
            na, nb = candidate_sq_norms(a[i], ga[i], bt[i], gbt[i], step)
            if not (math.isfinite(na) and math.isfinite(nb)):
                code = BATCH_WEIGHTS
                break
            if scale * math.sqrt(na) * math.sqrt(nb) >= F32_MAX:
                code = BATCH_OVERFLOW
                break
    if code:
        ga[:] = 0.0
        gbt[:] = 0.0
        return code
    for i in range(m):
        apply_step(a[i], ga[i], bt[i], gbt[i], step)
    out[RE_NORM] = norm * clip
    return 0


@strict_kernel
def relearn(
    a: np.ndarray,
    bt: np.ndarray,
    scale: float,
    xs: np.ndarray,
    vecs: np.ndarray,
    rows: np.ndarray,
    modes: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    qualities: np.ndarray,
    rating_only: np.ndarray,
    sample_weights: np.ndarray,
    baseline: np.ndarray,
    decay: float,
    temperature: float,
    cap: float,
    lr: float,
    max_norm: float,
    mini_batch: int,
    recompute: bool,
    h: np.ndarray,
    u: np.ndarray,
    g: np.ndarray,
    ga: np.ndarray,
    gbt: np.ndarray,
    lam: float,
    ut: np.ndarray,
    c: np.ndarray,
    mt: np.ndarray,
    q: np.ndarray,
    dq: np.ndarray,
    w: np.ndarray,
    gram: np.ndarray,
    kmat: np.ndarray,
    lower: np.ndarray,
    vec: np.ndarray,
    bt_new: np.ndarray,
    codes: np.ndarray,
    out: np.ndarray,
) -> int:
    """Accumulate the samples ``rows`` (the r-th weighted by ``sample_weights[r]``, each into
    the module ``targets`` names, or every module for -1) into
    ``ga`` / ``gbt`` (zero on entry, zero on return) and apply them every ``mini_batch``
    samples and after the last: each mini-batch of k samples at lr·k with its mean gradient
    clipped at max_norm, as each of k steps would be, so it moves the factors by at most
    lr·k·max_norm; then, when applied and ``lam`` > 0, an EWC++ step of 2·lr·k·lam.

    ``codes`` receives each mini-batch's outcome (0 or a ``BATCH_*`` code), ``out`` the counts
    (``RE_*``, ``RE_SLOTS`` of them). Returns -1, or the position in ``rows`` of a sample whose
    x is not finite or whose ‖x‖² is beyond ``MAX_INPUT_SQ_NORM``, where it stops (the
    per-sample path raises there). Samples ``adapt`` declines are passed over as in
    ``replay_epoch``; so are finite samples whose gradient overflows float32 (a target near
    float32's largest value, say), counted in ``out[RE_PASSED]``: what the adapter has become
    since the Instant loop applied them decides that, not the input, and one such sample must
    not stop the rest from being learned.
    """
    m = a.shape[0]
    out[RE_APPLIED] = 0.0
    out[RE_LAST] = -1.0
    out[RE_PASSED] = 0.0
    batch = 0
    done = 0
    key = np.uint64(0)
    n = rows.shape[0]
    for r in range(n + 1):  # the pass after the last row applies the unfinished mini-batch
        if r == n:
            if batch == 0:
                break
        else:
            k = rows[r]
            x = xs[k]
            declined = _declined(x, rating_only[k])
            if declined > DECLINED_RATING:
                return r
            if not declined and not sq_norm64(x) <= MAX_INPUT_SQ_NORM:  # adapt refuses x
                return r
            if declined:
                out[RE_LAST] = declined
                continue
            target = vecs[k]
            rated = math.isnan(weights[k])
            wk = output_weight(baseline, qualities[k], temperature, cap) if rated else weights[k]
            wk = wk * sample_weights[r]
            mode = modes[k]
            t = targets[k]  # the one module the sample is for, or -1: all
            overflow = False
            for i in range(m):  # scratch only: nothing is accumulated unless every module is finite
                skip = t >= 0 and i != t
                if not skip and not prepare_grad(
                    a[i], bt[i], scale, x, target, wk, mode, key, h[i], u[i], g[i]
                ):
                    overflow = True
                    break
            if overflow:
                out[RE_PASSED] += 1.0
                continue
            for i in range(m):
                if t < 0 or i == t:
                    commit_grad(a[i], scale, x, h[i], u[i], g[i], ga[i], gbt[i], recompute)
            if rated:
                update_baseline(baseline, qualities[k], decay)
            batch += 1
            if batch < mini_batch:
                continue
        code = _apply_batch(a, bt, scale, ga, gbt, batch, lr * batch, max_norm, out)
        codes[done] = code
        done += 1
        out[RE_LAST] = code
        if code == 0:
            out[RE_APPLIED] += 1.0
            if lam > 0.0:
                tau = 2.0 * (lr * batch) * lam
                _prox_all(a, bt, scale, tau, ut, c, mt, q, dq, w, gram, kmat, lower, vec, bt_new)
        batch = 0
    return -1


def no_ewc(modules: int, rank: int, n_out: int) -> EwcArrays:
    """Placeholders for ``replay_epoch``'s EWC++ arguments when it takes no proximal step."""
    f32 = np.float32
    f64 = np.float64
    small = np.zeros((rank, 1), f64)
    return (
        np.zeros((1, 1), f32),
        np.zeros(1, f32),
        np.zeros((modules, 1, n_out), f32),
        np.zeros((rank, 1), f32),
        np.zeros((rank, 1), f32),
        small,
        np.zeros((rank, rank), f64),
        np.zeros((rank, rank), f64),
        np.zeros((rank, rank), f64),
        np.zeros(rank, f64),
        np.zeros((rank, n_out), f32),
    )
