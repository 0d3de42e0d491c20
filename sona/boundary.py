"""Detecting task boundaries from a sustained shift in the input statistics.

Traffic that moves to another domain moves its inputs to other directions of the embedding
space. The detector learns the current task's principal input subspace from its first
inputs, measures on the next ones (out of sample) how much of an input's energy falls outside
it, and then runs a two-sided CUSUM on that residual fraction, standardised by its calibrated
spread. Each input's contribution is capped, so one odd input cannot fire a boundary: a shift
has to persist for several inputs in a row. The residual fraction does not depend on the input
scale, and its calibration happens per task, so a stationary stream of any shape stays quiet.

An input that repeats one of the reference inputs is counted but not measured: the subspace
was fitted to it, so its residual is smaller than any new input's (in-sample, not out of
sample), and a run of such repeats (a replayed dataset, a client resending the same feedback)
read as a sustained shift. Repeats are recognised by their energy and an index-weighted sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sona.errors import FormatError
from sona.kernels import batch as k_batch
from sona.kernels import linalg as k_linalg
from sona.kernels import update as k_update
from sona.linalg import principal_directions
from sona.row_scan import Projected
from sona.validation import MAX_COUNT

_F32 = np.float32

# Phases of the detector after a (re)start.
REFERENCE = "reference"
CALIBRATING = "calibrating"
WATCHING = "watching"
_PHASES = (REFERENCE, CALIBRATING, WATCHING)


class ShiftDetector:
    """Two-sided CUSUM on the fraction of each input outside the current task's subspace."""

    def __init__(
        self,
        dim: int,
        *,
        reference_samples: int,
        max_directions: int,
        calibration_samples: int = 64,
        energy: float = 0.99,
        drift: float = 1.0,
        threshold: float = 48.0,
        z_cap: float = 8.0,
        min_spread: float = 0.02,
    ) -> None:
        self.dim = dim
        self.reference_samples = max(int(reference_samples), 2 * int(max_directions), 16)
        self.max_directions = max(1, min(int(max_directions), dim))
        self.calibration_samples = calibration_samples
        self.energy = energy
        self.drift = drift
        self.threshold = threshold
        self.z_cap = z_cap
        self.min_spread = min_spread
        k_batch.warm_up()  # compiled now, not during the first consolidation
        k_linalg.warm_up()
        self._reference = np.zeros((self.reference_samples, dim), _F32)
        self._basis = np.zeros((0, dim), _F32)
        self._ref_energy = np.zeros(0)
        self._ref_moment = np.zeros(0)
        self.restart()

    def restart(self, recent: np.ndarray | None = None) -> None:
        """Forget the reference and learn a new one, starting from ``recent`` inputs."""
        self.phase = REFERENCE
        self._filled = 0
        self._basis = np.zeros((0, self.dim), _F32)
        self._fingerprint(0)
        self._cal_n = 0
        self._cal_mean = 0.0
        self._cal_m2 = 0.0
        self.mean = 0.0
        self.spread = 0.0
        self.up = 0.0
        self.down = 0.0
        self._up_start = 0
        self._down_start = 0
        self.seen = 0
        self.shift_age = 0
        if recent is not None:
            for row in recent[-self.reference_samples :]:
                self.update(row)

    def residual_fraction(self, x: np.ndarray) -> float | None:
        """The share of ‖x‖² outside the reference subspace (None for a zero input).

        Both squared norms in float64: in float32 ‖x‖² overflows from ‖x‖ ≈ 1.8e19 and made
        the fraction NaN, or 1 (all outside) in the batch kernel, a false shift."""
        energy = float(k_update.sq_norm(x))
        if energy <= 0.0:
            return None
        proj = (self._basis @ x).astype(np.float64)
        return max(0.0, 1.0 - float(np.dot(proj, proj)) / energy)

    def update(self, x: np.ndarray) -> bool:
        """Feed one input; True when a sustained shift is confirmed.

        After True, :attr:`shift_age` says how many of the latest inputs already belong to the
        new statistics; the caller restarts the detector with them.
        """
        self.seen += 1
        if self.phase == REFERENCE:
            self._reference[self._filled] = x
            self._filled += 1
            if self._filled == self.reference_samples:
                self._learn_basis()
            return False
        e = self.residual_fraction(x)
        if e is None or k_batch.is_reference(
            np.ascontiguousarray(x, dtype=_F32), self._ref_energy, self._ref_moment
        ):
            return False
        return self._step(e)

    def update_many(self, xs: np.ndarray, projected: Projected | None = None) -> int:
        """Feed rows in order; the index of the row that confirmed a shift, else -1.

        Equivalent to calling :meth:`update` on each row and stopping at the first True (the
        rows after it are not consumed), but past the reference phase the whole run of rows
        goes through one GIL-free kernel (projection, residual fraction and CUSUM step per
        row); its float32 sums may differ from :meth:`update`'s in the last bits.

        ``projected`` holds the rows' projections on :meth:`scan_basis` and their
        fingerprints, taken while they were gathered (:func:`sona.kernels.batch.scan_rows`):
        only the CUSUM steps are left to run, with the same result. It is used only if the
        basis is still the one it was taken with.
        """
        if projected is not None and self.takes(projected, xs.shape[0]):
            return self._scan(xs, projected)
        xs = np.ascontiguousarray(xs, dtype=_F32)
        n = xs.shape[0]
        i = 0
        while i < n:
            if self.phase == REFERENCE:
                take = min(n - i, self.reference_samples - self._filled)
                self._reference[self._filled : self._filled + take] = xs[i : i + take]
                self._filled += take
                self.seen += take
                i += take
                if self._filled == self.reference_samples:
                    self._learn_basis()
                continue
            hit = self._scan(xs[i:])
            return i + hit if hit >= 0 else -1
        return -1

    def takes(self, projected: Projected, rows: int) -> bool:
        """Whether :meth:`update_many` of ``rows`` rows takes ``projected`` for them instead
        of reading the rows: it is of as many rows, on the basis in use, past the reference
        phase."""
        return (
            projected.basis is self._basis
            and self.phase != REFERENCE
            and projected.proj.shape[0] == rows
        )

    def scan_basis(self) -> np.ndarray | None:
        """The basis the next rows will be projected on, or None while the reference is still
        being collected (the rows are then copied, not projected)."""
        return None if self.phase == REFERENCE else self._basis

    def _scan(self, rows: np.ndarray, projected: Projected | None = None) -> int:
        """:func:`sona.kernels.batch.residual_cusum` on this detector's state (or
        :func:`~sona.kernels.batch.projected_cusum` on ``projected``)."""
        sf = np.array(
            [self._cal_mean, self._cal_m2, self.mean, self.spread, self.up, self.down], np.float64
        )
        phase = k_batch.CALIBRATING if self.phase == CALIBRATING else k_batch.WATCHING
        si = np.array(
            [phase, self._cal_n, self._up_start, self._down_start, self.seen, self.shift_age],
            np.int64,
        )
        params = np.array(
            [self.calibration_samples, self.drift, self.threshold, self.z_cap, self.min_spread],
            np.float64,
        )
        ref = self._ref_energy, self._ref_moment
        if projected is None:
            hit = int(k_batch.residual_cusum(rows, self._basis, sf, si, params, *ref))
        else:
            p = projected
            hit = int(k_batch.projected_cusum(p.proj, p.energy, p.moment, sf, si, params, *ref))
        self._cal_mean, self._cal_m2, self.mean, self.spread, self.up, self.down = (
            float(v) for v in sf
        )
        self.phase = CALIBRATING if si[k_batch.I_PHASE] == k_batch.CALIBRATING else WATCHING
        self._cal_n, self._up_start, self._down_start, self.seen, self.shift_age = (
            int(v) for v in si[1:]
        )
        return hit

    def _step(self, e: float) -> bool:
        """One residual fraction through calibration or the CUSUM."""
        if self.phase == CALIBRATING:
            self._cal_n += 1
            delta = e - self._cal_mean
            self._cal_mean += delta / self._cal_n
            self._cal_m2 += delta * (e - self._cal_mean)
            if self._cal_n == self.calibration_samples:
                self.mean = self._cal_mean
                std = float(np.sqrt(self._cal_m2 / max(self._cal_n - 1, 1)))
                self.spread = max(std, self.min_spread)
                self.phase = WATCHING
            return False
        z = (e - self.mean) / self.spread
        if self.up == 0.0:
            self._up_start = self.seen
        if self.down == 0.0:
            self._down_start = self.seen
        self.up = max(0.0, self.up + min(z, self.z_cap) - self.drift)
        self.down = max(0.0, self.down + min(-z, self.z_cap) - self.drift)
        if self.up > self.threshold or self.down > self.threshold:
            start = self._up_start if self.up > self.threshold else self._down_start
            self.shift_age = self.seen - start + 1
            return True
        return False

    def _learn_basis(self) -> None:
        """The subspace holding ``energy`` of the reference inputs' directions.

        Each input counts by its direction alone (weight 1/‖x‖²: the rows as unit vectors),
        as the residual fraction it is measured against does: weighted by ‖x‖², a few large
        inputs held all the energy, the subspace missed directions only smaller inputs used,
        those inputs looked like a shift all the time, and a real shift drowned in that
        spread. The weights go into the Gram matrix of the rows as they are, which costs no
        unit-row copy of the reference: ‖x‖² comes from the fingerprint pass, in float64 (it
        overflows float32 from ‖x‖ ≈ 1.8e19).
        """
        rows = self._reference[: self._filled]
        energy, moment = _fingerprints(rows)
        real = energy > 0.0
        if not real.any():
            self._filled = 0  # all-zero inputs: keep waiting for informative ones
            return
        weights = np.zeros_like(energy)
        weights[real] = 1.0 / energy[real]
        ev, vt = principal_directions(rows, top=self.max_directions, weights=weights)
        total = float(ev.sum())
        if total <= 0.0 or not np.isfinite(total):
            self._filled = 0
            return
        m = int(np.searchsorted(np.cumsum(ev) / total, self.energy) + 1)
        m = min(m, self.max_directions)
        self._basis = np.ascontiguousarray(vt[:m], dtype=_F32)
        self._set_fingerprints(energy, moment)
        self.phase = CALIBRATING

    def _fingerprint(self, rows: int) -> None:
        """Note the first ``rows`` reference inputs so that repeats of them are recognised."""
        self._set_fingerprints(*_fingerprints(self._reference[:rows]))

    def _set_fingerprints(self, energy: np.ndarray, moment: np.ndarray) -> None:
        order = np.argsort(energy, kind="stable")
        self._ref_energy = np.ascontiguousarray(energy[order])
        self._ref_moment = np.ascontiguousarray(moment[order])

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "phase": self.phase,
            "filled": self._filled,
            "cal_n": self._cal_n,
            "cal_mean": self._cal_mean,
            "cal_m2": self._cal_m2,
            "mean": self.mean,
            "spread": self.spread,
            "up": self.up,
            "down": self.down,
            "up_start": self._up_start,
            "down_start": self._down_start,
            "seen": self.seen,
        }
        arrays = {
            "boundary.reference": self._reference[: self._filled].copy(),
            "boundary.basis": self._basis.copy(),
        }
        return meta, arrays

    def load(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        try:
            phase = str(meta["phase"])
            filled = int(meta["filled"])
            ref = np.asarray(arrays["boundary.reference"])
            basis = np.asarray(arrays["boundary.basis"])
            numbers = {
                k: float(meta[k]) for k in ("cal_mean", "cal_m2", "mean", "spread", "up", "down")
            }
            counters = {k: int(meta[k]) for k in ("cal_n", "up_start", "down_start", "seen")}
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise FormatError(f"boundary detector state is malformed: {exc}") from None
        if not all(0 <= v <= MAX_COUNT for v in counters.values()):
            raise FormatError(f"boundary detector counters must be in [0, 2**53], got {counters}")
        if phase not in _PHASES or not 0 <= filled <= self.reference_samples:
            raise FormatError(f"boundary detector state has phase {phase!r}, filled {filled}")
        if ref.shape != (filled, self.dim) or basis.ndim != 2 or basis.shape[1] != self.dim:
            raise FormatError("boundary detector arrays do not match the input width")
        if not (np.isfinite(ref).all() and np.isfinite(basis).all()):
            raise FormatError("boundary detector arrays hold NaN or inf")
        if not all(np.isfinite(v) for v in numbers.values()):
            raise FormatError("boundary detector statistics hold NaN or inf")
        self.phase = phase
        self._filled = filled
        self._reference[:filled] = ref
        self._basis = np.ascontiguousarray(basis, dtype=_F32)
        self._fingerprint(filled if phase != REFERENCE else 0)
        self._cal_mean = numbers["cal_mean"]
        self._cal_m2 = numbers["cal_m2"]
        self.mean = numbers["mean"]
        self.spread = numbers["spread"]
        self.up = numbers["up"]
        self.down = numbers["down"]
        self._cal_n = counters["cal_n"]
        self._up_start = counters["up_start"]
        self._down_start = counters["down_start"]
        self.seen = counters["seen"]


def _fingerprints(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ‖x‖² and index-weighted sum (:func:`~sona.kernels.batch.reference_fingerprints`),
    in float64."""
    energy = np.empty(rows.shape[0])
    moment = np.empty(rows.shape[0])
    k_batch.reference_fingerprints(rows, energy, moment)
    return energy, moment
