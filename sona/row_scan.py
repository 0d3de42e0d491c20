"""A consolidation's input rows gathered and read for its first two passes in one kernel call.

A consolidation reads every handed-over input for the shift detector (its projection on the
task's basis) and for the pattern bank (its nearest centroid); before either, the inputs are
gathered from their samples into one matrix. As three kernel calls the Background loop's worker
thread needs the GIL between them, and while the event loop is busy serving requests each
take-back waits for it to idle. As one call (:func:`sona.kernels.batch.scan_rows`), the first
~two thirds of a consolidation run without the GIL from start to end, beside the requests, and
each row is read from memory once rather than three times.

The results are used only where they are exactly what the detector and the bank would compute
themselves: the detector past its reference phase, with the basis unchanged; the bank once all
its slots are filled (slot filling changes centroids row by row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sona.kernels import batch as k_batch
from sona.stacking import fill_rows, record_rows

_F32 = np.float32


@dataclass(frozen=True, slots=True)
class Projected:
    """Rows' projections on ``basis`` and their fingerprints, for the shift detector."""

    basis: np.ndarray
    proj: np.ndarray
    energy: np.ndarray
    moment: np.ndarray


@dataclass(frozen=True, slots=True)
class Labelled:
    """Rows' nearest ``centroids`` with per-cluster sums and member counts, for the bank."""

    centroids: np.ndarray
    labels: np.ndarray
    sums: np.ndarray
    members: np.ndarray


def scan_rows(
    rows: Sequence[np.ndarray],
    out: np.ndarray,
    scanned: int,
    basis: np.ndarray | None,
    centroids: np.ndarray | None,
    kept_from: int = 0,
) -> tuple[Projected | None, Labelled | None]:
    """Gather ``rows`` into ``out`` (C-contiguous float32, (len(rows), width)) and read the
    first ``scanned`` for the detector (on ``basis``) and the bank (on ``centroids``); None
    for a part not asked for. Rows that cannot be gathered from their address (strided) are
    copied under the GIL first, and nothing is read for the passes: the caller's passes then
    read the rows themselves.

    Only the rows from ``kept_from`` on are sure to be written to ``out``; those before it
    may be left as they were: a caller that reads only the last rows afterwards spares
    writing the others out to memory."""
    width = out.shape[1]
    at, strided = record_rows(rows, width)
    if strided or (basis is None and centroids is None):
        fill_rows(rows, at, strided, out)
        return None, None
    b = basis if basis is not None else np.empty((0, width), _F32)
    c = centroids if centroids is not None else np.empty((0, width), _F32)
    proj = np.empty((scanned, b.shape[0]), _F32)
    energy = np.empty(scanned)
    moment = np.empty(scanned)
    labels = np.empty(scanned, np.intp)
    sums = np.empty((c.shape[0], width), _F32)
    members = np.empty(c.shape[0], np.int64)
    k_batch.scan_rows(
        at, out, scanned, b, proj, energy, moment, c, labels, sums, members, kept_from
    )
    return (
        Projected(basis, proj, energy, moment) if basis is not None else None,
        Labelled(centroids, labels, sums, members) if centroids is not None else None,
    )
