"""Compile (or load from the on-disk cache) every kernel before the first request.

A cold compile of all kernels takes seconds and a cache load ~0.2 s; either is unacceptable on
the first request of a latency-sensitive service, so runtimes call :func:`warm_up` at start. It
also resolves :data:`fast`, the dispatch-free entry points of the hot-path kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from sona.kernels import baseline, batch, ewc, gather, linalg, lora, merge, random, replay, update
from sona.kernels.jit import entry_point


class FastKernels:
    """Direct entry points for C-contiguous float32 arguments (see ``jit.entry_point``)."""

    forward_vec: Callable[..., Any]
    forward_into: Callable[..., Any]
    forward_reused: Callable[..., Any]
    forward_reused_packed: Callable[..., Any]
    forward_add_vec: Callable[..., Any]
    prepare_grad: Callable[..., Any]
    step_sums: Callable[..., Any]
    apply_rank_one: Callable[..., Any]
    step_one: Callable[..., Any]  # step_one_held: MicroLoRA.step's, on its own weights
    step_fused: Callable[..., Any]
    step_rated_over: Callable[..., Any]
    step_rated_over_pair: Callable[..., Any]
    step_fused_grad: Callable[..., Any]
    step_fused_decide: Callable[..., Any]
    step_fused_apply: Callable[..., Any]
    step_fused_pair: Callable[..., Any]
    commit_grad: Callable[..., Any]
    grad_sq_norm: Callable[..., Any]
    candidate_sq_norms: Callable[..., Any]
    apply_step: Callable[..., Any]
    all_finite_vec: Callable[..., Any]
    add_if_finite: Callable[..., Any]
    input_status_vec: Callable[..., Any]
    ewc_prox_step: Callable[..., Any]
    ewc_penalty: Callable[..., Any]
    record_address: Callable[..., Any]
    # whether the forward_reused kernels tell a free result buffer from a held one here
    reuses_results: bool = False


fast = FastKernels()
_done = False


def warm_up(*, force: bool = False) -> float:
    """Run every kernel once on tiny float32 arrays; returns the seconds it took."""
    global _done
    if _done and not force:
        return 0.0
    t0 = time.perf_counter()
    f32 = np.float32
    a = np.ones((2, 3), f32)
    bt = np.ones((2, 4), f32)
    x = np.ones(3, f32)
    xb = np.ones((2, 3), f32)
    h = np.empty(2, f32)
    hb = np.empty((2, 2), f32)
    out = np.zeros(4, f32)
    outb = np.zeros((2, 4), f32)
    g = np.zeros(4, f32)
    u = np.empty(2, f32)
    ga = np.zeros_like(a)
    gbt = np.zeros_like(bt)
    key = np.uint64(1)
    s = 0.5
    fast.forward_vec = entry_point(lora.forward_vec, a, bt, s, x, h, out)
    fast.forward_add_vec = entry_point(lora.forward_add_vec, a, bt, s, x, h, out)
    fast.forward_into = entry_point(lora.forward_into, a, bt, s, x, out)
    fast.forward_reused = entry_point(lora.forward_reused, a, bt, s, x, out)
    w = np.ones((2, 2, 3), f32)
    fast.forward_reused_packed = entry_point(lora.forward_reused_packed, w, s, x, x.copy())
    fast.reuses_results = _reuse_is_sound(w, x)
    if not fast.reuses_results:
        fast.forward_reused = fast.forward_reused_packed = _never_free
    fast.prepare_grad = entry_point(lora.prepare_grad, a, bt, s, x, g, 1.0, 0, key, h, u, g)
    fast.commit_grad = entry_point(lora.commit_grad, a, s, x, h, u, g, ga, gbt, False)
    fast.step_sums = entry_point(lora.step_sums, a, bt, x, h, u, g, np.zeros(8))
    fast.step_one = entry_point(
        lora.step_one_held, a.copy(), bt.copy(), s, x, g, 1.0, 0, 0.1, 1.0, h, u, g.copy(),
        np.zeros(8),
    )  # fmt: skip
    fast.step_fused = entry_point(
        lora.step_fused, a.copy(), bt.copy(), s, x, g, g, 1.0, 0, 0.1, 1.0
    )
    fast.step_rated_over = entry_point(
        lora.step_rated_over, a, bt, s, a, bt, s, h, True, a.copy(), bt.copy(), s, x, g,
        out.copy(), 0.5, np.zeros(3), 0.9, 1.0, 4.0, lora.MODE_RESIDUAL, 0.1, 1.0,
    )  # fmt: skip
    rows = np.zeros((2, lora.FUSED_SCRATCH))
    fast.step_fused_grad = entry_point(lora.step_fused_grad, a, bt, s, x, g, g, 1.0, 0, rows[0])
    fast.step_fused_decide = entry_point(lora.step_fused_decide, rows, s, 0.1, 1.0)
    fast.step_fused_apply = entry_point(
        lora.step_fused_apply, a.copy(), bt.copy(), x, g, g, 0, rows[0]
    )
    fast.step_rated_over_pair = entry_point(
        lora.step_rated_over_pair, a, bt, a, bt, s, a, bt, a, bt, s, h, True, a.copy(),
        bt.copy(), out.copy(), lora.MODE_RESIDUAL, a.copy(), bt.copy(), out.copy(),
        lora.MODE_RESIDUAL, s, x, g, 0.5, np.zeros(3), 0.9, 1.0, 4.0, 0.1, 1.0, rows,
    )  # fmt: skip
    fast.step_fused_pair = entry_point(
        lora.step_fused_pair, a.copy(), bt.copy(), g, 0, a.copy(), bt.copy(), g, 0,
        s, x, g, 1.0, 0.1, 1.0, rows,
    )  # fmt: skip
    fast.apply_rank_one = entry_point(lora.apply_rank_one, a.copy(), bt.copy(), x, h, u, g, 0.0)
    fast.grad_sq_norm = entry_point(update.grad_sq_norm, ga, gbt)
    fast.candidate_sq_norms = entry_point(update.candidate_sq_norms, a, ga, bt, gbt, 0.0)
    fast.apply_step = entry_point(update.apply_step, a, ga, bt, gbt, 0.0)
    fast.all_finite_vec = entry_point(update.vec_all_finite, x)
    fast.add_if_finite = entry_point(update.add_if_finite, out.copy(), g)
    fast.input_status_vec = entry_point(update.vec_input_status, x)
    _warm_ewc(a, bt, s)
    _warm_replay(a, bt, s)
    baseline.warm_up()  # the rating baseline, for the general path's steps
    batch.warm_up()  # the Background loop's detector, pattern bank and objective
    linalg.warm_up()  # its eigen-decomposition, QR and small SVD
    merge.warm_up()  # EWC_MERGE's weighted concatenation and truncated SVD
    gather.warm_up()  # the Background loop's rows
    row = np.frombuffer(x.tobytes(), f32)  # a sample's embedding: a read-only copy
    fast.record_address = entry_point(gather.record_address, row, 3, np.zeros(1, np.int64), 0)
    lora.forward_vec(a, bt, s, np.ones((3, 2), f32)[:, 0], h, out)  # strided input layout
    lora.forward_add_vec(a, bt, s, np.ones((3, 2), f32)[:, 0], h, out)
    lora.step_one(a.copy(), bt.copy(), s, x, g, 1.0, 0, 0.1, 1.0, h, u, g.copy(), np.zeros(8))
    for accumulate in (False, True):
        lora.forward_batch(a, bt, s, xb, hb, outb, accumulate)
        lora.forward_batch_held(a, bt, s, xb, hb, outb, accumulate)
    lora.apply_dropout(x, 0.1, key, np.uint64(0), x.copy())
    random.fill_normal(key, 1.0, out)
    random.add_normal(key, 1.0, out)
    random.hash_vector(x, key)
    update.rows_input_status(xb)
    for arr in (x, xb, a):
        update.all_finite(arr)
        update.sq_norm(arr)
    frozen = np.frombuffer(x.tobytes(), f32)  # samples hold read-only copies
    for vec in (x, frozen):
        update.vec_sq_norm_finite(vec)  # Deep's check of each replayed sample
        update.vec_input_status(vec)  # MicroLoRA's check of x on its general paths
        update.vectors_equal(vec, vec)  # Deep's comparison of a replayed and a held-out sample
    _done = True
    return time.perf_counter() - t0


class _Slot:
    """Holds a result buffer as a MicroLoRA module does."""

    __slots__ = ("out",)

    def __init__(self, out: np.ndarray) -> None:
        self.out = out


def _call_packed(w: np.ndarray, x: np.ndarray, slot: _Slot) -> int:
    out = slot.out  # as MicroLoRA.forward calls it: the slot, a local, positional arguments
    return int(fast.forward_reused_packed(w, 0.5, x, out))


def _call_split(w: np.ndarray, x: np.ndarray, slot: _Slot) -> int:
    out = slot.out
    return int(fast.forward_reused(w[0], w[1], 0.5, x, out))


def _reuse_is_sound(w: np.ndarray, x: np.ndarray) -> bool:
    """Whether the reference counts the ``forward_reused`` kernels expect hold on this
    interpreter and Numba: a buffer only its slot holds is written, one held elsewhere or
    frozen is refused. Where they do not (another calling convention counts differently),
    reusing could overwrite a result its caller kept, so forward then always allocates."""
    for call in (_call_packed, _call_split):
        free = _Slot(np.zeros(3, np.float32))
        held = _Slot(np.zeros(3, np.float32))
        frozen = _Slot(np.zeros(3, np.float32))
        frozen.out.flags.writeable = False
        holder = held.out
        if (
            call(w, x, free) != lora.FORWARD_OK
            or call(w, x, held) != lora.FORWARD_BAD_OUT
            or call(w, x, frozen) != lora.FORWARD_BAD_OUT
            or holder[0] != 0.0
        ):
            return False
    return True


def _never_free(*args: Any) -> int:
    """Stands in for the ``forward_reused`` kernels where reference counts prove nothing."""
    return int(lora.FORWARD_BAD_OUT)


def _warm_ewc(a: np.ndarray, bt: np.ndarray, s: float) -> None:
    f32 = np.float32
    rank = a.shape[0]
    ut = np.eye(2, a.shape[1], dtype=f32)
    c = np.ones(2, f32)
    mt = np.zeros((2, bt.shape[1]), f32)
    q = np.empty((rank, 2), f32)
    dq = np.empty_like(q)
    w = np.empty((rank, 2), np.float64)
    small = [np.empty((rank, rank), np.float64) for _ in range(3)]
    vec = np.empty(rank, np.float64)
    bt_new = np.empty_like(bt)
    a2 = a.copy()
    bt2 = bt.copy()
    ewc.anchor(a2, bt2, s, ut, q, mt)
    fast.ewc_penalty = entry_point(ewc.penalty, a2, bt2, s, ut, c, mt, q)
    fast.ewc_prox_step = entry_point(
        ewc.prox_step, a2, bt2, s, ut, c, mt, 1.0, q, dq, w, *small, vec, bt_new
    )


def _warm_replay(a: np.ndarray, bt: np.ndarray, s: float) -> None:
    """Deep's epoch kernel and Background's mini-batch one, on two modules (one module takes
    the same types)."""
    f32 = np.float32
    a3 = np.stack([a, a])
    bt3 = np.stack([bt, bt])
    m, rank, n_out = bt3.shape
    xs = np.ones((2, a.shape[1]), f32)
    vecs = np.ones((2, n_out), f32)
    ints = np.zeros(2, np.int64)
    floats = np.array([np.nan, 1.0])
    scratch = (np.zeros((m, rank), f32), np.zeros((m, rank), f32), np.zeros((m, n_out), f32))
    flags = np.zeros(2, np.bool_)
    replay.replay_epoch(
        a3, bt3, s, xs, vecs, ints, ints, ints, floats, floats.copy(), flags, np.zeros(3), 0.9,
        1.0, 20.0,
        0.1, 1.0, *scratch, np.zeros((m, 8)), 16, 0.0, *replay.no_ewc(m, rank, n_out),
        np.zeros(3),
    )  # fmt: skip
    replay.relearn(
        a3, bt3, s, xs, vecs, ints, ints, ints, floats, floats.copy(), flags, np.ones(2),
        np.zeros(3),
        0.9, 1.0, 20.0, 0.1, 1.0, 16, False, *scratch, np.zeros_like(a3), np.zeros_like(bt3),
        0.0, *replay.no_ewc(m, rank, n_out), np.zeros(2, np.int64), np.zeros(replay.RE_SLOTS),
    )  # fmt: skip
