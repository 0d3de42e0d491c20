"""MicroLoRA construction and inference: forward, forward_add, delta_weight, exploration."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import (
    K,
    Q,
    Snapshot,
    V,
    assert_f32_close,
    config,
    ref_forward,
    ref_magnitude,
    trained,
    vec,
)

from sona.errors import InvalidInputError, UnknownModuleError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule


def test_a_new_adapter_is_a_zero_delta_with_pefts_init() -> None:
    cfg = config(n_in=2048, n_out=16, rank=8)
    lora = MicroLoRA(cfg, seed=3)
    x = vec(np.random.default_rng(0), 2048)
    for m in (Q, V):
        a, bt = lora.factors(m)
        assert a.shape == (8, 2048) and bt.shape == (8, 16)
        assert a.dtype == bt.dtype == np.float32
        assert not bt.any()
        # A ~ N(0, 1/in): each row has squared norm ~1
        assert np.allclose(np.sum(a.astype(np.float64) ** 2, axis=1), 1.0, atol=0.15)
        assert not np.any(lora.forward(x, m))
        assert not np.any(lora.delta_weight(m))
    assert not np.array_equal(lora.factors(Q)[0], lora.factors(V)[0])


def test_seed_determines_initial_factors() -> None:
    cfg = config()
    a1 = MicroLoRA(cfg, seed=5).factors(Q)[0]
    assert np.array_equal(a1, MicroLoRA(cfg, seed=5).factors(Q)[0])
    assert not np.array_equal(a1, MicroLoRA(cfg, seed=6).factors(Q)[0])
    assert not np.array_equal(MicroLoRA(cfg).factors(Q)[0], MicroLoRA(cfg).factors(Q)[0])


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_seed_and_config_types_are_checked(seed: Any) -> None:
    with pytest.raises(TypeError, match="seed"):
        MicroLoRA(config(), seed=seed)
    with pytest.raises(TypeError, match="config"):
        MicroLoRA({"rank": 2})  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 1 << 63])
def test_seeds_outside_the_range_are_refused_naming_the_seed(seed: int) -> None:
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        MicroLoRA(config(), seed=seed)


def test_numpy_integer_seeds_are_seeds() -> None:
    a = MicroLoRA(config(), seed=np.int64(7)).factors(Q)[0]
    assert np.array_equal(a, MicroLoRA(config(), seed=7).factors(Q)[0])


@pytest.mark.parametrize("batch", [False, True])
def test_a_finite_x_whose_hidden_value_overflows_is_named_as_such(batch: bool) -> None:
    lora = trained(config())
    a = lora.factors(Q)[0]
    x = (np.sign(a[0]) * np.float32(3e38)).astype(np.float32)  # finite; s·A·x is not
    before = Snapshot.of(lora)
    with pytest.raises(InvalidInputError, match="finite but so large"):
        lora.forward(np.stack([x, x]) if batch else x, Q)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        lora.forward(np.full_like(x, np.nan), Q)
    assert Snapshot.of(lora) == before


def _near_the_largest_delta(rank: int) -> tuple[MicroLoRA, np.ndarray]:
    """An adapter whose delta_weight is finite (1.2e38 at [0, 0], s·‖A‖·‖B‖ within float32)
    and an input of norm 3 whose delta is not (3.6e38 at row 0): every hidden value is
    finite, only s·B·A·x overflows."""
    cfg = config(rank=rank, alpha=float(rank))  # scaling 1
    lora = MicroLoRA(cfg, seed=0)
    a = np.zeros((rank, 12), np.float32)
    bt = np.zeros((rank, 10), np.float32)
    a[0, 0], bt[0, 0] = 1e19, 1.2e19
    lora.set_factors(Q, a, bt)
    assert np.isfinite(lora.delta_weight(Q)).all()
    x = np.zeros(12, np.float32)
    x[0] = 3.0
    return lora, x


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 8])
def test_a_delta_beyond_float32_from_finite_weights_and_input_is_refused_not_returned(
    rank: int,
) -> None:
    """forward never returns inf for a finite x: vector and batch raise, as a composition of
    the same adapter does; forward_add raises with out as it was."""
    lora, x = _near_the_largest_delta(rank)
    before = Snapshot.of(lora)
    for arg in (x, np.stack([x, x])):
        with pytest.raises(InvalidInputError, match="delta overflows float32"):
            lora.forward(arg, Q)
        out = np.ones((*arg.shape[:-1], 10), np.float32)
        with pytest.raises(InvalidInputError, match="delta overflows float32"):
            lora.forward_add(arg, Q, out)
        assert np.all(out == 1.0)
    with pytest.raises(InvalidInputError, match="overflows float32"):
        MicroLoRA.compose_parallel([lora]).forward(x, Q)
    assert np.isfinite(lora.forward(x / 2, Q)).all()  # 1.8e38 fits
    assert Snapshot.of(lora) == before


@pytest.mark.parametrize("strided", [False, True])
def test_forward_add_refuses_a_sum_beyond_float32_and_leaves_out_as_it_was(
    strided: bool,
) -> None:
    lora, x = _near_the_largest_delta(2)
    half = x / 2  # a delta of 1.8e38 at row 0, finite
    out = np.zeros(20, np.float32)[::2] if strided else np.zeros(10, np.float32)
    out[0] = 2e38
    out[1] = 5.0
    before = out.copy()
    with pytest.raises(InvalidInputError, match="out \\+ the delta overflows"):
        lora.forward_add(half, Q, out)
    np.testing.assert_array_equal(out, before)
    out[0] = -1e38
    lora.forward_add(half, Q, out)
    assert out[0] == np.float32(np.float32(-1e38) + lora.forward(half, Q)[0])


def test_sizes_are_counted_from_the_arrays() -> None:
    cfg = config(n_in=30, n_out=20, rank=3, modules=(Q, V, K))
    lora = MicroLoRA(cfg, seed=0)
    assert lora.param_count == 3 * 3 * (30 + 20)
    held = sum(a.nbytes + bt.nbytes for _, a, bt in lora.iter_factors())
    grads = sum(sum(g.nbytes for g in lora.gradients(m)) for m in lora.modules)
    assert held == 4 * lora.param_count
    assert lora.memory_bytes >= held + grads
    assert lora.memory_bytes < 3 * (held + grads)
    bigger = MicroLoRA(config(n_in=60, n_out=20, rank=3, modules=(Q, V, K)), seed=0)
    assert bigger.memory_bytes > lora.memory_bytes


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    rank=st.integers(1, 8),
    alpha=st.floats(0.1, 16.0),
    n=st.integers(0, 5),
    seed=st.integers(0, 2**32),
)
def test_forward_matches_the_float64_reference(
    n_in: int, n_out: int, rank: int, alpha: float, n: int, seed: int
) -> None:
    rank = min(rank, n_in, n_out)
    cfg = config(n_in=n_in, n_out=n_out, rank=rank, alpha=alpha)
    lora = trained(cfg, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    x = vec(rng, n_in)
    xb = rng.standard_normal((n, n_in)).astype(np.float32)
    for m in (Q, V):
        a, bt = lora.factors(m)
        s = cfg.scaling
        y = lora.forward(x, m)
        assert y.shape == (n_out,) and y.dtype == np.float32
        assert_f32_close(y, ref_forward(a, bt, s, x), ref_magnitude(a, bt, s, x), n_in + rank)
        yb = lora.forward(xb, m)
        assert yb.shape == (n, n_out) and yb.dtype == np.float32
        assert_f32_close(yb, ref_forward(a, bt, s, xb), ref_magnitude(a, bt, s, xb), n_in + rank)
        dw = lora.delta_weight(m)
        assert dw.shape == (n_out, n_in) and dw.dtype == np.float32
        expected = s * bt.T.astype(np.float64) @ a.astype(np.float64)
        assert_f32_close(dw, expected, s * np.abs(bt.T) @ np.abs(a), rank)
        assert_f32_close(y, dw.astype(np.float64) @ x, ref_magnitude(a, bt, s, x), n_in + rank)


def test_batch_rows_equal_single_vectors_and_inputs_are_not_modified() -> None:
    lora = trained(config(rank=3))
    xb = np.random.default_rng(1).standard_normal((7, 12)).astype(np.float32)
    keep = xb.copy()
    yb = lora.forward(xb, V)
    for i in range(7):
        np.testing.assert_allclose(yb[i], lora.forward(xb[i], V), rtol=1e-6, atol=1e-6)
    assert np.array_equal(xb, keep)


def test_other_real_dtypes_layouts_and_module_names_give_the_same_delta() -> None:
    lora = trained(config(n_in=6, n_out=5))
    x32 = np.array([1, -2, 3, 0, 5, -1], np.float32)
    y = lora.forward(x32, Q)
    for variant in (
        x32.astype(np.float64),
        x32.astype(np.int64),
        x32.astype(np.float16),
        list(x32.tolist()),
        np.stack([x32, x32], axis=1)[:, 0],  # non-contiguous view
        x32.astype(">f4"),  # non-native byte order
        np.frombuffer(b"\0" + x32.tobytes(), np.float32, offset=1),  # unaligned, read-only
    ):
        np.testing.assert_array_equal(lora.forward(variant, Q), y)
    np.testing.assert_array_equal(lora.forward(x32, "q_proj"), y)  # type: ignore[arg-type]
    col = np.asfortranarray(np.stack([x32, 2 * x32]))
    np.testing.assert_allclose(lora.forward(col, Q)[1], 2 * y, rtol=1e-6)


def test_forward_add_adds_in_place() -> None:
    lora = trained(config(rank=2))
    rng = np.random.default_rng(2)
    x = vec(rng, 12)
    base = vec(rng, 10)
    out = base.copy()
    lora.forward_add(x, Q, out)
    np.testing.assert_allclose(out, base + lora.forward(x, Q), rtol=1e-6, atol=1e-6)
    xb = rng.standard_normal((4, 12)).astype(np.float32)
    baseb = rng.standard_normal((4, 10)).astype(np.float32)
    outb = baseb.copy()
    lora.forward_add(xb, V, outb)
    np.testing.assert_allclose(outb, baseb + lora.forward(xb, V), rtol=1e-6, atol=1e-6)


def test_forward_add_with_rank_above_two() -> None:
    lora = trained(config(rank=5))
    rng = np.random.default_rng(3)
    x = vec(rng, 12)
    out = np.ones(10, np.float32)
    lora.forward_add(x, Q, out)
    np.testing.assert_allclose(out, 1.0 + lora.forward(x, Q), rtol=1e-6, atol=1e-6)


def bad_x() -> list[tuple[Any, type]]:
    nan = np.ones(12, np.float32)
    nan[7] = np.nan
    inf = np.ones(12, np.float32)
    inf[0] = -np.inf
    batch_nan = np.ones((3, 12), np.float32)
    batch_nan[2, 11] = np.nan
    return [
        (nan, InvalidInputError),
        (inf, InvalidInputError),
        (batch_nan, InvalidInputError),
        (np.full(12, 1e39), InvalidInputError),  # float64 beyond float32: inf after conversion
        (np.ones(11, np.float32), InvalidInputError),
        (np.ones((3, 13), np.float32), InvalidInputError),
        (np.ones((2, 3, 12), np.float32), InvalidInputError),
        (np.float32(1.0), InvalidInputError),
        (np.ones(12, complex), TypeError),
        (np.array(["a"] * 12), TypeError),
        (np.ones(12, bool), TypeError),
        ("x" * 12, TypeError),
        ([[1.0, 2.0], [3.0]], TypeError),
        (None, TypeError),
    ]


@pytest.mark.parametrize(("x", "error"), bad_x())
@pytest.mark.parametrize("explore", [False, True])
def test_forward_rejects_bad_x_naming_it_and_changes_nothing(
    x: Any, error: type, explore: bool
) -> None:
    lora = trained(config())
    before = Snapshot.of(lora)
    with pytest.raises(error, match="x"):
        lora.forward(x, Q, explore=explore)
    assert Snapshot.of(lora) == before
    assert not lora.adapt(np.ones(12, np.float32), _quality(0.5), Q)  # nothing was explored


@pytest.mark.parametrize("explore", ["no", float("nan"), 1, 0, None])
def test_forward_refuses_an_explore_that_is_not_a_bool(explore: Any) -> None:
    """A truthy non-bool ("no", NaN) explored, adding noise the caller asked not to get."""
    lora = trained(config())
    before = Snapshot.of(lora)
    x = np.ones(12, np.float32)
    with pytest.raises(TypeError, match="explore must be a bool"):
        lora.forward(x, Q, explore=explore)
    assert Snapshot.of(lora) == before
    assert not lora.adapt(x, _quality(0.5), Q)  # nothing was explored
    noisy = lora.forward(x, Q, explore=np.True_)  # numpy's bools are bools
    assert not np.array_equal(noisy, lora.forward(x, Q, explore=np.False_))


def _quality(q: float) -> AdaptFeedback:
    return AdaptFeedback.from_quality(q)


@pytest.mark.parametrize(("x", "error"), bad_x())
def test_forward_add_rejects_bad_x_and_leaves_out_untouched(x: Any, error: type) -> None:
    lora = trained(config())
    shape = (x.shape[0], 10) if isinstance(x, np.ndarray) and x.ndim >= 2 else (10,)
    out = np.full(shape, 7.0, np.float32)
    with pytest.raises(error, match="x"):
        lora.forward_add(x, Q, out)
    assert np.all(out == 7.0)


@pytest.mark.parametrize(
    "out",
    [
        np.zeros(10, np.float64),
        [0.0] * 10,
        np.zeros(9, np.float32),
        np.zeros((1, 10), np.float32),
    ],
)
def test_forward_add_rejects_a_bad_out(out: Any) -> None:
    lora = trained(config())
    with pytest.raises((TypeError, InvalidInputError), match="out"):
        lora.forward_add(np.ones(12, np.float32), Q, out)
    frozen = np.zeros(10, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="out"):
        lora.forward_add(np.ones(12, np.float32), Q, frozen)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(10,), (3, 10), "strided"])
def test_forward_add_refuses_nan_or_inf_already_in_out_and_leaves_it_as_it_was(
    bad: float, shape: tuple[int, ...] | str
) -> None:
    lora = trained(config())
    if shape == "strided":
        out = np.zeros(20, np.float32)[::2]
        x: np.ndarray = np.ones(12, np.float32)
    else:
        out = np.zeros(shape, np.float32)
        x = np.ones((*shape[:-1], 12), np.float32)
    out.flat[-1] = bad
    before = out.copy()
    with pytest.raises(InvalidInputError, match="out contains NaN or inf"):
        lora.forward_add(x, Q, out)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize(
    ("module", "error"),
    [
        (K, UnknownModuleError),
        ("o_proj", UnknownModuleError),
        ("lm_head", ValueError),
        (0, TypeError),
    ],
)
def test_untargeted_modules_are_rejected_everywhere(module: Any, error: type) -> None:
    lora = trained(config())
    x = np.ones(12, np.float32)
    before = Snapshot.of(lora)
    calls: list[Callable[[], object]] = [
        lambda: lora.forward(x, module),
        lambda: lora.forward(x, module, explore=True),
        lambda: lora.forward(np.ones((2, 12), np.float32), module),
        lambda: lora.forward_add(x, module, np.zeros(10, np.float32)),
        lambda: lora.delta_weight(module),
        lambda: lora.factors(module),
        lambda: lora.adapt(x, _quality(0.5).with_target(np.ones(10)), module),
    ]
    for call in calls:
        with pytest.raises(error, match="module"):
            call()
    assert Snapshot.of(lora) == before


# ---------------------------------------------------------------------------- exploration


def test_exploration_noise_is_regenerable_and_scaled_to_the_input() -> None:
    n_out = 4096
    cfg = MicroLoraConfig(in_features=64, out_features=n_out, rank=2, explore_std=0.5)
    lora = trained(cfg, seed=4)
    rng = np.random.default_rng(0)
    x = vec(rng, 64, scale=3.0)
    plain = lora.forward(x, Q)
    noisy = lora.forward(x, Q, explore=True)
    noise = noisy.astype(np.float64) - plain
    sigma = 0.5 * float(np.linalg.norm(x)) / math.sqrt(n_out)
    assert float(np.std(noise)) == pytest.approx(sigma, rel=0.05)
    assert abs(float(np.mean(noise))) < 4 * sigma / math.sqrt(n_out)
    # same (seed, module, x): the same noise; another module or input: other noise
    np.testing.assert_array_equal(lora.forward(x, Q, explore=True), noisy)
    other_module = lora.forward(x, V, explore=True) - lora.forward(x, V)
    assert abs(float(np.corrcoef(noise, other_module)[0, 1])) < 0.1
    x2 = x.copy()
    x2[0] = np.nextafter(x2[0], np.float32(np.inf))
    other_input = lora.forward(x2, Q, explore=True) - lora.forward(x2, Q)
    assert abs(float(np.corrcoef(noise, other_input)[0, 1])) < 0.1
    # the plain forward is unaffected by exploring
    np.testing.assert_array_equal(lora.forward(x, Q), plain)


def test_exploring_a_huge_finite_input_stays_finite_or_is_refused_recording_nothing() -> None:
    """σ takes ‖x‖ in float64 (a float32 dot overflows from |x| ~ 2e19); noise σ·z that
    overflows float32 is refused before anything is recorded, batch rows included."""
    cfg = MicroLoraConfig(in_features=8, out_features=8, rank=2, target_modules=(Q,))
    lora = MicroLoRA(cfg, seed=0)
    x = np.full(8, 2e19, np.float32)
    noisy = lora.forward(x, Q, explore=True)
    assert np.isfinite(noisy).all() and noisy.any()
    with pytest.raises(InvalidInputError, match="too large"):  # ‖x‖² is above 1e38
        lora.adapt(x, _quality(0.5), Q)
    loud = MicroLoRA(dataclasses.replace(cfg, explore_std=1e6), seed=0)
    a = loud.factors(Q)[0]
    huge = (np.sign(a[0]) * np.float32(1e36)).astype(np.float32)
    huge[np.abs(a[0]) > np.abs(a[0]).min()] = 0.0  # only the smallest |A| entry: s·A·x fits
    assert np.isfinite(loud.forward(huge, Q)).all()
    small = vec(np.random.default_rng(1), 8)
    before = Snapshot.of(loud)
    for call in (lambda: loud.forward(huge, Q, explore=True),
                 lambda: loud.forward(np.stack([small, huge]), Q, explore=True)):  # fmt: skip
        with pytest.raises(InvalidInputError, match="exploration noise overflows"):
            call()
    assert Snapshot.of(loud) == before
    assert loud.adapt(small, _quality(0.9), Q) is False  # the batch's first row: not recorded
    assert "explored on this input" in (loud.last_note or "")


def test_explored_batch_rows_equal_explored_vectors() -> None:
    lora = trained(config(n_in=12, n_out=64))
    xb = np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32)
    yb = lora.forward(xb, V, explore=True)
    for i in range(3):
        np.testing.assert_allclose(yb[i], lora.forward(xb[i], V, explore=True), atol=1e-6)
    assert not np.allclose(yb, lora.forward(xb, V), atol=1e-3)


def test_exploration_noise_depends_on_the_seed_and_is_absent_when_not_asked() -> None:
    cfg = config(n_out=256)
    x = np.ones(12, np.float32)
    n1 = MicroLoRA(cfg, seed=1).forward(x, Q, explore=True)
    n2 = MicroLoRA(cfg, seed=2).forward(x, Q, explore=True)
    assert np.any(n1) and np.any(n2) and not np.allclose(n1, n2)
    assert not np.any(MicroLoRA(cfg, seed=1).forward(x, Q))


def test_forward_does_not_change_the_adapter() -> None:
    lora = trained(config())
    before = Snapshot.of(lora)
    x = np.ones(12, np.float32)
    lora.forward(x, Q)
    lora.forward(np.ones((3, 12)), V)
    lora.forward_add(x, Q, np.zeros(10, np.float32))
    lora.delta_weight(Q)
    assert Snapshot.of(lora) == before


def test_module_enum_and_all_members_usable() -> None:
    mods = tuple(TargetModule)
    lora = trained(config(modules=mods))
    x = np.ones(12, np.float32)
    outs = [lora.forward(x, m) for m in mods]
    assert len({o.tobytes() for o in outs}) == len(mods)  # independent factors per module


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 40),
    rank=st.integers(1, 8),
    sign=st.sampled_from([1.0, -1.0]),
    seed=st.integers(0, 1000),
)
def test_adding_a_batch_in_place_is_forward_added_with_its_sign(
    n: int, n_in: int, n_out: int, rank: int, sign: float, seed: int
) -> None:
    """``_add_batch``, which sums adapters' predictions without a result array each (the
    Background loop's ``quality_delta`` under EWC_MERGE), adds what ``forward`` gives."""
    rank = min(rank, n_in, n_out)
    lora = trained(config(n_in=n_in, n_out=n_out, rank=rank), seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    start = rng.standard_normal((n, n_out)).astype(np.float32)
    out = start.copy()
    lora._add_batch(x, V, out, sign)
    a, bt = lora.factors(V)
    expected = start.astype(np.float64) + sign * ref_forward(a, bt, lora.scaling, x)
    magnitude = np.abs(start) + ref_magnitude(a, bt, lora.scaling, x)
    assert_f32_close(out, expected, magnitude, n_in + rank + 1)


def test_adding_a_batch_beyond_float32_raises() -> None:
    lora, x = _near_the_largest_delta(2)
    half = np.stack([x / 2, x / 2])  # a delta of 1.8e38 at row 0, finite
    out = np.zeros((2, 10), np.float32)
    lora._add_batch(half, Q, out, 1.0)
    with pytest.raises(InvalidInputError, match="delta overflows float32"):
        lora._add_batch(half, Q, out, 1.0)  # 3.6e38
    with pytest.raises(InvalidInputError, match="must be"):
        lora._add_batch(half, Q, np.zeros((3, 10), np.float32), 1.0)
