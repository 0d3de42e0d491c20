"""Task-boundary detection: fires soon after every switch, never on a stationary stream."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sona.bench.tasks import SubspaceSequence
from sona.boundary import WATCHING, ShiftDetector
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.training import TrainingConfig, TrainingPipeline

Q = TargetModule.Q_PROJ
SEEDS = (0, 1, 2)


def _lora(d: int, seed: int) -> MicroLoRA:
    cfg = MicroLoraConfig(in_features=d, out_features=d, rank=2, target_modules=(Q,))
    return MicroLoRA(cfg, seed=seed)


def _target(y: np.ndarray) -> AdaptFeedback:
    return AdaptFeedback.from_quality(1.0).with_target(y)


@pytest.mark.parametrize("seed", SEEDS)
def test_fires_within_200_samples_of_every_switch_on_the_default_sequence(seed: int) -> None:
    seq = SubspaceSequence.make(seed=seed, held_out=16)  # d=96, 4 tasks, 6-dim subspaces
    lora = _lora(seq.dim, seed)
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=10.0))
    assert pipe.config.boundary_detection  # on by default
    rng = np.random.default_rng(seed + 10)
    per_task = 700
    fired = []
    for task in range(seq.n_tasks):
        x = seq.inputs(task, per_task, rng)
        y = seq.target_delta(task, x)
        for i in range(per_task):
            res = pipe.train_step(lora, x[i], _target(y[i]))
            if res.task_boundary:
                fired.append(task * per_task + i)
                assert any("task boundary" in n for n in res.notes)
    switches = [t * per_task for t in range(1, seq.n_tasks)]
    assert len(fired) == len(switches), fired
    for at, switch in zip(fired, switches, strict=True):
        assert switch <= at < switch + 200
    assert pipe.task_count == len(switches)
    # the recorded change points exclude the new task's first inputs from the old importance
    for change, switch in zip(pipe.boundary_samples, switches, strict=True):
        assert abs(change - switch) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_never_fires_on_10000_samples_of_a_stationary_task_while_training(seed: int) -> None:
    seq = SubspaceSequence.make(seed=seed, held_out=16)
    lora = _lora(seq.dim, seed)
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=10.0))
    rng = np.random.default_rng(seed + 20)
    x = seq.inputs(seed % seq.n_tasks, 10_000, rng)
    y = seq.target_delta(seed % seq.n_tasks, x)
    fired = [i for i in range(10_000) if pipe.train_step(lora, x[i], _target(y[i])).task_boundary]
    assert fired == []
    assert pipe.task_count == 0


def _stationary_streams(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = SubspaceSequence.make(seed=seed, held_out=16)
    iso = rng.standard_normal((10_000, 96))
    iso /= np.linalg.norm(iso, axis=1, keepdims=True)
    task = rng.integers(0, seq.n_tasks, 10_000)
    mixture = np.concatenate([seq.inputs(t, 1, rng) for t in task])
    scales = rng.lognormal(0.0, 1.0, (10_000, 1))  # heavy-tailed norms, same directions
    anisotropic = rng.standard_normal((10_000, 96)) * np.linspace(3.0, 0.1, 96) * scales
    return {
        "isotropic": iso.astype(np.float32),
        "task mixture": mixture,
        "anisotropic, lognormal norms": anisotropic.astype(np.float32),
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_detector_stays_quiet_on_other_stationary_streams(seed: int) -> None:
    for name, stream in _stationary_streams(seed).items():
        det = ShiftDetector(96, reference_samples=100, max_directions=16)
        fired = [i for i, x in enumerate(stream) if det.update(x)]
        assert fired == [], name
        assert det.phase == WATCHING


def test_a_short_burst_of_odd_inputs_does_not_fire_but_a_sustained_shift_does() -> None:
    seq = SubspaceSequence.make(seed=4, held_out=16)
    rng = np.random.default_rng(4)
    det = ShiftDetector(96, reference_samples=100, max_directions=16)
    for x in seq.inputs(0, 400, rng):
        assert not det.update(x)
    for x in seq.inputs(1, 4, rng):  # four outliers from another task
        assert not det.update(x)
    for x in seq.inputs(0, 400, rng):
        assert not det.update(x)
    fired = next(i for i, x in enumerate(seq.inputs(1, 50, rng)) if det.update(x))
    assert fired < 20
    assert det.shift_age == fired + 1  # every input since the shift began


def _subspace_stream(rng: np.random.Generator, basis: np.ndarray, n: int) -> np.ndarray:
    """Unit directions from the row space of ``basis`` with norms spanning ~20 decades."""
    x = rng.standard_normal((n, basis.shape[0])) @ basis
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x * rng.lognormal(0.0, 8.0, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_shift_is_seen_whatever_the_spread_of_input_norms(seed: int) -> None:
    """The residual fraction ignores the input scale, so the subspace it is measured against
    must too: learned from raw inputs, the few largest reference inputs held all the energy,
    the subspace missed the directions only smaller inputs used, and a move to an orthogonal
    subspace went unseen."""
    rng = np.random.default_rng(seed)
    d, s = 96, 4
    q, _ = np.linalg.qr(rng.standard_normal((d, 2 * s)))
    old, new = q.T[:s], q.T[s:]
    det = ShiftDetector(d, reference_samples=100, max_directions=16)
    assert det.update_many(_subspace_stream(rng, old, 3000)) == -1
    assert det.phase == WATCHING
    assert 0 <= det.update_many(_subspace_stream(rng, new, 500)) < 20


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.sampled_from([24, 96]),
    zeros=st.integers(0, 6),
    spread=st.floats(0.0, 20.0),
)
def test_the_reference_basis_spans_the_top_directions_of_the_unit_inputs(
    seed: int, width: int, zeros: int, spread: float
) -> None:
    """The basis is the principal subspace of the reference inputs as unit vectors (plain numpy
    SVD in float64), whatever their norms (up to ~1e20, where ‖x‖² leaves float32) and with
    zero inputs counting for nothing. 40 inputs: wider than the width 24 (SVD), narrower than
    96 (Gram matrix)."""
    rng = np.random.default_rng(seed)
    n, rank = 40, 4
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, width))
    x += 1e-3 * rng.standard_normal((n, width))
    x *= 10.0 ** rng.uniform(-spread, spread, (n, 1))
    x[rng.choice(n, zeros, replace=False)] = 0.0
    x = x.astype(np.float32)
    det = ShiftDetector(width, reference_samples=n, max_directions=8)
    assert det.update_many(x) == -1
    basis = det.scan_basis()
    assert basis is not None
    ref = x.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1)
    unit = ref[norms > 0] / norms[norms > 0, None]
    _, sv, vt = np.linalg.svd(unit, full_matrices=False)
    share = np.cumsum(sv**2) / np.sum(sv**2)
    assume(np.abs(share - det.energy).min() > 1e-6)  # no count decided by rounding
    m = min(int(np.searchsorted(share, det.energy) + 1), det.max_directions)
    assert basis.shape == (m, width)
    cosines = np.linalg.svd(vt[:m] @ basis.astype(np.float64).T, compute_uv=False)
    assert cosines.min() > 1.0 - 1e-5


@pytest.mark.parametrize("batched", [False, True])
def test_a_shift_into_a_narrower_subspace_is_seen_too(batched: bool) -> None:
    """The CUSUM is two-sided: inputs that suddenly lie almost wholly inside the reference
    subspace (traffic narrowing to a few of the old directions) are a shift as much as inputs
    leaving it."""
    rng = np.random.default_rng(9)
    d, wide = 48, 16
    q, _ = np.linalg.qr(rng.standard_normal((d, wide)))
    det = ShiftDetector(d, reference_samples=100, max_directions=8)  # keeps 8 of the 16
    old = (rng.standard_normal((600, wide)) @ q.T).astype(np.float32)
    assert det.update_many(old) == -1
    assert det.phase == WATCHING
    basis = det.scan_basis()
    assert basis is not None
    narrow = (rng.standard_normal((200, basis.shape[0])) @ basis).astype(np.float32)
    if batched:
        fired = det.update_many(narrow)
    else:
        fired = next((i for i, x in enumerate(narrow) if det.update(x)), -1)
    assert 0 <= fired < 60


def test_a_restart_learns_its_reference_from_the_recent_inputs_it_is_given() -> None:
    """After a boundary the detector restarts from the inputs that already belong to the new
    task, so it is ready to watch for the next shift that many inputs sooner."""
    seq = SubspaceSequence.make(seed=7, held_out=16)
    xs = seq.inputs(0, 150, np.random.default_rng(7))
    restarted = ShiftDetector(96, reference_samples=100, max_directions=16)
    restarted.restart(xs)
    fed = ShiftDetector(96, reference_samples=100, max_directions=16)
    for x in xs[-100:]:
        fed.update(x)
    assert restarted.scan_basis() is not None
    (meta_r, arrays_r), (meta_f, arrays_f) = restarted.state(), fed.state()
    assert meta_r == meta_f
    for name, arr in arrays_f.items():
        np.testing.assert_array_equal(arrays_r[name], arr)


def test_detection_off_never_starts_a_task() -> None:
    seq = SubspaceSequence.make(seed=5, held_out=16)
    lora = _lora(seq.dim, 5)
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, boundary_detection=False))
    rng = np.random.default_rng(5)
    for task in range(2):
        x = seq.inputs(task, 300, rng)
        y = seq.target_delta(task, x)
        assert not any(pipe.train_step(lora, x[i], _target(y[i])).task_boundary for i in range(300))
    assert pipe.task_count == 0


def test_detector_state_round_trip_continues_identically() -> None:
    seq = SubspaceSequence.make(seed=6, held_out=16)
    rng = np.random.default_rng(6)
    det = ShiftDetector(96, reference_samples=100, max_directions=16)
    for x in seq.inputs(0, 180, rng):
        det.update(x)
    meta, arrays = det.state()
    twin = ShiftDetector(96, reference_samples=100, max_directions=16)
    twin.load(meta, arrays)
    tail = np.concatenate([seq.inputs(0, 100, rng), seq.inputs(2, 30, rng)])
    assert [det.update(x) for x in tail] == [twin.update(x) for x in tail]
    assert det.shift_age == twin.shift_age > 0


def _replayed_streams(seed: int) -> dict[str, np.ndarray]:
    """Streams that present the detector's reference inputs again: a dataset replayed in a
    loop (isotropic inputs, where the fitted subspace explains its own inputs most unlike any
    new one), and a burst of one early input of a task resent many times in a row."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((1000, 96))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    seq = SubspaceSequence.make(seed=seed, held_out=16)
    x = seq.inputs(seed % seq.n_tasks, 900, rng)
    burst = np.concatenate([x[:600], np.repeat(x[5:6], 80, axis=0), x[600:]])
    return {"replayed pool": np.concatenate([pool] * 3).astype(np.float32), "resent": burst}


@pytest.mark.parametrize("seed", SEEDS)
def test_repeats_of_the_reference_inputs_do_not_fire(seed: int) -> None:
    """The subspace was fitted to the reference inputs, so their residual is smaller than a
    new input's: measured again, a run of them read as a sustained shift (the replayed pool
    fired ~10 inputs into its second pass, the resent input after ~45 copies). They are
    counted, not measured, on both paths."""
    for name, stream in _replayed_streams(seed).items():
        one = ShiftDetector(96, reference_samples=100, max_directions=16)
        fired = [i for i, x in enumerate(stream) if one.update(x)]
        assert fired == [], name
        batch = ShiftDetector(96, reference_samples=100, max_directions=16)
        assert batch.update_many(stream) == -1, name
        assert one.seen == batch.seen == len(stream)
        assert one.phase == batch.phase == WATCHING


def test_a_restored_detector_still_knows_its_reference_inputs() -> None:
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((400, 96)).astype(np.float32)
    det = ShiftDetector(96, reference_samples=100, max_directions=16)
    assert det.update_many(pool) == -1
    meta, arrays = det.state()
    twin = ShiftDetector(96, reference_samples=100, max_directions=16)
    twin.load(meta, arrays)
    assert twin.update_many(np.concatenate([pool[:100]] * 2)) == -1


def test_a_shift_after_a_replay_is_still_seen() -> None:
    seq = SubspaceSequence.make(seed=8, held_out=16)
    rng = np.random.default_rng(8)
    x = seq.inputs(0, 400, rng)
    det = ShiftDetector(96, reference_samples=100, max_directions=16)
    assert det.update_many(np.concatenate([x, x[:100], x])) == -1
    assert 0 <= det.update_many(seq.inputs(1, 50, rng)) < 20
