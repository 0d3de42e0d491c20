"""stack_rows gives exactly np.stack, into a fresh or a given matrix, for contiguous and strided
rows, and refuses rows of another dtype or width."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.errors import InvalidInputError
from sona.stacking import stack_rows


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    width=st.integers(1, 17),
    strided=st.booleans(),
    given_out=st.booleans(),
    seed=st.integers(0, 9),
)
def test_stack_rows_matches_numpy(
    n: int, width: int, strided: bool, given_out: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    if strided:
        rows = [rng.standard_normal(2 * width).astype(np.float32)[::2] for _ in range(n)]
    else:
        rows = [rng.standard_normal(width).astype(np.float32) for _ in range(n)]
    out = np.full((n, width), np.nan, np.float32) if given_out else None
    got = stack_rows(rows, width, out=out)
    assert got.shape == (n, width) and got.dtype == np.float32
    if given_out:
        assert got is out
    if n:
        np.testing.assert_array_equal(got, np.stack(rows))


@pytest.mark.parametrize(
    "bad",
    [np.zeros(8, np.float64), np.zeros(4, np.float32), np.zeros((2, 8), np.float32)],
    ids=["float64", "short", "2-d"],
)
def test_a_row_of_another_dtype_or_shape_is_refused(bad: np.ndarray) -> None:
    rows = [np.ones(8, np.float32), bad]
    with pytest.raises(InvalidInputError, match="float32 of shape"):
        stack_rows(rows, 8)


def test_a_wrong_out_is_refused() -> None:
    rows = [np.ones(8, np.float32)]
    with pytest.raises(ValueError, match="C-contiguous float32"):
        stack_rows(rows, 8, out=np.zeros((1, 8), np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        stack_rows(rows, 8, out=np.zeros((1, 16), np.float32)[:, ::2])
