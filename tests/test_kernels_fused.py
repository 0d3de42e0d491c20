"""The scratch-free hot-path kernels: ``forward_into`` / ``forward_reused`` and ``step_fused``.

Each is compared with a float64 numpy reference and with the multi-pass kernels it replaces on
the hot path (``forward_vec``, ``step_one``), including their status codes, the untouched
weights of a refused step and the float64 fallback for norms that overflow float32.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_reference import assert_f32_close, f64, ref_forward, ref_magnitude, step_weight
from sona.kernels import lora as kl
from sona.kernels import ownership
from sona.kernels.warmup import _Slot, fast, warm_up

from sona.baseline import RunningBaseline

warm_up()
REUSES = fast.reuses_results  # the forward_reused kernels' self-check passed


@numba.njit
def _header(arr: np.ndarray) -> tuple[int, int]:
    return ownership.references(arr), ownership.flags(arr)


F32 = np.float32


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(F32)


# ---------------------------------------------------------------------------- forward


@settings(max_examples=80, deadline=None)
@given(
    rank=st.integers(1, 8),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 70),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 999),
)
def test_forward_into_matches_the_reference(
    rank: int, n_in: int, n_out: int, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a, bt, x = rand(rng, rank, n_in), rand(rng, rank, n_out), rand(rng, n_in)
    out = np.full(n_out, np.nan, F32)
    assert kl.forward_into(a, bt, scale, x, out) == kl.FORWARD_OK
    expected = ref_forward(a, bt, scale, x)
    assert_f32_close(out, expected, ref_magnitude(a, bt, scale, x), n_in + rank)
    same = np.empty(n_out, F32)  # the same sums as the kernel with a scratch h
    assert kl.forward_vec(a, bt, scale, x, np.empty(rank, F32), same)
    np.testing.assert_allclose(out, same, rtol=1e-6, atol=1e-6 * float(np.abs(same).max()))
    if REUSES:
        slot = _Slot(np.full(n_out, np.nan, F32))
        assert _reused(fast.forward_reused, (a, bt, scale, x), slot) == kl.FORWARD_OK
        np.testing.assert_array_equal(slot.out, out)
        if n_in == n_out:
            slot = _Slot(np.full(n_out, np.nan, F32))
            packed = (np.stack([a, bt]), scale, x)
            assert _reused(fast.forward_reused_packed, packed, slot) == kl.FORWARD_OK
            np.testing.assert_array_equal(slot.out, out)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_forward_into_refuses_wrong_lengths_and_strides_before_writing(rank: int) -> None:
    rng = np.random.default_rng(rank)
    a, bt = rand(rng, rank, 6), rand(rng, rank, 5)
    out = np.full(5, 7.0, F32)
    strided_x = rand(rng, 6, 2)[:, 0]
    assert kl.forward_into(a, bt, 1.0, rand(rng, 7), out) == kl.FORWARD_BAD_X
    assert kl.forward_into(a, bt, 1.0, strided_x, out) == kl.FORWARD_BAD_X
    assert np.all(out == 7.0)
    strided_out = np.full((5, 2), 7.0, F32)[:, 0]
    assert kl.forward_into(a, bt, 1.0, rand(rng, 6), strided_out) == kl.FORWARD_BAD_OUT
    assert kl.forward_into(a, bt, 1.0, rand(rng, 6), np.full(4, 7.0, F32)) == kl.FORWARD_BAD_OUT
    assert np.all(strided_out == 7.0)
    if REUSES:
        square = np.stack([rand(rng, rank, 5), rand(rng, rank, 5)])
        free = _Slot(np.full(5, 7.0, F32))
        bad_x = (square, 1.0, rand(rng, 6))
        assert _reused(fast.forward_reused_packed, bad_x, free) == kl.FORWARD_BAD_X
        assert np.all(free.out == 7.0)
        long_out = _Slot(np.empty(6, F32))
        good_x = (square, 1.0, rand(rng, 5))
        assert _reused(fast.forward_reused_packed, good_x, long_out) == kl.FORWARD_BAD_OUT


def _reused(kernel: Callable[..., int], args: tuple[Any, ...], slot: _Slot) -> int:
    """Calls a ``forward_reused`` kernel as ``MicroLoRA.forward`` does: the buffer is held by
    the slot and a local, and passed as the last of the arguments listed at the call."""
    out = slot.out
    if len(args) == 3:
        return int(kernel(args[0], args[1], args[2], out))
    return int(kernel(args[0], args[1], args[2], args[3], out))


@pytest.mark.skipif(not REUSES, reason="no reference count proves a buffer free here")
@pytest.mark.parametrize("packed", [False, True])
def test_forward_reused_writes_only_a_free_writeable_buffer(packed: bool) -> None:
    rng = np.random.default_rng(5)
    a, bt, x = rand(rng, 2, 6), rand(rng, 2, 6), rand(rng, 6)
    kernel, args = (
        (fast.forward_reused_packed, (np.stack([a, bt]), 1.5, x))
        if packed
        else (fast.forward_reused, (a, bt, 1.5, x))
    )
    expected = np.empty(6, F32)
    assert kl.forward_into(a, bt, 1.5, x, expected) == kl.FORWARD_OK
    free = _Slot(np.full(6, 7.0, F32))
    assert _reused(kernel, args, free) == kl.FORWARD_OK
    np.testing.assert_array_equal(free.out, expected)
    held = _Slot(np.full(6, 7.0, F32))
    for hold in (np.asarray, lambda o: o[1:], memoryview):
        holder = hold(held.out)
        assert _reused(kernel, args, held) == kl.FORWARD_BAD_OUT
        del holder
    frozen = _Slot(np.full(6, 7.0, F32))
    frozen.out.flags.writeable = False
    assert _reused(kernel, args, frozen) == kl.FORWARD_BAD_OUT
    assert np.all(held.out == 7.0) and np.all(frozen.out == 7.0)
    assert _reused(kernel, args, held) == kl.FORWARD_OK  # its holders are gone


def test_the_kernels_read_an_arrays_reference_count_and_flags_as_python_does() -> None:
    base = np.arange(12, dtype=F32)
    frozen = base.copy()
    frozen.flags.writeable = False
    arrays = [base, base[::2], base[2:5], frozen, np.frombuffer(base.tobytes(), F32)]
    first = _header(base)[0] - sys.getrefcount(base)  # what the call itself adds
    for arr in arrays:
        refs, flags = _header(arr)
        assert flags == arr.flags.num
        assert refs - sys.getrefcount(arr) == first
        extra = [arr, arr]
        assert _header(arr)[0] == refs + 2
        del extra


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_forward_into_reports_non_finite_input(rank: int, bad: float) -> None:
    rng = np.random.default_rng(rank)
    a, bt = rand(rng, rank, 7), rand(rng, rank, 5)
    a[0, 3] = 0.0  # inf·0 must still count as non-finite
    for i in (0, 3, 6):
        x = rand(rng, 7)
        x[i] = bad
        assert kl.forward_into(a, bt, 2.0, x, np.empty(5, F32)) == kl.FORWARD_NOT_FINITE
    overflow = np.full(7, 3e38, F32)  # finite, but A·x is not
    ones = np.ones((rank, 7), F32)
    assert kl.forward_into(ones, bt, 1.0, overflow, np.empty(5, F32)) == kl.FORWARD_NOT_FINITE


# ---------------------------------------------------------------------------- step


def ref_step(
    a: np.ndarray,
    bt: np.ndarray,
    s: float,
    x: np.ndarray,
    vec: np.ndarray,
    off: np.ndarray,
    weight: float,
    mode: int,
    lr: float,
    max_norm: float,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(A', Bᵀ', norm·c/lr, c) of one clipped rank-one step, in float64."""
    a64, bt64, x64 = f64(a), f64(bt), f64(x)
    h = s * a64 @ x64
    w = weight * step_weight(x)
    mu = bt64.T @ h
    if mode == kl.MODE_GRADIENT:
        g = w * f64(vec)
    elif mode == kl.MODE_RESIDUAL:
        g = w * (mu - (f64(vec) - f64(off)))
    else:
        g = w * (mu - f64(vec))
    u = s * bt64 @ g
    da, dbt = np.outer(u, x64), np.outer(h, g)
    norm = math.sqrt(float(np.sum(da * da) + np.sum(dbt * dbt)))
    c = lr if max_norm <= 0 or norm <= max_norm else lr * max_norm / norm
    return a64 - c * da, bt64 - c * dbt, norm * c / lr, c


MODES = [kl.MODE_REGRESS, kl.MODE_GRADIENT, kl.MODE_RESIDUAL]


@settings(max_examples=120, deadline=None)
@given(
    rank=st.integers(1, 2),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 70),
    mode=st.sampled_from(MODES),
    weight=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    x_scale=st.sampled_from([0.05, 1.0, 4.0]),
    lr=st.sampled_from([1e-3, 0.1, 2.0]),
    max_norm=st.sampled_from([-1.0, 0.01, 1.0]),
    seed=st.integers(0, 9999),
)
def test_step_fused_matches_the_reference_and_step_one(
    rank: int,
    n_in: int,
    n_out: int,
    mode: int,
    weight: float,
    x_scale: float,
    lr: float,
    max_norm: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    a, bt = rand(rng, rank, n_in), rand(rng, rank, n_out, scale=0.5)
    x, vec, off = rand(rng, n_in, scale=x_scale), rand(rng, n_out), rand(rng, n_out)
    s = 2.0 / rank
    ref_a, ref_bt, ref_norm, c = ref_step(a, bt, s, x, vec, off, weight, mode, lr, max_norm)
    fa, fbt = a.copy(), bt.copy()
    r = kl.step_fused(fa, fbt, s, x, vec, off, weight, mode, lr, max_norm)
    # rounding of float32 sums is relative to the magnitudes that went into them
    h_mag = s * np.abs(f64(a)) @ np.abs(f64(x))
    g_mag = abs(weight * step_weight(x)) * (
        np.abs(f64(bt)).T @ h_mag + np.abs(f64(vec)) + np.abs(f64(off))
    )
    u_mag = s * np.abs(f64(bt)) @ g_mag
    terms = n_in + n_out + rank
    # the norm too: a residual g that cancels (μ ≈ vec − off) is exact only to its magnitudes
    x_sq = float(np.sum(f64(x) ** 2))
    norm_mag = math.sqrt(float(u_mag @ u_mag) * x_sq + float(h_mag @ h_mag) * float(g_mag @ g_mag))
    norm_tol = 4.0 * terms * float(np.finfo(F32).eps) * norm_mag * c / lr
    assert r >= 0.0
    assert r == pytest.approx(ref_norm, rel=1e-4, abs=max(norm_tol, 1e-30))
    a_mag = np.abs(f64(a)) + c * np.outer(u_mag, np.abs(f64(x)))
    bt_mag = np.abs(f64(bt)) + c * np.outer(h_mag, g_mag)
    assert_f32_close(fa, ref_a, a_mag, terms)
    assert_f32_close(fbt, ref_bt, bt_mag, terms)
    # the multi-pass kernel, on the residual target where it has no offset mode
    oa, obt = a.copy(), bt.copy()
    target = (vec - off) if mode == kl.MODE_RESIDUAL else vec
    one_mode = kl.MODE_GRADIENT if mode == kl.MODE_GRADIENT else kl.MODE_REGRESS
    h, u, g, sums = np.empty(rank, F32), np.empty(rank, F32), np.empty(n_out, F32), np.zeros(8)
    status = kl.step_one(oa, obt, s, x, target, weight, one_mode, lr, max_norm, h, u, g, sums)
    assert status == 0
    assert r == pytest.approx(sums[7], rel=1e-4, abs=max(2.0 * norm_tol, 1e-30))
    # both within rounding of the reference, so of each other: measured on the magnitudes of
    # the terms, as a result that cancels (a − c·da ≈ 0) can differ by more than 1e-5 of itself
    assert_f32_close(fa, oa, 2.0 * a_mag, terms)
    assert_f32_close(fbt, obt, 2.0 * bt_mag, terms)


@settings(max_examples=120, deadline=None)
@given(
    rank=st.integers(1, 2),
    mode=st.sampled_from(MODES),
    a_scale=st.sampled_from([1e-3, 1.0, 1e15, 1e20]),
    b_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e15]),
    x_scale=st.sampled_from([1e-3, 1.0, 1e20]),
    v_scale=st.sampled_from([1.0, 1e30]),
    lr=st.sampled_from([1e-3, 1.0, 1e30]),
    max_norm=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 9999),
)
def test_step_fused_decides_like_step_one_at_any_magnitude(
    rank: int,
    mode: int,
    a_scale: float,
    b_scale: float,
    x_scale: float,
    v_scale: float,
    lr: float,
    max_norm: float,
    seed: int,
) -> None:
    """Huge but finite weights, inputs and gradients overflow the float32 norm sums, which are
    then recomputed in float64: every decision (applied, or which rejection) is step_one's, and
    a refused step leaves the weights bit-identical."""
    rng = np.random.default_rng(seed)
    n_in, n_out = 40, 30
    a, bt = rand(rng, rank, n_in, scale=a_scale), rand(rng, rank, n_out, scale=b_scale)
    x, vec = rand(rng, n_in, scale=x_scale), rand(rng, n_out, scale=v_scale)
    off = rand(rng, n_out, scale=v_scale)
    s = 2.0 / rank
    fa, fbt = a.copy(), bt.copy()
    r = kl.step_fused(fa, fbt, s, x, vec, off, 1.0, mode, lr, max_norm)
    oa, obt = a.copy(), bt.copy()
    with np.errstate(over="ignore"):
        target = (vec - off) if mode == kl.MODE_RESIDUAL else vec
    one_mode = kl.MODE_GRADIENT if mode == kl.MODE_GRADIENT else kl.MODE_REGRESS
    h, u, g, sums = np.empty(rank, F32), np.empty(rank, F32), np.empty(n_out, F32), np.zeros(8)
    status = kl.step_one(oa, obt, s, x, target, 1.0, one_mode, lr, max_norm, h, u, g, sums)
    if status:
        assert r == -status
        assert fa.tobytes() == a.tobytes() and fbt.tobytes() == bt.tobytes()
        return
    assert r >= 0.0 and r == pytest.approx(sums[7], rel=1e-4, abs=1e-300)
    np.testing.assert_allclose(fa, oa, rtol=1e-5, atol=1e-6 * float(np.abs(oa).max()) + 1e-30)
    np.testing.assert_allclose(fbt, obt, rtol=1e-5, atol=1e-6 * float(np.abs(obt).max()) + 1e-30)


@settings(max_examples=80, deadline=None)
@given(
    rank=st.integers(1, 8),
    mode=st.sampled_from([kl.MODE_REGRESS, kl.MODE_GRADIENT]),
    a_scale=st.sampled_from([0.1, 1.0, 1e19]),
    lr=st.sampled_from([1e-3, 0.5]),
    max_norm=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 9999),
)
def test_step_one_matches_the_float64_reference(
    rank: int, mode: int, a_scale: float, lr: float, max_norm: float, seed: int
) -> None:
    """Any rank, including weights whose ‖A‖² overflows float32 (A ~ 1e19): the norm sums
    are then redone in float64 and the step is decided, and applied, as in float64."""
    rng = np.random.default_rng(seed)
    n_in, n_out = 40, 30
    a, bt = rand(rng, rank, n_in, scale=a_scale), rand(rng, rank, n_out, scale=1e-3)
    x, vec = rand(rng, n_in, scale=0.1), rand(rng, n_out)
    s = 2.0 / rank
    h, u, g, sums = np.empty(rank, F32), np.empty(rank, F32), np.empty(n_out, F32), np.zeros(8)
    oa, obt = a.copy(), bt.copy()
    status = kl.step_one(oa, obt, s, x, vec, 0.7, mode, lr, max_norm, h, u, g, sums)
    ref_a, ref_bt, ref_norm, _ = ref_step(a, bt, s, x, vec, vec, 0.7, mode, lr, max_norm)
    na, nb = float(np.sum(ref_a * ref_a)), float(np.sum(ref_bt * ref_bt))
    if max(na, nb) >= 3.4028234663852886e38**2:
        assert status == 3
    elif s * math.sqrt(na) * math.sqrt(nb) >= 3.4028234663852886e38:
        assert status == 4
    else:
        assert status == 0
        assert sums[7] == pytest.approx(ref_norm, rel=1e-4)
        np.testing.assert_allclose(oa, ref_a, rtol=1e-4, atol=1e-5 * float(np.abs(ref_a).max()))
        np.testing.assert_allclose(obt, ref_bt, rtol=1e-4, atol=1e-5 * float(np.abs(ref_bt).max()))
        return
    assert oa.tobytes() == a.tobytes() and obt.tobytes() == bt.tobytes()


def test_float32_norm_overflow_is_recomputed_not_rejected() -> None:
    """‖A‖² and ‖g‖² beyond float32 (A ~ 1e20) are fine for float64: the step is applied."""
    rng = np.random.default_rng(5)
    a = rand(rng, 2, 64, scale=1e20)
    bt = rand(rng, 2, 64, scale=1e-3)
    x = rand(rng, 64, scale=0.1)
    vec = rand(rng, 64)
    with np.errstate(over="ignore"):
        assert not math.isfinite(float(np.sum(a * a)))  # overflows in float32
    fa, fbt = a.copy(), bt.copy()
    r = kl.step_fused(fa, fbt, 1.0, x, vec, vec, 1.0, kl.MODE_REGRESS, 1e-3, 1.0)
    assert r >= 0.0
    _, ref_bt, ref_norm, _ = ref_step(a, bt, 1.0, x, vec, vec, 1.0, kl.MODE_REGRESS, 1e-3, 1.0)
    assert r == pytest.approx(ref_norm, rel=1e-4)
    np.testing.assert_allclose(fbt, ref_bt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("where", ["x", "vec", "off"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_step_fused_reports_non_finite_inputs_and_writes_nothing(
    rank: int, where: str, bad: float
) -> None:
    rng = np.random.default_rng(rank)
    a, bt = rand(rng, rank, 9), rand(rng, rank, 7)
    bt[:, 2] = 0.0  # a zero column of B: inf·0 must still be caught
    arrays = {"x": rand(rng, 9), "vec": rand(rng, 7), "off": rand(rng, 7)}
    arrays[where][2] = bad
    for weight in (0.0, 1.0):
        fa, fbt = a.copy(), bt.copy()
        r = kl.step_fused(
            fa, fbt, 1.0, arrays["x"], arrays["vec"], arrays["off"], weight,
            kl.MODE_RESIDUAL, 0.1, 1.0,
        )  # fmt: skip
        assert r == -kl.STEP_NOT_FINITE
        assert fa.tobytes() == a.tobytes() and fbt.tobytes() == bt.tobytes()


def test_step_fused_leaves_other_shapes_ranks_and_modes_to_the_general_path() -> None:
    rng = np.random.default_rng(0)
    a, bt = rand(rng, 2, 6), rand(rng, 2, 5)
    x, v = rand(rng, 6), rand(rng, 5)

    def run(a_: np.ndarray, bt_: np.ndarray, x_: np.ndarray, v_: np.ndarray, o_: np.ndarray,
            mode: int) -> float:  # fmt: skip
        fa, fbt = a_.copy(), bt_.copy()
        r = float(kl.step_fused(fa, fbt, 1.0, x_, v_, o_, 1.0, mode, 0.1, 1.0))
        if r < 0.0:
            assert fa.tobytes() == a_.tobytes() and fbt.tobytes() == bt_.tobytes()
        return r

    unsupported = -kl.STEP_UNSUPPORTED
    assert run(a, bt, rand(rng, 7), v, v, kl.MODE_REGRESS) == unsupported
    assert run(a, bt, rand(rng, 6, 2)[:, 0], v, v, kl.MODE_REGRESS) == unsupported
    assert run(a, bt, x, rand(rng, 4), v, kl.MODE_GRADIENT) == unsupported
    assert run(a, bt, x, rand(rng, 5, 2)[:, 1], v, kl.MODE_GRADIENT) == unsupported
    assert run(a, bt, x, v, rand(rng, 4), kl.MODE_RESIDUAL) == unsupported
    assert run(a, bt, x, v, rand(rng, 5, 2)[:, 1], kl.MODE_RESIDUAL) == unsupported
    assert run(a, bt, x, v, v, kl.MODE_NOISE) == unsupported
    assert run(rand(rng, 3, 6), rand(rng, 3, 5), x, v, v, kl.MODE_REGRESS) == unsupported
    assert run(a, bt, x, v, rand(rng, 4), kl.MODE_REGRESS) >= 0.0  # off is read only as residual


# ---------------------------------------------------------------------------- offsets + step


def _three_calls(
    c: tuple[np.ndarray, np.ndarray, float],
    t: tuple[np.ndarray, np.ndarray, float] | None,
    a: np.ndarray,
    bt: np.ndarray,
    args: tuple[np.ndarray, np.ndarray, float, float, float],
    off: np.ndarray,
) -> float:
    """What ``step_rated_over`` replaces: ``forward_into``, ``forward_add_vec``, then
    ``step_fused`` (None where an offset kernel refused)."""
    x, vec, weight, lr, max_norm = args
    if kl.forward_into(c[0], c[1], c[2], x, off) != kl.FORWARD_OK:
        return -kl.STEP_UNSUPPORTED
    if t is not None and not kl.forward_add_vec(t[0], t[1], t[2], x, np.empty(len(t[0]), F32), off):
        return -kl.STEP_UNSUPPORTED
    return float(kl.step_fused(a, bt, 1.5, x, vec, off, weight, kl.MODE_RESIDUAL, lr, max_norm))


# the rating baseline's parameters (decay, temperature, cap) and a state with some history
RATING = (0.9, 0.5, 4.0)
RATING_STATE = (7.0, 0.55, 0.04)


def _rated(quality: float, x: np.ndarray, step: Callable[[float], float]) -> tuple[float, bytes]:
    """What ``MicroLoRA`` does around a fused step on a rated output: the rating's weight from
    the baseline, the step, then the rating joins the baseline once the step is decided
    (applied, or refused by a guard; not for a zero input, nor where the general path
    decides). The step's result and the baseline's bytes after it."""
    b = RunningBaseline(RATING[0])
    b.values[:] = RATING_STATE
    r = step(b.weight(quality, RATING[1], RATING[2]))
    if r > 0.0 or (r == 0.0 and x.any()) or -r in _GUARDS:
        b.update(quality)
    return r, b.values.tobytes()


_GUARDS = (kl.STEP_GRAD_NORM, kl.STEP_WEIGHTS, kl.STEP_OVERFLOW)


# the rated steps' cases: live rank, consolidated rank, widths, and magnitudes at which an
# offset overflows, the step is rejected or the step is clipped
RATED_CASES = {
    "rank": st.integers(1, 2),
    "c_rank": st.integers(1, 9),
    "n_in": st.integers(1, 70),
    "n_out": st.integers(1, 70),
    "c_scale": st.sampled_from([0.0, 1.0, 1e19, 1e30]),
    "x_scale": st.sampled_from([0.05, 1.0, 1e20]),
    "lr": st.sampled_from([1e-3, 0.1, 1e30]),
    "max_norm": st.sampled_from([-1.0, 1.0]),
    "seed": st.integers(0, 9999),
    "quality": st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    "zero_x": st.booleans(),
}


@settings(max_examples=150, deadline=None)
@given(t_rank=st.sampled_from([0, 1, 2]), **RATED_CASES)
def test_step_rated_over_is_the_three_calls_it_replaces(
    rank: int,
    c_rank: int,
    t_rank: int,
    n_in: int,
    n_out: int,
    c_scale: float,
    x_scale: float,
    lr: float,
    max_norm: float,
    seed: int,
    quality: float,
    zero_x: bool,
) -> None:
    """Same status, offsets, weights and baseline bit for bit, at magnitudes where an offset
    overflows, the step is rejected or the step is clipped, and for a zero input; a refused
    call writes no weight."""
    rng = np.random.default_rng(seed)
    c = (rand(rng, c_rank, n_in), rand(rng, c_rank, n_out, scale=c_scale), 0.7)
    t = (rand(rng, t_rank, n_in), rand(rng, t_rank, n_out), 2.0) if t_rank else None
    a, bt = rand(rng, rank, n_in), rand(rng, rank, n_out, scale=0.5)
    x = np.zeros(n_in, F32) if zero_x else rand(rng, n_in, scale=x_scale)
    vec = rand(rng, n_out)
    ea, ebt, e_off = a.copy(), bt.copy(), np.zeros(n_out, F32)
    expected, e_rating = _rated(
        quality, x, lambda w: _three_calls(c, t, ea, ebt, (x, vec, w, lr, max_norm), e_off)
    )
    fa, fbt, f_off = a.copy(), bt.copy(), np.zeros(n_out, F32)
    ta, tbt, ts = t if t is not None else (a, bt, 1.0)
    rating = np.array(RATING_STATE)
    got = fast.step_rated_over(
        *c, ta, tbt, ts, np.empty(max(t_rank, 1), F32), t is not None, fa, fbt, 1.5, x, vec,
        f_off, quality, rating, *RATING, kl.MODE_RESIDUAL, lr, max_norm,
    )  # fmt: skip
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert rating.tobytes() == e_rating
    assert fa.tobytes() == ea.tobytes() and fbt.tobytes() == ebt.tobytes()
    if expected != -kl.STEP_UNSUPPORTED:
        assert f_off.tobytes() == e_off.tobytes()
    if got < 0.0:
        assert fa.tobytes() == a.tobytes() and fbt.tobytes() == bt.tobytes()


def test_step_rated_over_refuses_mismatched_adapters_before_writing_weights() -> None:
    rng = np.random.default_rng(3)
    a, bt, x, v = rand(rng, 2, 6), rand(rng, 2, 5), rand(rng, 6), rand(rng, 5)
    c = (rand(rng, 8, 6), rand(rng, 8, 5), 1.0)

    def run(cc: tuple[np.ndarray, ...], t: tuple[np.ndarray, ...] | None, x_: np.ndarray,
            off: np.ndarray, h: np.ndarray | None = None) -> float:  # fmt: skip
        fa, fbt = a.copy(), bt.copy()
        ta, tbt = t if t is not None else (a, bt)
        rating = np.array(RATING_STATE)
        r = float(fast.step_rated_over(
            cc[0], cc[1], 1.0, ta, tbt, 1.0, np.empty(2, F32) if h is None else h,
            t is not None, fa, fbt, 1.0, x_, v, off, 0.5, rating, *RATING, kl.MODE_RESIDUAL,
            0.1, 1.0,
        ))  # fmt: skip
        if r < 0.0:
            assert fa.tobytes() == a.tobytes() and fbt.tobytes() == bt.tobytes()
            assert rating.tolist() == list(RATING_STATE)  # the general path rates it
        return r

    off = np.zeros(5, F32)
    unsupported = -kl.STEP_UNSUPPORTED
    assert run(c, None, x, off) >= 0.0
    assert run(c, (rand(rng, 2, 6), rand(rng, 2, 5)), x, off) >= 0.0
    assert run(c, None, rand(rng, 7), off) == unsupported  # x longer than A's rows
    assert run(c, None, rand(rng, 6, 2)[:, 0], off) == unsupported  # strided x
    assert run(c, None, x, np.zeros(4, F32)) == unsupported  # off of another length
    assert run((rand(rng, 8, 7), c[1]), None, x, off) == unsupported  # consolidated's width
    assert run(c, (rand(rng, 2, 7), rand(rng, 2, 5)), x, off) == unsupported  # transit's A
    assert run(c, (rand(rng, 2, 6), rand(rng, 2, 4)), x, off) == unsupported  # transit's Bᵀ
    assert run(c, (rand(rng, 2, 6), rand(rng, 1, 5)), x, off) == unsupported  # ranks differ
    assert run(c, (rand(rng, 2, 6), rand(rng, 2, 5)), x, off, np.empty(1, F32)) == unsupported
    bad = x.copy()
    bad[2] = np.nan
    assert run(c, None, bad, off) == unsupported  # the offset is not finite: the general path


@settings(max_examples=100, deadline=None)
@given(transit=st.booleans(), **RATED_CASES)
# one mode value for both modules once rounded this case's Bᵀ differently from step_fused_pair
@example(
    rank=2,
    c_rank=2,
    transit=False,
    n_in=1,
    n_out=66,
    c_scale=0.0,
    x_scale=1.0,
    lr=0.1,
    max_norm=-1.0,
    seed=142,
    quality=0.9,
    zero_x=False,
)
def test_step_rated_over_pair_is_the_calls_it_replaces(
    rank: int,
    c_rank: int,
    transit: bool,
    n_in: int,
    n_out: int,
    c_scale: float,
    x_scale: float,
    lr: float,
    max_norm: float,
    seed: int,
    quality: float,
    zero_x: bool,
) -> None:
    """Two modules: both offsets, then ``step_fused_pair``; same status, offsets, weights and
    baseline bit for bit, and a refused call writes no weight."""
    rng = np.random.default_rng(seed)
    cs = [(rand(rng, c_rank, n_in), rand(rng, c_rank, n_out, scale=c_scale)) for _ in range(2)]
    ts = [(rand(rng, 2, n_in), rand(rng, 2, n_out)) for _ in range(2)]
    ws = [(rand(rng, rank, n_in), rand(rng, rank, n_out, scale=0.5)) for _ in range(2)]
    x = np.zeros(n_in, F32) if zero_x else rand(rng, n_in, scale=x_scale)
    vec = rand(rng, n_out)
    mode = kl.MODE_RESIDUAL

    # the calls it replaces
    e = [(a.copy(), bt.copy()) for a, bt in ws]
    e_offs = [np.zeros(n_out, F32) for _ in range(2)]

    def calls(w: float) -> float:
        for (ca, cbt), (ta, tbt), off in zip(cs, ts, e_offs, strict=True):
            if kl.forward_into(ca, cbt, 0.7, x, off) != kl.FORWARD_OK or (
                transit and not kl.forward_add_vec(ta, tbt, 2.0, x, np.empty(2, F32), off)
            ):
                return -kl.STEP_UNSUPPORTED
        return float(kl.step_fused_pair(
            e[0][0], e[0][1], e_offs[0], mode, e[1][0], e[1][1], e_offs[1], mode, 1.5, x, vec,
            w, lr, max_norm, np.zeros((2, kl.FUSED_SCRATCH)),
        ))  # fmt: skip

    expected, e_rating = _rated(quality, x, calls)
    f = [(a.copy(), bt.copy()) for a, bt in ws]
    f_offs = [np.zeros(n_out, F32) for _ in range(2)]
    rating = np.array(RATING_STATE)
    got = fast.step_rated_over_pair(
        cs[0][0], cs[0][1], cs[1][0], cs[1][1], 0.7, ts[0][0], ts[0][1], ts[1][0], ts[1][1],
        2.0, np.empty(2, F32), transit, f[0][0], f[0][1], f_offs[0], mode, f[1][0], f[1][1],
        f_offs[1], mode, 1.5, x, vec, quality, rating, *RATING, lr, max_norm,
        np.zeros((2, kl.FUSED_SCRATCH)),
    )  # fmt: skip
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert rating.tobytes() == e_rating
    for (fa, fbt), (ea, ebt), (a, bt) in zip(f, e, ws, strict=True):
        assert fa.tobytes() == ea.tobytes() and fbt.tobytes() == ebt.tobytes()
        if got < 0.0:
            assert fa.tobytes() == a.tobytes() and fbt.tobytes() == bt.tobytes()
    if expected != -kl.STEP_UNSUPPORTED:
        assert all(fo.tobytes() == eo.tobytes() for fo, eo in zip(f_offs, e_offs, strict=True))
