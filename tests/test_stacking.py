"""Chunked stacking gives exactly np.stack, for every length around the chunk size."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sona.stacking import CHUNK_ROWS, stack_rows


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3 * CHUNK_ROWS + 1), width=st.integers(1, 17), seed=st.integers(0, 9))
def test_stack_rows_matches_numpy(n: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal(width).astype(np.float32) for _ in range(n)]
    got = stack_rows(rows, width)
    assert got.shape == (n, width) and got.dtype == np.float32
    if n:
        np.testing.assert_array_equal(got, np.stack(rows))
