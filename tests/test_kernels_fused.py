"""The scratch-free hot-path kernels: ``forward_into`` and ``forward_packed``.

Each is compared with a float64 numpy reference and with the kernel it replaces on the hot path
(``forward_vec``), including their status codes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import assert_f32_close, ref_forward, ref_magnitude
from sona.kernels import lora as kl

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
    if n_in == n_out:
        w = np.stack([a, bt])
        packed = np.full(n_out, np.nan, F32)
        assert kl.forward_packed(w, scale, x, packed) == kl.FORWARD_OK
        np.testing.assert_array_equal(packed, out)


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
    square = np.stack([rand(rng, rank, 5), rand(rng, rank, 5)])
    assert kl.forward_packed(square, 1.0, rand(rng, 6), out) == kl.FORWARD_BAD_X
    assert kl.forward_packed(square, 1.0, rand(rng, 5), np.empty(6, F32)) == kl.FORWARD_BAD_OUT


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
