"""Stacking sample embeddings into one matrix from a worker thread, without holding the GIL.

NumPy releases the GIL around every copy of more than a few hundred elements, so ``np.stack``
or ``np.concatenate`` over a list of embeddings gives the GIL up and takes it back once per
row. From a worker thread, while the event loop keeps the GIL busy, each take-back waits up
to a switch interval (5 ms): stacking 1,000 embeddings of width 4096 took ~0.8 s instead of
1.5 ms, and the Background loop fell behind. Copying each row with a ``memcpy`` that keeps the
GIL avoids the waits but holds the GIL for the whole copy (~3 ms for rows that come from
memory), and every request the event loop serves meanwhile waits. So the GIL is held only to
note where each row starts (through a dispatch-free entry point: with Numba's dispatch and a
shape check per row that loop took three times as long, ~0.6 ms for 1,000 rows in one
stretch), and one kernel copies them all without it
(:mod:`sona.kernels.gather`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sona.errors import InvalidInputError
from sona.kernels import gather
from sona.kernels.warmup import fast, warm_up

_F32 = np.dtype(np.float32)
_ND = np.ndarray


def stack_rows(rows: Sequence[np.ndarray], width: int, out: np.ndarray | None = None) -> np.ndarray:
    """The 1-D float32 ``rows`` (each of ``width``) as one (len(rows), width) matrix.

    ``out``, if given, must be a C-contiguous float32 array of that shape; it is filled and
    returned. A row of another dtype or shape raises InvalidInputError.
    """
    n = len(rows)
    if out is None:
        out = np.empty((n, width), np.float32)
    elif out.shape != (n, width) or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape ({n}, {width})")
    if n == 0:
        return out
    at, strided = record_rows(rows, width)
    fill_rows(rows, at, strided, out)
    return out


def record_rows(rows: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, list[int]]:
    """Where each row's data starts (0 where it cannot be gathered from there), and the
    indices of those rows: strided ones, which the caller copies itself while ``rows`` holds
    them. A row of another dtype or shape raises InvalidInputError."""
    warm_up()  # at once when already done (the runtime does it at start)
    at = np.zeros(len(rows), np.int64)
    record = fast.record_address
    strided: list[int] = []
    for i, row in enumerate(rows):
        # ~0.2 µs a row, the GIL held: the entry point skips Numba's dispatch, so only 1-D
        # float32 arrays may reach it (anything else, or a row it cannot gather from its
        # address, is checked here and left to the caller)
        if (
            type(row) is not _ND
            or row.dtype is not _F32
            or row.ndim != 1
            or not record(row, width, at, i)
        ):
            if row.shape != (width,) or row.dtype != _F32:
                raise InvalidInputError(
                    f"embeddings must be float32 of shape ({width},), got {row.dtype} {row.shape}"
                )
            strided.append(i)
    return at, strided


def fill_rows(
    rows: Sequence[np.ndarray], at: np.ndarray, strided: list[int], out: np.ndarray
) -> None:
    """``out``'s rows from what :func:`record_rows` found: the recorded ones in one GIL-free
    kernel, the strided ones copied here while ``rows`` holds them."""
    gather.gather_rows(at, out)
    for i in strided:
        out[i] = rows[i]
