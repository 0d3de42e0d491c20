"""The Background loop's batch kernels against plain numpy references: the shift detector's
CUSUM pass, the pattern bank's assignment and moves, and the held-back objective."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sona.kernels import batch as k_batch

from sona.bench.tasks import SubspaceSequence
from sona.boundary import ShiftDetector
from sona.feedback import AdaptFeedback, FeedbackKind
from sona.objective import LossTerms, mean_loss
from sona.pattern_bank import PatternBank
from sona.sample import TrainingSample

F32 = np.float32


# ---------------------------------------------------------------------- shift detector
def _stream(seed: int, before: int, after: int, zeros: int) -> np.ndarray:
    seq = SubspaceSequence.make(seed=seed % 50, held_out=16)
    rng = np.random.default_rng(seed)
    xs = np.concatenate([seq.inputs(0, before, rng), seq.inputs(1, after, rng)]).astype(F32)
    for i in rng.choice(len(xs), size=zeros, replace=False):
        xs[i] = 0.0
    return xs


def _state(det: ShiftDetector) -> dict[str, float]:
    return {
        k: float(getattr(det, k))
        for k in ("seen", "shift_age", "_cal_n", "_up_start", "_down_start")
    } | {"phase": float(["reference", "calibrating", "watching"].index(det.phase))}


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    before=st.integers(0, 400),
    after=st.integers(0, 300),
    zeros=st.integers(0, 5),
    chunk=st.integers(1, 500),
)
def test_update_many_fires_where_update_does_with_the_same_state(
    seed: int, before: int, after: int, zeros: int, chunk: int
) -> None:
    xs = _stream(seed, before, after, min(zeros, before + after))
    one = ShiftDetector(xs.shape[1], reference_samples=100, max_directions=16)
    many = copy.deepcopy(one)
    fired_one = next((i for i, x in enumerate(xs) if one.update(x)), -1)
    fired_many = -1
    for start in range(0, len(xs), chunk):
        hit = many.update_many(xs[start : start + chunk])
        if hit >= 0:
            fired_many = start + hit
            break
    assert fired_many == fired_one
    assert _state(many) == _state(one)
    for name in ("mean", "spread", "up", "down", "_cal_mean", "_cal_m2"):
        assert getattr(many, name) == pytest.approx(getattr(one, name), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------- pattern bank
class _ReferenceBank(PatternBank):
    """The former numpy implementation of assignment, update and refine."""

    def _move(self, j: int, members: np.ndarray) -> None:
        m = members.shape[0]
        self.counts[j] += m
        step = max(m / float(self.counts[j]), 1.0 - (1.0 - 0.01) ** m)
        mean = members.mean(axis=0)
        self.centroids[j] += np.float32(step) * (mean - self.centroids[j])

    def assign_many(self, xs: np.ndarray) -> np.ndarray:
        if self.size == 0:
            return np.full(xs.shape[0], -1, np.intp)
        c = self.centroids[: self.size]
        d = np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (xs @ c.T)
        return np.asarray(np.argmin(d, axis=1), dtype=np.intp)

    def update(self, xs: np.ndarray) -> np.ndarray:
        xs = np.asarray(xs, dtype=np.float32).reshape(-1, self.dim)
        labels = np.empty(xs.shape[0], np.intp)
        real = np.asarray(xs.any(axis=1), dtype=bool)
        i = 0
        while self.size < self.k and i < xs.shape[0]:
            x = xs[i]
            j = self.assign(x)
            if not real[i]:
                labels[i] = j
                i += 1
                continue
            if j < 0 or not np.allclose(self.centroids[j], x, atol=1e-6):
                j = self.size
                self.centroids[j] = x
                self.size += 1
            else:
                self._move(j, x[None, :])
                labels[i] = j
                i += 1
                continue
            self.counts[j] = 1
            labels[i] = j
            i += 1
        rest = xs[i:]
        if rest.shape[0]:
            lab = self.assign_many(rest)
            labels[i:] = lab
            moving = real[i:]
            for j in np.unique(lab[moving]):
                self._move(int(j), rest[(lab == j) & moving])
        return labels

    def refine(self, xs: np.ndarray, iterations: int = 3) -> None:
        xs = np.asarray(xs, dtype=np.float32).reshape(-1, self.dim)
        real = xs.any(axis=1)  # zero inputs have no direction: they move no mean
        for _ in range(iterations):
            labels = self.assign_many(xs)
            for j in range(self.size):
                members = xs[(labels == j) & real]
                if members.shape[0] and members.mean(axis=0).any():  # a zero mean: kept
                    self.centroids[j] = members.mean(axis=0)


def _blobs(seed: int, n: int, dim: int, zeros: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((6, dim))
    xs = centres[rng.integers(0, 6, n)] + rng.standard_normal((n, dim))
    if n > 2:  # repeated inputs: while slots are free they move a centroid instead of taking one
        xs[rng.integers(1, n, n // 3)] = xs[0] + 1e-7 * rng.standard_normal(dim)
    xs[rng.choice(n, size=min(zeros, n), replace=False)] = 0.0
    return xs.astype(F32)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 9),
    sizes=st.lists(st.integers(0, 120), min_size=1, max_size=4),
    zeros=st.integers(0, 4),
    dim=st.sampled_from([3, 17, 64]),
)
def test_bank_update_and_refine_match_the_numpy_reference(
    seed: int, k: int, sizes: list[int], zeros: int, dim: int
) -> None:
    bank = PatternBank(k, dim)
    ref = _ReferenceBank(k, dim)
    for b, n in enumerate(sizes):
        xs = _blobs(seed + b, n, dim, zeros)
        labels = bank.update(xs)
        want = ref.update(xs)
        np.testing.assert_array_equal(labels, want)
        np.testing.assert_array_equal(bank.counts, ref.counts)
        assert bank.size == ref.size
        np.testing.assert_allclose(bank.centroids, ref.centroids, rtol=1e-5, atol=1e-5)
        bank.centroids[:] = ref.centroids  # keep the two on exactly the same path
    xs = _blobs(seed + 99, 200, dim, zeros)
    np.testing.assert_array_equal(bank.assign_many(xs), ref.assign_many(xs))
    bank.refine(xs)
    ref.refine(xs)
    np.testing.assert_allclose(bank.centroids, ref.centroids, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 70), k=st.integers(1, 11))
def test_nearest_labels_sums_and_members(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    dim = 37
    xs = rng.standard_normal((n, dim)).astype(F32)
    if n:
        xs[rng.integers(0, n)] = 0.0
    c = rng.standard_normal((k, dim)).astype(F32)
    labels = np.empty(n, np.intp)
    sums = np.full((k, dim), 7.0, F32)
    members = np.full(k, 3, np.int64)
    k_batch.nearest(xs, c, labels, sums, members, True, True)
    d = np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (xs @ c.T)
    np.testing.assert_array_equal(labels, np.argmin(d, axis=1) if n else labels)
    real = xs.any(axis=1)
    for j in range(k):
        np.testing.assert_allclose(sums[j], xs[labels == j].sum(axis=0), rtol=1e-5, atol=1e-5)
        assert members[j] == int(np.sum((labels == j) & real))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 70), k=st.integers(1, 6))
def test_nearest_breaks_ties_toward_the_first_centroid(seed: int, n: int, k: int) -> None:
    """Duplicated centroids are exactly as near as their originals: the first one wins, as
    numpy's argmin picks it, and the copies get no members. Small integers keep every
    distance exact whatever the order of the sums, so the ties are real ties."""
    rng = np.random.default_rng(seed)
    dim = 19
    xs = rng.integers(-3, 4, (n, dim)).astype(F32)
    c = rng.integers(-3, 4, (k, dim)).astype(F32)
    c = np.concatenate([c, c[::-1]])  # centroid j is repeated at 2k - 1 - j
    labels = np.empty(n, np.intp)
    sums = np.zeros((2 * k, dim), F32)
    members = np.zeros(2 * k, np.int64)
    k_batch.nearest(xs, c, labels, sums, members, True, True)
    d = np.einsum("ij,ij->i", c, c)[None, :] - 2.0 * (xs @ c.T)
    np.testing.assert_array_equal(labels, np.argmin(d, axis=1))
    assert (labels < k).all()
    assert not members[k:].any()


def test_move_toward_means_is_the_sequential_mini_batch_step() -> None:
    rng = np.random.default_rng(4)
    ref = _ReferenceBank(4, 10)
    ref.update(rng.standard_normal((4, 10)).astype(F32))
    bank = copy.deepcopy(ref)
    members = [rng.standard_normal((m, 10)).astype(F32) for m in (3, 0, 1, 250)]
    for j, rows in enumerate(members):
        if rows.shape[0]:
            ref._move(j, rows)
    sums = np.stack([rows.sum(axis=0) for rows in members]).astype(F32)
    counts = np.array([rows.shape[0] for rows in members], np.int64)
    k_batch.move_toward_means(bank.centroids, bank.counts, sums, counts, 0.01)
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.centroids, ref.centroids, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- objective
def _mean_loss_reference(samples: list[TrainingSample], predict: object) -> float | None:
    """The former per-sample loop."""
    rows = [s for s in samples if s.to_feedback().kind is not FeedbackKind.GRADIENT]
    rows = [s for s in rows if s.to_feedback().kind is not FeedbackKind.QUALITY]
    if not rows:
        return None
    x = np.stack([s.input_embedding for s in rows])
    pred = predict(x).astype(np.float64)  # type: ignore[operator]
    total = 0.0
    for i, s in enumerate(rows):
        fb = s.to_feedback()
        assert fb.vector is not None
        err = pred[i] - fb.vector
        weight = 1.0 if fb.kind is FeedbackKind.GROUP else fb.quality
        total += 0.5 * weight * float(err @ err)
    return total / len(rows)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 12), f64=st.booleans())
def test_mean_loss_matches_the_per_sample_reference(seed: int, n: int, f64: bool) -> None:
    rng = np.random.default_rng(seed)
    d_in, d_out = 9, 7
    w = rng.standard_normal((d_out, d_in))
    samples = []
    for i in range(n):
        x = rng.standard_normal(d_in)
        s = TrainingSample(x, rng.standard_normal(d_out), float(rng.uniform()))
        kind = i % 5
        if kind == 1:
            s = s.with_feedback(AdaptFeedback.from_quality(s.quality).with_target(x[:d_out]))
        elif kind == 2:
            s = s.with_feedback(AdaptFeedback.from_quality(0.5).with_gradient(np.ones(d_out)))
        elif kind == 3:
            outs = rng.standard_normal((3, d_out))
            s = s.with_feedback(AdaptFeedback.from_group(outs, rng.uniform(size=3)))
        elif kind == 4:
            s = s.with_feedback(AdaptFeedback.from_quality(0.9))
        samples.append(s)

    def predict(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float64) @ w.T
        return out if f64 else out.astype(F32)

    got = mean_loss(samples, predict)
    want = _mean_loss_reference(samples, predict)
    if want is None:
        assert got is None and LossTerms.of(samples) is None
    else:
        assert got == pytest.approx(want, rel=1e-9)


def test_weighted_sq_error_in_float64() -> None:
    rng = np.random.default_rng(0)
    p = rng.standard_normal((5, 300)).astype(F32)
    t = (p + 1e-4 * rng.standard_normal((5, 300))).astype(F32)
    w = rng.uniform(size=5)
    want = float((w * ((p.astype(np.float64) - t) ** 2).sum(axis=1)).sum())
    assert k_batch.weighted_sq_error(p, t, w) == pytest.approx(want, rel=1e-12)
