"""Copies of the Instant loop's live adapter, for measuring an ``EWC_MERGE`` fold out of sample.

``EWC_MERGE`` folds the live adapter into the consolidated one, and the live adapter has learned
every sample it hands over: measured on held-back samples it had learned, the fold looks better
than it is on samples it never saw (pure-noise targets, where nothing carries over: +0.0101 to
+0.0130 in sample against -0.0008 to +0.0007 out of sample). So the Instant loop copies the live
adapter's factors every few samples, and a hand-over brings the copy that leaves nearest the
samples Background holds back after it. What the live adapter learned from those is its change
since the copy; Background measures the published state less that change.

Copies follow every sample while fewer than 8 are pending, then every quarter of those pending,
at most every ``SNAPSHOT_EVERY``, and a hand-over takes the copy that leaves the number of
samples Background asks for nearest: up to half a gap more or fewer. While the previous
hand-over is being consolidated (in the runtime, ~10 ms at full ingress), no hand-over can come,
and copies follow every ``IN_TRANSIT_EVERY`` samples only; its commit takes one at the next
sample and the usual gaps resume. Each copy is a plain array
copy into one of ``COPIES_KEPT`` reused slots (3.5-22 µs at width 4096, rank 2, one module, as
the slot is in cache or not); an adapter is built from one only at a hand-over.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from sona.lora import MicroLoRA
from sona.objective import MAX_EVAL

SNAPSHOT_EVERY = 32
"""Most samples between two copies."""
IN_TRANSIT_EVERY = 64
"""Samples between two copies while a hand-over's consolidation is under way: the next
hand-over waits for its commit, which the copies then catch up with (see ``next_copy``)."""
COPIES_KEPT = MAX_EVAL // SNAPSHOT_EVERY + 2
"""Slots: enough for copies reaching back past MAX_EVAL samples at the widest gap."""


def next_copy(appended: int, *, in_transit: bool = False) -> int:
    """When to copy next, after a copy at ``appended`` samples; ``in_transit``: while the
    previous hand-over is still being consolidated (no hand-over can come before its commit,
    so copies taken meanwhile matter only for one right after it)."""
    if in_transit:
        return appended + IN_TRANSIT_EVERY
    return appended + min(SNAPSHOT_EVERY, max(1, appended // 4))


class LiveCopies:
    """The copies of one live adapter's factors, each with the position it was taken at."""

    def __init__(self) -> None:
        self._sources: list[np.ndarray] = []
        self._slots: list[list[np.ndarray]] = []
        self._taken: deque[tuple[int, int]] = deque()  # (position, slot), oldest first
        self._free: list[int] = []

    def follow(self, live: MicroLoRA) -> None:
        """Copy ``live`` from now on (its factor arrays are updated in place); earlier copies
        are forgotten."""
        self._sources = live.factor_buffers()
        shapes = [s.shape for s in self._sources]
        if not self._slots or [d.shape for d in self._slots[0]] != shapes:
            self._slots = [[np.empty_like(s) for s in self._sources] for _ in range(COPIES_KEPT)]
        self.clear()

    def clear(self) -> None:
        self._taken.clear()
        self._free = list(range(len(self._slots)))

    def take(self, position: int) -> None:
        """Copy the live adapter as it is after ``position`` samples; the oldest copy's slot
        is reused once all are in use."""
        taken = self._taken
        slot = taken.popleft()[1] if len(taken) == len(self._slots) else self._free.pop()
        _copy(self._slots[slot], self._sources)
        taken.append((position, slot))

    def before(self, want: int, pending: int, evicted: int) -> tuple[int, int] | None:
        """(slot, samples learned) of the copy that leaves nearest ``want`` of ``pending``
        samples after it (the more on a tie); None without one that learned at least one and
        not all. Positions count ``evicted`` samples too."""
        best = None
        for at, slot in reversed(self._taken):  # newest first: ever more samples after
            learned = at - evicted
            if learned < 1:
                break
            if learned >= pending:
                continue
            if pending - learned >= want:
                if best is None or pending - learned - want <= want - (pending - best[1]):
                    best = slot, learned
                break
            best = slot, learned
        return best

    def write(self, slot: int, into: MicroLoRA) -> MicroLoRA:
        """``into`` (a clone of the live adapter) with the factors of the copy in ``slot``."""
        _copy(into.factor_buffers(), self._slots[slot])
        return into

    def listed(self, live: MicroLoRA) -> list[tuple[int, MicroLoRA]]:
        """Each copy as (position, an adapter holding it), oldest first (for a checkpoint)."""
        return [(at, self.write(slot, live.clone())) for at, slot in self._taken]

    def restore(self, copies: Sequence[tuple[int, MicroLoRA]]) -> None:
        """Replace the copies by ``copies`` (position, adapter), oldest first."""
        self.clear()
        for at, adapter in copies:
            slot = self._free.pop()
            _copy(self._slots[slot], adapter.factor_buffers())
            self._taken.append((at, slot))


def _copy(dst: list[np.ndarray], src: list[np.ndarray]) -> None:
    for d, s in zip(dst, src, strict=True):
        np.copyto(d, s)
