"""The input rows of the samples waiting for consolidation, kept contiguous as they arrive.

A consolidation reads the input embeddings of every sample it folds in as one matrix. Gathering
~1,000 scattered vectors into one in the Background loop's worker thread copies them from main
memory while holding the GIL (a copy that releases it would wait for the event loop at every
row), and every request the Instant loop serves meanwhile waits for it: about half of a
consolidation's GIL time went there. The Instant loop instead copies each input as it applies
it, while the vector is still in cache (~0.5 µs), into a block the hand-over passes on whole.

Each block keeps :data:`FRONT` rows (fewer for very wide inputs) free before its first sample,
where the Background loop writes the rows of the samples it held back from its previous run:
the samples it consolidates are then one contiguous run of rows, with no copy of the
hand-over's. Two blocks take turns: the Instant loop fills one while a consolidation reads the
other, which comes back when that consolidation commits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sona.stacking import stack_rows

FRONT = 64  # rows kept free before the first sample: the Background loop's held-back samples
PREALLOCATE = 64 << 20  # bytes of a block made ready at construction, at most
_F32 = np.dtype(np.float32)


@dataclass(slots=True)
class HandedRows:
    """A block handed over with its samples: their rows are ``block[start:start + count]``."""

    block: np.ndarray
    start: int
    count: int

    def with_front(self, rows: list[np.ndarray]) -> np.ndarray | None:
        """The ``rows`` written just before the handed ones, and the whole run as one view;
        None when the free front is too small for them."""
        n = len(rows)
        if n > self.start:
            return None
        if n:
            stack_rows(rows, self.block.shape[1], out=self.block[self.start - n : self.start])
        return self.block[self.start - n : self.start + self.count]


class PendingRows:
    """Rows appended as samples are applied, dropped from the front as samples are evicted,
    and taken all at once by a hand-over.

    A block holds as many rows as the pending bound (up to :data:`PREALLOCATE` bytes) and never
    grows: growing would copy every row and fault in fresh pages on the request path. Samples
    beyond it (a pending bound above the block, a Background loop far behind) are not copied;
    that hand-over then comes without rows and the Background loop gathers them as before.
    """

    def __init__(self, dim: int, rows: int) -> None:
        self.dim = dim
        self._size = dim * 4
        cap = max(2, min(FRONT + rows, PREALLOCATE // self._size))
        self._front = min(FRONT, cap // 2)  # very wide inputs keep a smaller front
        self._spare: np.ndarray | None = _touched(cap, dim)
        self._use(_touched(cap, dim))

    def _use(self, block: np.ndarray) -> None:
        self._block = block
        self._bytes = block.data.cast("B")
        self._start = self._end = self._front
        self._complete = True  # every pending sample has its row

    def append(self, x: np.ndarray) -> None:
        """Copy ``x``, a float32 vector of ``dim``, after the last row."""
        if self._end == self._block.shape[0] and not (self._complete and self._compact()):
            self._complete = False
        if not self._complete:
            return
        end = self._end
        off = end * self._size
        try:
            self._bytes[off : off + self._size] = x.data.cast("B")
        except (TypeError, ValueError):  # not contiguous: memoryview casts refuse it
            self._block[end] = x
        self._end = end + 1

    def drop_oldest(self) -> None:
        if self._complete and self._end > self._start:
            self._start += 1

    def take(self) -> HandedRows | None:
        """Every row, in a block the caller now owns (None if some sample has none); appending
        goes on in another block."""
        if not self._complete:  # nothing to hand over: keep the block
            self._use(self._block)
            return None
        handed = HandedRows(self._block, self._start, self._end - self._start)
        spare, self._spare = self._spare, None
        self._use(spare if spare is not None else np.empty_like(self._block))
        return handed

    def give_back(self, handed: HandedRows) -> None:
        """A handed-over block whose consolidation is done is reused for a later hand-over."""
        if self._spare is None and handed.block.shape == self._block.shape:
            self._spare = handed.block

    def reset(self, xs: list[np.ndarray]) -> None:
        """Start over with the rows ``xs`` (restoring a checkpoint's pending samples)."""
        self._use(self._block)
        for x in xs:
            self.append(x)

    def _compact(self) -> bool:
        """Move the rows to the front if evictions freed room there; whether any was free."""
        front = self._front
        if self._start == front:
            return False
        live = self._end - self._start
        self._block[front : front + live] = self._block[self._start : self._end]
        self._start, self._end = front, front + live
        return True


def _touched(rows: int, dim: int) -> np.ndarray:
    """A block whose pages are faulted in now, not on the request path."""
    block = np.empty((rows, dim), np.float32)
    block.fill(0.0)
    return block
