"""The pattern bank: nearest-centroid assignment, online and Lloyd updates, no zero centroids,
merge/prune bookkeeping and its state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from sona.errors import FormatError, InvalidInputError
from sona.pattern_bank import PatternBank
from sona.row_scan import Labelled

DIM = 24


def _brute_force(xs: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of every row of xs to every centroid, in float64."""
    diff = xs.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def _blobs(
    rng: np.random.Generator, k: int, per: int, spread: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = rng.standard_normal((k, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), per)
    xs = centres[labels] + spread * rng.standard_normal((k * per, DIM))
    return xs.astype(np.float32), labels, centres.astype(np.float32)


def _filled(rng: np.random.Generator, k: int = 6) -> PatternBank:
    bank = PatternBank(k, DIM)
    bank.update(rng.standard_normal((200, DIM)).astype(np.float32))
    assert len(bank) == k
    return bank


# ---------------------------------------------------------------------- assignment
@pytest.mark.parametrize("seed", range(5))
def test_assignment_matches_numpy_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bank = _filled(rng, k=7)
    xs = (rng.standard_normal((300, DIM)) * rng.uniform(0.1, 10.0, (300, 1))).astype(np.float32)
    d = _brute_force(xs, bank.centroids[: len(bank)])
    many = bank.assign_many(xs)
    one = np.array([bank.assign(x) for x in xs])
    np.testing.assert_array_equal(many, one)
    chosen = d[np.arange(len(xs)), many]
    # the chosen centroid is the nearest one (up to float32 rounding of near-ties)
    assert np.all(chosen <= d.min(axis=1) * (1 + 1e-5) + 1e-5)
    # away from near-ties the answer is exactly numpy's argmin
    sorted_d = np.sort(d, axis=1)
    clear = sorted_d[:, 1] - sorted_d[:, 0] > 1e-3 * sorted_d[:, 1]
    assert clear.sum() > 250
    np.testing.assert_array_equal(many[clear], d.argmin(axis=1)[clear])


def test_assign_on_an_empty_bank_is_minus_one() -> None:
    bank = PatternBank(3, DIM)
    x = np.ones(DIM, np.float32)
    assert bank.assign(x) == -1
    np.testing.assert_array_equal(bank.assign_many(np.ones((4, DIM), np.float32)), [-1] * 4)


def test_update_labels_are_the_nearest_cluster_at_each_step() -> None:
    rng = np.random.default_rng(1)
    xs, truth, _ = _blobs(rng, 3, 30)
    order = rng.permutation(len(xs))
    xs, truth = xs[order], truth[order]
    bank = PatternBank(3, DIM)
    full_steps = 0
    for x in xs:
        full = len(bank) == bank.k
        nearest = bank.assign(x)
        label = int(bank.update(x[None, :])[0])
        if full:  # no free slot: the input joins its nearest cluster, which moves toward it
            assert label == nearest
            full_steps += 1
        np.testing.assert_array_equal(bank.assign_many(x[None, :]), [label])
    assert full_steps >= 80


def test_blobs_seeded_by_one_input_each_are_recovered() -> None:
    rng = np.random.default_rng(1)
    xs, truth, _ = _blobs(rng, 3, 30)
    first = [int(np.flatnonzero(truth == b)[0]) for b in range(3)]
    rest = rng.permutation([i for i in range(len(xs)) if i not in first])
    order = np.concatenate([first, rest])
    bank = PatternBank(3, DIM)
    labels = bank.update(xs[order])
    np.testing.assert_array_equal(labels, truth[order])
    np.testing.assert_array_equal(bank.assign_many(xs), truth)


def test_online_centroids_are_the_running_mean_of_their_members() -> None:
    """Step 1/count makes each centroid the exact mean of the inputs it was given."""
    rng = np.random.default_rng(2)
    xs, _, _ = _blobs(rng, 3, 40)
    xs = xs[rng.permutation(len(xs))]
    bank = PatternBank(3, DIM)
    labels = bank.update(xs)
    for j in range(3):
        members = xs[labels == j]
        assert bank.counts[j] == len(members)
        np.testing.assert_allclose(bank.centroids[j], members.mean(axis=0), atol=1e-5)


def test_slots_fill_with_distinct_inputs_only() -> None:
    bank = PatternBank(4, DIM)
    x = np.zeros(DIM, np.float32)
    x[0] = 1.0
    bank.update(np.stack([x, x, x]))
    assert len(bank) == 1 and bank.counts[0] == 3
    y = np.zeros(DIM, np.float32)
    y[1] = 1.0
    bank.update(y[None, :])
    assert len(bank) == 2


# ---------------------------------------------------------------------- no zero centroids
def _assert_no_zero_centroid(bank: PatternBank) -> None:
    norms = np.linalg.norm(bank.centroids[: len(bank)], axis=1)
    assert np.all(norms > 1e-6), norms
    assert np.isfinite(bank.centroids).all()


def test_refine_keeps_the_centroid_of_a_cluster_that_gets_no_input() -> None:
    rng = np.random.default_rng(3)
    xs, truth, _ = _blobs(rng, 4, 25)
    bank = PatternBank(4, DIM)
    bank.update(xs[rng.permutation(len(xs))])
    starved = bank.assign(xs[truth == 3][0])
    before = bank.centroids[starved].copy()
    bank.refine(xs[truth != 3], iterations=5)  # blob 3 is absent from this refinement
    _assert_no_zero_centroid(bank)
    np.testing.assert_array_equal(bank.centroids[starved], before)
    # the clusters that did get inputs sit at their members' means (a Lloyd fixed point)
    data = xs[truth != 3]
    labels = bank.assign_many(data)
    for j in set(labels.tolist()):
        np.testing.assert_allclose(bank.centroids[j], data[labels == j].mean(axis=0), atol=1e-5)


def test_refine_with_inputs_in_a_single_cluster_zeroes_nothing() -> None:
    rng = np.random.default_rng(4)
    bank = _filled(rng, k=5)
    one = bank.centroids[2] + 0.01 * rng.standard_normal((10, DIM)).astype(np.float32)
    bank.refine(one)
    _assert_no_zero_centroid(bank)


def test_refine_keeps_a_centroid_whose_members_cancel_out() -> None:
    """Inputs x and -x both nearest to the centroid of smallest norm have the mean zero: Lloyd
    set that centroid to zero, which then attracted nearly every input (its distance to any x
    is ‖x‖², the least of all for inputs the other centroids do not point at)."""
    bank = PatternBank(2, DIM)
    eye = np.eye(DIM, dtype=np.float32)
    bank.update(np.stack([eye[0], 10.0 * eye[1]]))
    before = bank.centroids[0].copy()
    bank.refine(np.stack([eye[2], -eye[2]]))
    _assert_no_zero_centroid(bank)
    np.testing.assert_array_equal(bank.centroids[0], before)
    assert bank.assign(10.0 * eye[1]) == 1 and bank.assign(eye[0]) == 0


@pytest.mark.parametrize("scanned", [False, True])
def test_update_takes_no_centroid_onto_zero_when_its_members_cancel_it(scanned: bool) -> None:
    """A centroid x seeded by one input, then -x as its only member: the running mean is zero,
    and a zero centroid would take nearly every later input. The move is not taken; the
    member is still counted, and the other clusters move as before. ``scanned``: the labels
    and sums come from the row scan (``labelled``), as in the Background loop."""
    eye = np.eye(DIM, dtype=np.float32)
    bank = PatternBank(2, DIM)
    bank.update(np.stack([eye[0], 5.0 * eye[1]]))
    before = bank.centroids.copy()
    batch = np.stack([-eye[0], 6.0 * eye[1]])
    if scanned:
        labels = np.empty(2, np.intp)
        sums, members = bank._nearest(batch, labels, accumulate=True, skip_zero=True)
        got = bank.update(batch, Labelled(bank.centroids, labels, sums, members))
    else:
        got = bank.update(batch)
    assert got.tolist() == [0, 1]
    _assert_no_zero_centroid(bank)
    np.testing.assert_array_equal(bank.centroids[0], before[0])
    assert bank.centroids[1][1] == 5.5  # the other cluster moved to its running mean
    assert bank.counts[:2].tolist() == [2, 2]


def test_merge_and_prune_never_leaves_a_zero_centroid_and_maps_every_slot() -> None:
    rng = np.random.default_rng(5)
    bank = PatternBank(8, DIM)
    xs, truth, centres = _blobs(rng, 3, 200, spread=0.01)
    bank.update(xs[rng.permutation(len(xs))])
    # near-duplicates of blob 0 and a cluster that almost nobody uses
    bank.centroids[3] = centres[0] * 1.001
    bank.counts[3] = 5
    bank.centroids[4] = rng.standard_normal(DIM).astype(np.float32)
    bank.counts[4] = 0
    n = len(bank)
    total_before = int(bank.counts[:n].sum())
    mapping = bank.merge_and_prune()
    assert len(mapping) == n
    _assert_no_zero_centroid(bank)
    assert mapping[4] == -1  # pruned: it held no inputs
    kept = [j for j in mapping if j >= 0]
    assert sorted(set(kept)) == list(range(len(bank)))
    assert mapping[3] == bank.assign(centres[0])  # merged into blob 0's cluster
    assert len(bank) == 3  # one cluster per blob is left: the rest were near-duplicates
    assert int(bank.counts[: len(bank)].sum()) == total_before  # the pruned slot held nothing
    # every blob is still recognised after the merge
    labels = bank.assign_many(xs)
    for b in range(3):
        assert len(set(labels[truth == b].tolist())) == 1


def test_merge_and_prune_keeps_a_cluster_when_no_cluster_holds_any_input() -> None:
    bank = PatternBank(3, DIM)
    rng = np.random.default_rng(6)
    bank.update(rng.standard_normal((3, DIM)).astype(np.float32))
    bank.counts[:3] = 0  # no share anywhere
    mapping = bank.merge_and_prune(min_share=0.5)
    assert len(bank) >= 1
    assert any(j >= 0 for j in mapping)
    _assert_no_zero_centroid(bank)


def _bank_of(centroids: np.ndarray, counts: list[int]) -> PatternBank:
    bank = PatternBank(len(counts), DIM)
    bank.update(centroids)
    assert len(bank) == len(counts)
    bank.counts[: len(counts)] = counts
    return bank


def test_merge_and_prune_keeps_the_group_holding_most_inputs_when_all_are_below_the_share() -> None:
    rng = np.random.default_rng(16)
    centroids = rng.standard_normal((3, DIM)).astype(np.float32)
    bank = _bank_of(centroids, [1, 5, 2])  # shares 1/8, 5/8, 2/8: none reaches 0.9
    mapping = bank.merge_and_prune(min_share=0.9)
    assert mapping == [-1, 0, -1]
    assert len(bank) == 1 and int(bank.counts[0]) == 5
    np.testing.assert_array_equal(bank.centroids[0], centroids[1])


def test_a_clusters_share_is_of_all_inputs_the_bank_has_seen() -> None:
    rng = np.random.default_rng(17)
    centroids = rng.standard_normal((3, DIM)).astype(np.float32)
    bank = _bank_of(centroids, [100, 100, 1])  # 1/201 < 0.006 <= 1/100
    assert bank.merge_and_prune(min_share=0.006) == [0, 1, -1]
    assert len(bank) == 2


def test_merged_near_duplicates_move_to_the_mean_of_their_inputs() -> None:
    """A merged centroid is the count-weighted mean of the centroids it replaces: the mean of
    every input they held, not a midpoint that a barely used duplicate drags as far as a
    large cluster."""
    rng = np.random.default_rng(18)
    base = rng.standard_normal(DIM)
    other = rng.standard_normal(DIM)
    centroids = np.stack([base, base + 0.05 * other, -base]).astype(np.float32)
    bank = _bank_of(centroids, [90, 10, 50])
    mapping = bank.merge_and_prune()
    assert mapping == [0, 0, 1]
    want = (90 * centroids[0].astype(np.float64) + 10 * centroids[1]) / 100
    np.testing.assert_allclose(bank.centroids[0], want, rtol=1e-5, atol=1e-6)
    assert bank.counts[:2].tolist() == [100, 50]


def test_freed_slots_are_reseeded_from_real_inputs() -> None:
    rng = np.random.default_rng(7)
    bank = PatternBank(4, DIM)
    bank.update(rng.standard_normal((4, DIM)).astype(np.float32))
    bank.counts[:4] = [100, 100, 0, 0]
    bank.merge_and_prune()
    assert len(bank) == 2
    fresh = rng.standard_normal((2, DIM)).astype(np.float32) * 5.0  # far from both
    bank.update(fresh)
    assert len(bank) == 4
    _assert_no_zero_centroid(bank)


def test_a_zero_input_never_becomes_a_centroid() -> None:
    """Empty text embeds to the zero vector. It has no direction to cluster on, and a zero
    centroid would capture every input less than 60° from all the others."""
    rng = np.random.default_rng(8)
    bank = PatternBank(4, DIM)
    zero = np.zeros((1, DIM), np.float32)
    bank.update(zero)
    assert len(bank) == 0
    xs = rng.standard_normal((2, DIM)).astype(np.float32)
    bank.update(xs)
    bank.update(zero)
    bank.update(np.concatenate([zero, zero]))
    assert len(bank) == 2
    _assert_no_zero_centroid(bank)


def test_refine_takes_no_centroid_toward_zero_inputs() -> None:
    """Zero inputs reach the Deep loop's refinement with the kept samples. A cluster whose
    only members are zero inputs must keep its centroid rather than become the zero vector,
    and zero members must not drag a cluster's mean toward the origin."""
    rng = np.random.default_rng(10)
    bank = PatternBank(2, DIM)
    near = np.full(DIM, 0.01, np.float32)  # the centroid closest to the origin
    far = rng.standard_normal(DIM).astype(np.float32) * 10.0
    bank.update(np.stack([near, far]))
    members = far + 0.1 * rng.standard_normal((5, DIM)).astype(np.float32)
    zeros = np.zeros((7, DIM), np.float32)
    bank.refine(np.concatenate([zeros, members, zeros]))
    _assert_no_zero_centroid(bank)
    np.testing.assert_array_equal(bank.centroids[0], near)
    np.testing.assert_allclose(bank.centroids[1], members.mean(axis=0), rtol=1e-5, atol=1e-5)
    bank.refine(zeros)  # nothing but zero inputs: nothing moves
    _assert_no_zero_centroid(bank)


# ---------------------------------------------------------------------- state
def test_state_round_trip_reproduces_the_bank() -> None:
    rng = np.random.default_rng(9)
    bank = _filled(rng, k=5)
    meta, arrays = bank.state()
    twin = PatternBank(5, DIM)
    twin.load(meta, arrays)
    assert len(twin) == len(bank)
    np.testing.assert_array_equal(twin.centroids, bank.centroids)
    np.testing.assert_array_equal(twin.counts, bank.counts)
    xs = rng.standard_normal((50, DIM)).astype(np.float32)
    np.testing.assert_array_equal(twin.assign_many(xs), bank.assign_many(xs))
    # independent copies: updating one leaves the other and the exported state alone
    twin.update(xs)
    np.testing.assert_array_equal(arrays["centroids"], bank.centroids)
    assert not np.array_equal(twin.centroids, bank.centroids)


def test_state_round_trip_of_a_partly_filled_bank() -> None:
    bank = PatternBank(6, DIM)
    bank.update(np.eye(DIM, dtype=np.float32)[:2])
    twin = PatternBank(6, DIM)
    twin.load(*bank.state())
    assert len(twin) == 2
    twin.update(np.eye(DIM, dtype=np.float32)[2:3])
    assert len(twin) == 3


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m, a: ({**m, "k": 7}, a),
        lambda m, a: ({**m, "size": 9}, a),
        lambda m, a: ({k: v for k, v in m.items() if k != "size"}, a),
        lambda m, a: (m, {**a, "centroids": a["centroids"][:-1]}),
        lambda m, a: (m, {**a, "centroids": np.full_like(a["centroids"], np.nan)}),
        lambda m, a: (m, {"counts": a["counts"]}),
    ],
)
def test_load_refuses_a_state_of_another_shape_or_with_nan(corrupt: object) -> None:
    rng = np.random.default_rng(10)
    bank = _filled(rng, k=5)
    twin = PatternBank(5, DIM)
    meta, arrays = corrupt(*bank.state())  # type: ignore[operator]
    before = twin.state()
    with pytest.raises(FormatError):
        twin.load(meta, arrays)
    assert twin.state()[0] == before[0] and len(twin) == 0


def test_constructor_refuses_non_positive_sizes() -> None:
    with pytest.raises(InvalidInputError):
        PatternBank(0, DIM)
    with pytest.raises(InvalidInputError):
        PatternBank(3, 0)


def test_a_clone_is_independent_and_a_spare_is_reused() -> None:
    rng = np.random.default_rng(3)
    bank = PatternBank(4, 8)
    bank.update(rng.standard_normal((20, 8)).astype(np.float32))
    meta, arrays = bank.state()
    twin = bank.clone()
    assert len(twin) == len(bank) and twin.state()[0] == meta
    twin.update(rng.standard_normal((20, 8)).astype(np.float32))
    assert not np.array_equal(twin.centroids, arrays["centroids"])
    after_meta, after = bank.state()  # the original did not move
    assert after_meta == meta
    assert all(np.array_equal(after[k], arrays[k]) for k in arrays)
    spare = twin
    again = bank.clone(into=spare)
    assert again is spare and again.state()[0] == meta
    assert all(np.array_equal(again.state()[1][k], arrays[k]) for k in arrays)
    other = PatternBank(4, 9)
    assert bank.clone(into=other) is not other  # another shape: a new bank
