"""The pattern bank: k-means over input embeddings.

It tells the ENSEMBLE strategy which adapter an input belongs to, and the Deep loop where inputs
lie. Centroids are learned online (mini-batch k-means with per-cluster step 1/count, floored so
old clusters keep tracking drift) and refined by Lloyd passes in the Deep loop. A centroid is
only ever set from real inputs: an empty cluster keeps its last centroid or is re-seeded with an
input, never left at zero (a zero centroid would attract nothing or everything).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sona.errors import FormatError, InvalidInputError
from sona.kernels import batch as k_batch
from sona.row_scan import Labelled
from sona.validation import MAX_COUNT

_MIN_STEP = 0.01


class PatternBank:
    """Up to ``k`` centroids in ``dim`` dimensions; slots fill with the first distinct inputs."""

    def __init__(self, k: int, dim: int) -> None:
        if k < 1 or dim < 1:
            raise InvalidInputError(f"k and dim must be >= 1, got k={k}, dim={dim}")
        k_batch.warm_up()  # compiled now, not at the first update
        self.k = k
        self.dim = dim
        self.centroids = np.zeros((k, dim), np.float32)
        self.counts = np.zeros(k, np.int64)
        self.size = 0  # slots in use; always a prefix of the arrays

    def __len__(self) -> int:
        return self.size

    def clone(self, *, into: PatternBank | None = None) -> PatternBank:
        """An independent copy; ``into``: an earlier copy nothing uses any more, whose arrays
        then hold it.

        Copied holding the GIL (numpy's copy gives it up for arrays this large): a
        consolidation clones the bank first thing in its worker thread, which the event loop
        hands the GIL until its first kernel; a copy that gave it up ended that hand-off early,
        and the thread then waited for the GIL while requests kept the loop busy (sustained
        throughput, one module, 8 s runs alternated: 31.3 and 33.6 k/s, against 36.1 and
        36.1 k/s without the copy; copied this way, 38.3, 39.1, 37.5 against 38.4, 39.4,
        35.9 k/s)."""
        twin = into
        if twin is None or (twin.k, twin.dim) != (self.k, self.dim):
            twin = PatternBank(self.k, self.dim)
        twin.centroids.data.cast("B")[:] = self.centroids.data.cast("B")
        twin.counts.data.cast("B")[:] = self.counts.data.cast("B")
        twin.size = self.size
        return twin

    def assign(self, x: np.ndarray) -> int:
        """Index of the nearest centroid (squared Euclidean); -1 when the bank is empty."""
        if self.size == 0:
            return -1
        c = self.centroids[: self.size]
        d = np.einsum("ij,ij->i", c, c) - 2.0 * (c @ x)
        return int(np.argmin(d))

    def assign_many(self, xs: np.ndarray) -> np.ndarray:
        """Nearest cluster of each row (one GIL-free kernel pass); -1 on an empty bank."""
        xs = np.ascontiguousarray(xs, dtype=np.float32).reshape(-1, self.dim)
        labels = np.empty(xs.shape[0], np.intp)
        self._nearest(xs, labels, accumulate=False, skip_zero=False)
        return labels

    def _nearest(
        self, xs: np.ndarray, labels: np.ndarray, *, accumulate: bool, skip_zero: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels of ``xs`` (C-contiguous float32) and, with ``accumulate``, the float32 sum
        and number of the rows each cluster got (all-zero rows left out with ``skip_zero``)."""
        size = self.size
        sums = np.zeros((size, self.dim) if accumulate else (0, self.dim), np.float32)
        members = np.zeros(size, np.int64)
        if size == 0:
            labels.fill(-1)
            return sums, members
        centroids = self.centroids[:size]
        k_batch.nearest(xs, centroids, labels, sums, members, accumulate, skip_zero)
        return sums, members

    def scan_centroids(self) -> np.ndarray | None:
        """The centroids the next batch's labels are taken against, once every slot is in use
        (before that, slot filling changes them row by row): see :meth:`update`."""
        return self.centroids if self.size == self.k else None

    def takes(self, labelled: Labelled, rows: int) -> bool:
        """Whether :meth:`update` of ``rows`` rows takes ``labelled`` for them instead of
        reading the rows: it is of as many rows, against these centroids, every slot in use."""
        return (
            labelled.centroids is self.centroids
            and self.size == self.k
            and labelled.labels.shape[0] == rows
        )

    def update(self, xs: np.ndarray, labelled: Labelled | None = None) -> np.ndarray:
        """Fold a batch of inputs in; returns each input's cluster index after the update.

        Empty slots take the first inputs that differ from every centroid; the rest move their
        nearest centroid toward their mean by (members / count), floored at ``_MIN_STEP`` per
        member, which equals the sequential running mean while counts are small. A zero input
        (empty text) has no direction to cluster on: it gets its nearest cluster (-1 on an empty
        bank) and moves nothing, and a move onto zero (members that cancel their centroid, -x
        onto x) is not taken, so no centroid is ever zero.

        Slot filling, the batch's labels and per-cluster sums, and the moves are three GIL-free
        kernels (:mod:`sona.kernels.batch`). ``labelled``, taken against
        :meth:`scan_centroids` while the rows were gathered, stands for the labels and sums
        (the same, bit for bit) as long as the centroids have not changed since.
        """
        if labelled is not None and self.takes(labelled, len(xs)):
            k_batch.move_toward_means(
                self.centroids, self.counts, labelled.sums, labelled.members, _MIN_STEP
            )
            return labelled.labels
        xs = np.ascontiguousarray(xs, dtype=np.float32).reshape(-1, self.dim)
        labels = np.empty(xs.shape[0], np.intp)
        i = 0
        if self.size < self.k and xs.shape[0]:
            i, size = k_batch.seed_slots(
                xs, self.centroids, self.counts, self.size, labels, _MIN_STEP
            )
            self.size = int(size)
        rest = xs[i:]
        if rest.shape[0]:
            sums, members = self._nearest(rest, labels[i:], accumulate=True, skip_zero=True)
            k_batch.move_toward_means(
                self.centroids[: self.size], self.counts[: self.size], sums, members, _MIN_STEP
            )
        return labels

    def refine(self, xs: np.ndarray, iterations: int = 3) -> None:
        """Lloyd passes over ``xs``; a cluster that gets no input keeps its centroid.

        Zero inputs are left out of the means, as :meth:`update` leaves them out of its moves:
        counted, a cluster whose only members were zero inputs (all nearest to the centroid of
        smallest norm) became the zero vector, and zero members dragged a mean toward the
        origin. A cluster whose members cancel out (x and -x, both nearest to the centroid of
        smallest norm) keeps its centroid too: their mean, zero, would attract nearly every
        input afterwards.
        """
        xs = np.ascontiguousarray(xs, dtype=np.float32).reshape(-1, self.dim)
        if self.size == 0 or xs.shape[0] == 0:
            return
        labels = np.empty(xs.shape[0], np.intp)
        for _ in range(iterations):
            sums, members = self._nearest(xs, labels, accumulate=True, skip_zero=True)
            got = np.flatnonzero(members > 0)
            means = sums[got] / members[got, None].astype(np.float32)
            real = means.any(axis=1)
            self.centroids[got[real]] = means[real]

    def merge_and_prune(self, *, merge_cos: float = 0.98, min_share: float = 0.002) -> list[int]:
        """Merge near-duplicate centroids and drop clusters holding almost no inputs.

        Returns ``mapping``: old slot -> new slot (or -1 when pruned), so per-cluster state kept
        elsewhere (ensemble adapters) can follow. Freed slots are re-seeded by later inputs.
        """
        n = self.size
        if n == 0:
            return []
        total = max(int(self.counts[:n].sum()), 1)
        c = self.centroids[:n].astype(np.float64)
        norms = np.linalg.norm(c, axis=1)
        norms[norms == 0] = 1.0
        unit = c / norms[:, None]
        group = list(range(n))
        for i in range(n):
            for j in range(i):
                if group[j] == j and float(unit[i] @ unit[j]) >= merge_cos:
                    group[i] = j
                    break
        roots = [j for j in range(n) if group[j] == j]
        share = {j: int(self.counts[[i for i in range(n) if group[i] == j]].sum()) for j in roots}
        keep = [j for j in roots if share[j] / total >= min_share]
        if not keep:  # never prune everything: keep the largest group
            keep = [max(roots, key=lambda j: share[j])]
        mapping = [-1] * n
        new_c = np.zeros_like(self.centroids)
        new_counts = np.zeros_like(self.counts)
        for slot, j in enumerate(keep):
            members = [i for i in range(n) if group[i] == j]
            w = self.counts[members].astype(np.float64)
            w = w / w.sum() if w.sum() > 0 else np.full(len(members), 1.0 / len(members))
            new_c[slot] = (w[:, None] * c[members]).sum(axis=0)
            new_counts[slot] = int(self.counts[members].sum())
            for i in members:
                mapping[i] = slot
        self.centroids = new_c
        self.counts = new_counts
        self.size = len(keep)
        return mapping

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"k": self.k, "dim": self.dim, "size": self.size}
        return meta, {"centroids": self.centroids.copy(), "counts": self.counts.copy()}

    def load(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        try:
            k, dim, size = int(meta["k"]), int(meta["dim"]), int(meta["size"])
            centroids = np.asarray(arrays["centroids"], np.float32)
            counts = np.asarray(arrays["counts"], np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"invalid pattern bank state: {exc}") from None
        if (k, dim) != (self.k, self.dim) or not 0 <= size <= k:
            raise FormatError("pattern bank state does not match this bank's shape")
        if centroids.shape != (k, dim) or counts.shape != (k,) or not np.isfinite(centroids).all():
            raise FormatError("pattern bank arrays have the wrong shape or hold NaN/inf")
        if ((counts < 0) | (counts > MAX_COUNT)).any():
            raise FormatError("pattern bank counts must be in [0, 2**53]")
        self.centroids = centroids.copy()
        self.counts = counts.copy()
        self.size = size
