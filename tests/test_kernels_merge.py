"""The merge's GIL-free kernels against numpy: the weighted concatenation, the truncated SVD
down to float32 factors, and the scalar and row checks around them."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sona.kernels import merge as k_merge

import sona.merge
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.merge import _FLUSH, _low_rank, _low_rank_numpy, _with_exponent

F32 = np.float32
F32_MAX = float(np.finfo(F32).max)
Q = TargetModule.Q_PROJ


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rank=st.integers(1, 4),
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    row0=st.integers(0, 3),
    factor=st.sampled_from([1.0, -0.5, 3.0, 2.0**-300, 1e-120]),
)
def test_weighted_rows_are_numpys_concatenation(
    seed: int, rank: int, n_in: int, n_out: int, row0: int, factor: float
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, n_in)).astype(F32)
    bt = (rng.standard_normal((rank, n_out)) * np.exp(rng.uniform(-40, 40, n_out))).astype(F32)
    a_cat = np.full((row0 + rank + 1, n_in), 7.0)
    bt_cat = np.full((row0 + rank + 1, n_out), 7.0)
    k_merge.weighted_rows(a, bt, factor, _FLUSH, a_cat, bt_cat, row0)
    want_bt = factor * bt.astype(np.float64)
    want_bt[np.abs(want_bt) < _FLUSH] = 0.0
    assert np.array_equal(a_cat[row0 : row0 + rank], a.astype(np.float64))
    assert np.array_equal(bt_cat[row0 : row0 + rank], want_bt)
    # the rows around the source's are left alone
    assert (a_cat[:row0] == 7.0).all() and (a_cat[row0 + rank :] == 7.0).all()
    assert (bt_cat[:row0] == 7.0).all() and (bt_cat[row0 + rank :] == 7.0).all()


def _fits_reference(value: float, e: int) -> bool:
    """value·2**e < float32's max, in exact rational arithmetic."""
    if value == 0.0:
        return True
    if not math.isfinite(value):
        return False
    from fractions import Fraction

    return Fraction(value) * Fraction(2) ** e < Fraction(F32_MAX)


@pytest.mark.parametrize(
    ("value", "e"),
    [
        (0.0, 10_000),
        (math.inf, 0),
        (math.nan, 0),
        (F32_MAX, 0),
        (math.nextafter(F32_MAX, 0.0), 0),
        (F32_MAX, -1),
        (F32_MAX / 2, 1),
        (math.nextafter(F32_MAX / 2, 0.0), 1),
        (1e300, -900),
        (1e-300, 1100),
        (1.0, 127),
        (1.0, 128),
    ],
)
def test_fits_decides_on_the_exponents(value: float, e: int) -> None:
    assert k_merge.fits(value, e) == _fits_reference(value, e)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    parts=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    rank=st.integers(1, 6),
    n_in=st.integers(16, 48),
    n_out=st.integers(16, 48),
    dependent=st.booleans(),
    e=st.sampled_from([0, 1, -3, 40, -200]),
)
def test_low_rank_merge_is_as_good_as_the_numpy_one(
    seed: int, parts: list[int], rank: int, n_in: int, n_out: int, dependent: bool, e: int
) -> None:
    """The kernel's float32 factors of 2**e·Bᵀᵀ·A against numpy's QR and SVD path."""
    rng = np.random.default_rng(seed)
    total = sum(parts)
    a = rng.standard_normal((total, n_in))
    bt = rng.standard_normal((total, n_out))
    if dependent and total > 1:  # a merged-away copy, as in re-applying a Deep run's change
        a[-1] = a[0]
        bt[-1] = -bt[0]
    a_in, bt_in = a.copy(), bt.copy()
    got_factors = _low_rank(a, bt, rank, e)
    ref_factors = _with_exponent(*_low_rank_numpy(a, bt, rank), e)
    assert got_factors is not None and ref_factors is not None
    assert np.array_equal(a, a_in) and np.array_equal(bt, bt_in)  # inputs untouched
    a_new, bt_new = (f.astype(np.float64) for f in got_factors)
    a_ref, bt_ref = (f.astype(np.float64) for f in ref_factors)
    assert a_new.shape == a_ref.shape == (rank, n_in)
    assert bt_new.shape == bt_ref.shape == (rank, n_out)
    assert got_factors[0].dtype == got_factors[1].dtype == F32
    # relative to the factors: with a cancelled pair the exact sum itself can be ~0
    scale = math.ldexp(float(np.linalg.norm(a) * np.linalg.norm(bt)), e)
    np.testing.assert_allclose(bt_new.T @ a_new, bt_ref.T @ a_ref, atol=2e-6 * scale)
    # balanced factors: both carry the square roots of the same singular values, the power
    # of two split between them
    half = e // 2
    np.testing.assert_allclose(
        np.ldexp(np.linalg.norm(a_new, axis=1), e - half),
        np.ldexp(np.linalg.norm(bt_new, axis=1), half),
        rtol=1e-6,
        atol=1e-6 * math.ldexp(1.0, e),
    )


def test_a_sum_beyond_float32_is_refused_by_the_kernel() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 20))
    bt = rng.standard_normal((3, 30))
    out_a = np.empty((2, 20), F32)
    out_bt = np.empty((2, 30), F32)
    assert k_merge.low_rank_into(a, bt, 2, 0, out_a, out_bt) == k_merge.LOW_RANK_OK
    assert k_merge.low_rank_into(a, bt, 2, 128, out_a, out_bt) == k_merge.LOW_RANK_TOO_LARGE
    assert _low_rank(a, bt, 2, 128) is None


def test_a_core_the_sweeps_cannot_diagonalise_goes_to_numpy() -> None:
    a = np.ones((2, 8))
    a[0, 0] = np.nan
    out = np.empty((2, 8), F32)
    assert k_merge.low_rank_into(a, a.copy(), 2, 0, out, out.copy()) == k_merge.LOW_RANK_DIVERGED


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 6), width=st.integers(1, 12))
def test_dead_rows_are_the_ranks_zero_on_both_sides(seed: int, rank: int, width: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, width)).astype(F32) * (rng.random((rank, 1)) < 0.5)
    bt = rng.standard_normal((rank, width + 1)).astype(F32) * (rng.random((rank, 1)) < 0.5)
    if width > 1:
        a[0, 1:] = 0.0  # a row zero but for its first entry is alive
    dead = np.empty(rank, np.bool_)
    want = ~(a.any(axis=1) | bt.any(axis=1))
    assert k_merge.dead_rows(a, bt, dead) == int(want.sum())
    assert np.array_equal(dead, want)


def test_a_rank_limited_merge_takes_the_kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """EWC_MERGE's merge (a consolidated adapter and a live one, truncated to the first's
    rank) never falls back to numpy's QR and SVD, whose calls give the GIL up one by one."""

    def refuse(*_: object) -> None:
        raise AssertionError("numpy's path was taken")

    monkeypatch.setattr(sona.merge, "_low_rank_numpy", refuse)
    cfg = MicroLoraConfig(in_features=64, out_features=64, rank=8, target_modules=(Q,))
    base = MicroLoRA(cfg, seed=1)
    live = MicroLoRA(cfg.replace(rank=2), seed=2)
    rng = np.random.default_rng(3)
    for lora in (base, live):
        a, bt = lora.factors(Q)
        lora.set_factors(Q, a, rng.standard_normal(bt.shape).astype(F32))
    merged = MicroLoRA.merge_adapters([(base, 1.0), (live, 1.0)], rank=8)
    want = base.delta_weight(Q).astype(np.float64) + live.delta_weight(Q)
    sv = np.linalg.svd(want, compute_uv=False)
    err = float(np.linalg.norm(merged.delta_weight(Q) - want))
    assert err <= float(np.sqrt(np.sum(sv[8:] ** 2))) + 1e-5 * float(sv[0])


@numba.njit(cache=False)
def _scaled(src: np.ndarray, e: int, out: np.ndarray) -> None:
    k_merge._scaled_into(src, e, out)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    e=st.one_of(st.integers(-1100, 1100), st.sampled_from([-1075, -1023, -1022, 1023, 1024])),
)
def test_factors_are_scaled_exactly_as_ldexp_scales_them(seed: int, e: int) -> None:
    """The final scaling rounds like ldexp then float32, for any power of two: entries whose
    scaled value lands anywhere from below float32's subnormals to beyond its max."""
    rng = np.random.default_rng(seed)
    exps = np.clip(-e + rng.integers(-160, 141, (3, 37)), -1070, 1020)
    src = rng.standard_normal((3, 37)) * np.exp2(exps.astype(np.float64))
    out = np.empty(src.shape, F32)
    with np.errstate(over="ignore"):
        expected = np.ldexp(src, e).astype(F32)
    _scaled(src, e, out)
    assert out.tobytes() == expected.tobytes()
