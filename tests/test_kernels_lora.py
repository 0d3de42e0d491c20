"""The Numba kernels against float64 references, their finiteness contracts and warm-up coverage.

Kernels are called directly, so the rank-2 fast paths and the general loops are both checked,
and a kernel that reports failure must leave its output untouched.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import assert_f32_close, f64, ref_forward, ref_grads, ref_magnitude
from sona.kernels import lora as kl
from sona.kernels import random as kr
from sona.kernels import update as ku

F32 = np.float32


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(F32)


shapes = st.tuples(st.integers(1, 8), st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, n=st.integers(1, 4), scale=st.floats(0.1, 8.0), seed=st.integers(0, 999))
def test_forward_kernels_match_the_reference(
    shape: tuple[int, int, int], n: int, scale: float, seed: int
) -> None:
    rank, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    a, bt, x, xb = (
        rand(rng, rank, n_in),
        rand(rng, rank, n_out),
        rand(rng, n_in),
        rand(rng, n, n_in),
    )
    h = np.empty(rank, F32)
    terms = n_in + rank
    out = np.full(n_out, np.nan, F32)
    assert kl.forward_vec(a, bt, scale, x, h, out)
    assert_f32_close(out, ref_forward(a, bt, scale, x), ref_magnitude(a, bt, scale, x), terms)
    assert_f32_close(h, scale * f64(a) @ x, scale * np.abs(f64(a)) @ np.abs(x), n_in)
    base = rand(rng, n_out)
    acc = base.copy()
    assert kl.forward_add_vec(a, bt, scale, x, h, acc)
    mag = ref_magnitude(a, bt, scale, x) + np.abs(base)
    assert_f32_close(acc, base + ref_forward(a, bt, scale, x), mag, terms)
    hb = np.empty((n, rank), F32)
    outb = np.full((n, n_out), np.nan, F32)
    assert kl.forward_batch(a, bt, scale, xb, hb, outb, False)
    assert_f32_close(outb, ref_forward(a, bt, scale, xb), ref_magnitude(a, bt, scale, xb), terms)
    baseb = rand(rng, n, n_out)
    accb = baseb.copy()
    assert kl.forward_batch(a, bt, scale, xb, hb, accb, True)
    magb = ref_magnitude(a, bt, scale, xb) + np.abs(baseb)
    assert_f32_close(accb, baseb + ref_forward(a, bt, scale, xb), magb, terms)


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(1, 11),
    n=st.integers(1, 7),
    n_in=st.sampled_from([1, 7, 300, 1100]),
    n_out=st.sampled_from([1, 9, 511, 512, 513, 1300]),
    accumulate=st.booleans(),
    bad_row=st.none() | st.integers(0, 6),
    seed=st.integers(0, 999),
)
def test_forward_batch_blocks_match_the_reference(
    rank: int,
    n: int,
    n_in: int,
    n_out: int,
    accumulate: bool,
    bad_row: int | None,
    seed: int,
) -> None:
    """Every block shape: inputs in pairs and an odd one left, ranks in fours, twos and ones,
    output columns in whole and partial tiles. A non-finite input in any row, of a pair or
    the odd one, leaves ``out`` untouched."""
    rng = np.random.default_rng(seed)
    a, bt, xb = rand(rng, rank, n_in), rand(rng, rank, n_out), rand(rng, n, n_in)
    base = rand(rng, n, n_out)
    out = base.copy() if accumulate else np.full((n, n_out), 7.0, F32)
    before = out.copy()
    hb = np.empty((n, rank), F32)
    if bad_row is not None and bad_row < n:
        xb[bad_row, n_in // 2] = np.nan
        assert not kl.forward_batch(a, bt, 0.75, xb, hb, out, accumulate)
        assert out.tobytes() == before.tobytes()
        return
    assert kl.forward_batch(a, bt, 0.75, xb, hb, out, accumulate)
    expected = ref_forward(a, bt, 0.75, xb) + (f64(base) if accumulate else 0.0)
    mag = ref_magnitude(a, bt, 0.75, xb) + (np.abs(f64(base)) if accumulate else 0.0)
    assert_f32_close(out, expected, mag, n_in + rank)
    assert_f32_close(hb, 0.75 * f64(xb) @ f64(a).T, 0.75 * np.abs(f64(xb)) @ np.abs(f64(a)).T, n_in)


def test_forward_kernels_take_strided_inputs() -> None:
    rng = np.random.default_rng(0)
    a, bt = rand(rng, 2, 6), rand(rng, 2, 5)
    wide = rand(rng, 6, 3)
    x = wide[:, 1]
    assert not x.flags.c_contiguous
    out, out2, h = np.empty(5, F32), np.empty(5, F32), np.empty(2, F32)
    assert kl.forward_vec(a, bt, 1.5, x, h, out)
    assert kl.forward_vec(a, bt, 1.5, np.ascontiguousarray(x), h, out2)
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_reports_failure_and_leaves_out_untouched(rank: int, bad: float) -> None:
    rng = np.random.default_rng(rank)
    a, bt = rand(rng, rank, 7), rand(rng, rank, 5)
    h = np.empty(rank, F32)
    for i in (0, 3, 6):
        x = rand(rng, 7)
        x[i] = bad
        out = np.full(5, 7.0, F32)
        assert not kl.forward_vec(a, bt, 2.0, x, h, out)
        assert not kl.forward_add_vec(a, bt, 2.0, x, h, out)
        assert np.all(out == 7.0)
    xb = rand(rng, 4, 7)
    xb[3, 5] = bad  # the last row: earlier rows must not have been written either
    for accumulate in (False, True):
        outb = np.full((4, 5), 7.0, F32)
        assert not kl.forward_batch(a, bt, 2.0, xb, np.empty((4, rank), F32), outb, accumulate)
        assert np.all(outb == 7.0)


def test_overflow_of_the_hidden_vector_is_a_failure() -> None:
    a = np.ones((2, 4), F32)
    bt = np.ones((2, 3), F32)
    x = np.full(4, 3e38, F32)  # finite, but A·x is not
    out = np.zeros(3, F32)
    assert not kl.forward_vec(a, bt, 1.0, x, np.empty(2, F32), out)
    assert not np.any(out)


def nlms(x: np.ndarray) -> float:
    return 1.0 / max(float(f64(x) @ f64(x)), 1.0)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    mode=st.sampled_from([kl.MODE_REGRESS, kl.MODE_GRADIENT, kl.MODE_NOISE]),
    weight=st.floats(-3.0, 3.0),
    x_scale=st.sampled_from([0.05, 1.0, 4.0]),
    seed=st.integers(0, 999),
)
def test_prepare_and_commit_accumulate_the_reference_gradient(
    shape: tuple[int, int, int], mode: int, weight: float, x_scale: float, seed: int
) -> None:
    rank, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    a, bt = rand(rng, rank, n_in), rand(rng, rank, n_out)
    x, v = rand(rng, n_in, scale=x_scale), rand(rng, n_out)
    s = 1.25
    key = np.uint64(seed + 1)
    h, u, g = np.empty(rank, F32), np.empty(rank, F32), np.empty(n_out, F32)
    assert kl.prepare_grad(a, bt, s, x, v, weight, mode, key, h, u, g)
    w = weight * nlms(x)
    if mode == kl.MODE_REGRESS:
        g_ref = w * (ref_forward(a, bt, s, x) - v)
    elif mode == kl.MODE_GRADIENT:
        g_ref = w * f64(v)
    else:
        noise = np.empty(n_out, F32)
        kr.fill_normal(key, 1.0, noise)
        g_ref = w * f64(noise)
    gmag = float(np.abs(g_ref).max()) + abs(w) * (float(np.abs(ref_forward(a, bt, s, x)).max()))
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * gmag + 1e-30)
    ga, gb = rand(rng, rank, n_in), rand(rng, rank, n_out)  # commit adds to what is there
    ga0, gb0 = f64(ga), f64(gb)
    kl.commit_grad(a, s, x, h, u, g, ga, gb, False)
    da, dbt = ref_grads(a, bt, s, x, g)
    np.testing.assert_allclose(ga, ga0 + da, rtol=1e-4, atol=1e-4 * (np.abs(da).max() + 1.0))
    np.testing.assert_allclose(gb, gb0 + dbt, rtol=1e-4, atol=1e-4 * (np.abs(dbt).max() + 1.0))
    # gradient checkpointing: recomputing h from a scribbled scratch gives the same bits
    ga2, gb2 = ga0.astype(F32), gb0.astype(F32)
    h_junk = np.full(rank, 123.0, F32)
    kl.prepare_grad(a, bt, s, x, v, weight, mode, key, h, u, g)
    kl.commit_grad(a, s, x, h_junk, u, g, ga2, gb2, True)
    np.testing.assert_array_equal(ga2, ga)
    np.testing.assert_array_equal(gb2, gb)


def test_prepare_grad_reports_non_finite_input_and_overflow() -> None:
    rng = np.random.default_rng(1)
    a, bt = rand(rng, 2, 6), rand(rng, 2, 5)
    h, u, g = np.empty(2, F32), np.empty(2, F32), np.empty(5, F32)
    x = rand(rng, 6)
    x[2] = np.nan
    assert not kl.prepare_grad(a, bt, 1.0, x, rand(rng, 5), 1.0, 0, np.uint64(0), h, u, g)
    huge = np.full(5, 3e38, F32)  # finite gradient whose Bᵀg overflows
    unit = np.eye(6, dtype=F32)[0]  # ‖x‖ = 1: no per-sample normalisation
    assert not kl.prepare_grad(
        a, np.ones((2, 5), F32), 1.0, unit, huge, 1.0, kl.MODE_GRADIENT, np.uint64(0), h, u, g
    )


def test_apply_step_matches_the_candidate_norms_and_consumes_the_gradient() -> None:
    rng = np.random.default_rng(2)
    a, ga, bt, gb = rand(rng, 3, 9), rand(rng, 3, 9), rand(rng, 3, 4), rand(rng, 3, 4)
    step = 0.37
    expect_a = a - F32(step) * ga
    expect_b = bt - F32(step) * gb
    na, nb = ku.candidate_sq_norms(a, ga, bt, gb, step)
    a0 = a.copy()
    assert np.array_equal(a, a0)  # computing the candidates writes nothing
    ku.apply_step(a, ga, bt, gb, step)
    np.testing.assert_allclose(a, expect_a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bt, expect_b, rtol=1e-6, atol=1e-7)
    assert na == pytest.approx(float(np.sum(f64(a) ** 2)), rel=1e-6)
    assert nb == pytest.approx(float(np.sum(f64(bt) ** 2)), rel=1e-6)
    assert not ga.any() and not gb.any()


def test_candidate_norms_flag_non_finite_results() -> None:
    a, ga = np.ones((2, 3), F32), np.full((2, 3), -3e38, F32)
    bt, gb = np.ones((2, 2), F32), np.zeros((2, 2), F32)
    na, nb = ku.candidate_sq_norms(a, ga, bt, gb, 10.0)
    assert not math.isfinite(na) and math.isfinite(nb)


def test_squared_norms_are_float64_and_do_not_overflow_for_large_finite_values() -> None:
    big = np.full((2, 3), 1e28, F32)  # squares far beyond float32, well within float64
    expected = 6 * float(F32(1e28)) ** 2
    assert ku.sq_norm(big) == pytest.approx(expected, rel=1e-12)
    assert ku.grad_sq_norm(big, big[:, :2].copy()) == pytest.approx(expected * 10 / 6, rel=1e-12)
    na, nb = ku.candidate_sq_norms(big, np.zeros_like(big), big, np.zeros_like(big), 1.0)
    assert na == pytest.approx(expected, rel=1e-12) and nb == pytest.approx(expected, rel=1e-12)
    rng = np.random.default_rng(3)
    x = rand(rng, 1000)
    assert ku.sq_norm(x) == pytest.approx(float(np.sum(f64(x) ** 2)), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    data=st.data(),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_all_finite_finds_any_nan_or_inf(n: int, data: st.DataObject, bad: float) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(F32)
    assert ku.all_finite(x)
    x[data.draw(st.integers(0, n - 1))] = bad
    assert not ku.all_finite(x)
    assert not ku.all_finite(x.reshape(1, n))
    assert ku.all_finite(np.full(5, np.finfo(F32).max, F32))  # large but finite


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 40),
    extra=st.integers(0, 2),
    data=st.data(),
    frozen=st.booleans(),
)
def test_vectors_equal_is_numpy_array_equal(
    n: int, extra: int, data: st.DataObject, frozen: bool
) -> None:
    """Deep's comparison of a replayed and a held-out sample (which must keep the GIL) answers
    as ``np.array_equal`` does: lengths, -0.0 against 0.0, NaN, one element changed."""
    values = st.sampled_from([0.0, -0.0, 1.0, -2.5, np.nan, np.inf, 3e38, 1e-45])
    a = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), F32)
    b = a.copy() if not extra else np.concatenate([a, np.ones(extra, F32)])
    if n and data.draw(st.booleans()):
        b[data.draw(st.integers(0, n - 1))] = data.draw(values)
    if frozen:  # samples hold read-only copies
        a, b = (np.frombuffer(v.tobytes(), F32) for v in (a, b))
    assert ku.vectors_equal(a, b) == np.array_equal(a, b)
    assert ku.vectors_equal(b, a) == np.array_equal(b, a)


# ---------------------------------------------------------------------------- random numbers


def test_uniforms_lie_strictly_inside_the_unit_interval_and_look_uniform() -> None:
    key = np.uint64(12345)
    u = np.array([kr.uniform01(key, np.uint64(i)) for i in range(20_000)])
    assert u.min() > 0.0 and u.max() < 1.0
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 2000) < 4 * math.sqrt(2000))


def test_normals_are_standard_and_keyed() -> None:
    n = 50_000
    a = np.zeros(n, F32)
    kr.fill_normal(np.uint64(7), 1.0, a)
    assert abs(float(a.mean())) < 4 / math.sqrt(n)
    assert float(a.std()) == pytest.approx(1.0, abs=0.02)
    assert abs(float(np.mean(f64(a) ** 3))) < 0.05  # symmetric
    assert float(np.mean(f64(a) ** 4)) == pytest.approx(3.0, abs=0.15)  # Gaussian tails
    again = np.zeros(n, F32)
    kr.fill_normal(np.uint64(7), 1.0, again)
    assert np.array_equal(a, again)
    other = np.zeros(n, F32)
    kr.fill_normal(np.uint64(8), 1.0, other)
    assert abs(float(np.corrcoef(a, other)[0, 1])) < 0.02
    base = np.arange(n, dtype=F32)
    added = base.copy()
    kr.add_normal(np.uint64(7), 0.5, added)
    np.testing.assert_allclose(added - base, 0.5 * a, atol=1e-2)


def test_hash_vector_is_stable_and_sensitive() -> None:
    x = np.linspace(-1, 1, 64).astype(F32)
    h = kr.hash_vector(x, np.uint64(1))
    assert h == kr.hash_vector(x.copy(), np.uint64(1))
    assert h != kr.hash_vector(x, np.uint64(2))
    seen = {int(h)}
    for i in range(64):
        y = x.copy()
        y.view(np.uint32)[i] ^= np.uint32(1)  # one bit
        seen.add(int(kr.hash_vector(y, np.uint64(1))))
    assert len(seen) == 65
    assert kr.hash_vector(x[:63].copy(), np.uint64(1)) != h
    # a fresh process gets the same value: no per-process salt
    code = (
        "import numpy as np; from sona.kernels import random as kr; "
        "print(int(kr.hash_vector(np.linspace(-1, 1, 64).astype(np.float32), np.uint64(1))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == int(h)


def test_dropout_masks_at_rate_p_scales_the_rest_and_is_keyed() -> None:
    n, p = 20_000, 0.3
    x = np.linspace(1, 2, n).astype(F32)
    out = np.empty_like(x)
    kl.apply_dropout(x, p, np.uint64(5), np.uint64(0), out)
    dropped = out == 0
    assert abs(float(dropped.mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(out[~dropped], x[~dropped] / (1 - p), rtol=1e-6)
    again = np.empty_like(x)
    kl.apply_dropout(x, p, np.uint64(5), np.uint64(0), again)
    assert np.array_equal(out, again)
    kl.apply_dropout(x, p, np.uint64(5), np.uint64(1), again)
    assert float(np.mean(dropped == (again == 0))) < 0.7  # another counter, another mask


# ---------------------------------------------------------------------------- warm-up


def test_warm_up_compiles_every_kernel_and_sets_every_fast_entry() -> None:
    """Run in a fresh process, so kernels compiled by other tests cannot hide a gap."""
    code = """
import importlib, pkgutil
import sona.kernels as pkg
from sona.kernels import warmup
warmup.warm_up()
missing = []
for info in pkgutil.iter_modules(pkg.__path__):
    mod = importlib.import_module(f"sona.kernels.{info.name}")
    for name, obj in vars(mod).items():
        if getattr(obj, "__module__", None) != mod.__name__ or not hasattr(obj, "signatures"):
            continue
        if obj.targetoptions.get("inline") == "always":
            continue  # compiled into its callers
        if not obj.signatures:
            missing.append(f"{info.name}.{name}")
unset = [n for n in warmup.FastKernels.__annotations__ if not hasattr(warmup.fast, n)]
print(missing, unset)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
