"""stack_rows gives exactly np.stack, into a fresh or a given matrix, for contiguous, strided and
read-only rows, copies the contiguous ones in its GIL-free kernel, and refuses rows of another
dtype or width."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sona.kernels.gather import gather_rows, record_address

from sona import stacking
from sona.errors import InvalidInputError
from sona.stacking import stack_rows


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    width=st.integers(1, 17),
    kinds=st.lists(st.sampled_from(["plain", "strided", "read-only"]), min_size=1),
    given_out=st.booleans(),
    seed=st.integers(0, 9),
)
def test_stack_rows_matches_numpy(
    n: int, width: int, kinds: list[str], given_out: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = rng.standard_normal(2 * width).astype(np.float32)
        kind = kinds[i % len(kinds)]
        if kind == "strided":
            rows.append(row[::2])
        elif kind == "read-only":  # how samples hold their embeddings
            rows.append(np.frombuffer(row[:width].tobytes(), np.float32))
        else:
            rows.append(row[:width])
    out = np.full((n, width), np.nan, np.float32) if given_out else None
    got = stack_rows(rows, width, out=out)
    assert got.shape == (n, width) and got.dtype == np.float32
    if given_out:
        assert got is out
    if n:
        np.testing.assert_array_equal(got, np.stack(rows))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(8, np.float64),
        np.zeros(8, np.int32),  # float32's width: only its dtype tells it apart
        np.zeros(4, np.float32),
        np.zeros((2, 8), np.float32),
        np.zeros((), np.float32),
    ],
    ids=["float64", "int32", "short", "2-d", "0-d"],
)
def test_a_row_of_another_dtype_or_shape_is_refused(bad: np.ndarray) -> None:
    rows = [np.ones(8, np.float32), bad]
    with pytest.raises(InvalidInputError, match="float32 of shape"):
        stack_rows(rows, 8)


def test_rows_of_an_array_subclass_are_copied_as_they_read() -> None:
    class Tagged(np.ndarray):
        pass

    rows = [np.arange(8, dtype=np.float32).view(Tagged) + i for i in range(3)]
    np.testing.assert_array_equal(stack_rows(rows, 8), np.stack([np.asarray(r) for r in rows]))


def test_a_wrong_out_is_refused() -> None:
    rows = [np.ones(8, np.float32)]
    with pytest.raises(ValueError, match="C-contiguous float32"):
        stack_rows(rows, 8, out=np.zeros((1, 8), np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        stack_rows(rows, 8, out=np.zeros((1, 16), np.float32)[:, ::2])


def test_contiguous_rows_are_copied_by_the_gil_free_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    copied: list[int] = []

    def spy(at: np.ndarray, out: np.ndarray) -> None:
        copied.append(int(np.count_nonzero(at)))
        gather_rows(at, out)

    monkeypatch.setattr(stacking.gather, "gather_rows", spy)
    rows = [np.full(8, i, np.float32) for i in range(5)] + [np.ones(16, np.float32)[::2]]
    np.testing.assert_array_equal(stack_rows(rows, 8), np.stack(rows))
    assert copied == [5]  # the strided row was copied on its own


def test_an_address_is_recorded_only_for_a_contiguous_row_of_the_width() -> None:
    at = np.zeros(2, np.int64)
    assert not record_address(np.ones(9, np.float32), 8, at, 0)
    assert not record_address(np.ones(16, np.float32)[::2], 8, at, 0)
    assert at.tolist() == [0, 0]  # nothing written: the kernel never reads past a row
    x = np.ones(8, np.float32)
    assert record_address(x, 8, at, 1) and at[1] == x.ctypes.data
