"""ComposedAdapter against a float64 reference on generated shapes, and what it does where
float32 runs out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import Q, Snapshot, V, config, f64, trained, vec

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig

F32_MAX = float(np.finfo(np.float32).max)


def delta64(lora: MicroLoRA, m: object) -> np.ndarray:
    a, bt = lora.factors(m)  # type: ignore[arg-type]
    return f64(lora.scaling * f64(bt).T @ f64(a))


def inputs(rng: np.random.Generator, n_in: int, batch: int | None) -> np.ndarray:
    shape = (n_in,) if batch is None else (batch, n_in)
    return rng.standard_normal(shape).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    ranks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    batch=st.none() | st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_parallel_is_the_mean_of_the_deltas(
    n_in: int, n_out: int, ranks: list[int], batch: int | None, seed: int
) -> None:
    adapters = [
        trained(config(n_in=n_in, n_out=n_out, rank=min(r, n_in, n_out)), seed=seed + i)
        for i, r in enumerate(ranks)
    ]
    x = inputs(np.random.default_rng(seed), n_in, batch)
    got = MicroLoRA.compose_parallel(adapters).forward(x, V)
    expected = np.mean([f64(x) @ delta64(a, V).T for a in adapters], axis=0)
    assert got.dtype == np.float32 and got.shape == expected.shape
    atol = 1e-5 * (1 + np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    ranks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    batch=st.none() | st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_sequential_applies_each_delta_to_the_previous_output(
    n: int, ranks: list[int], batch: int | None, seed: int
) -> None:
    adapters = [
        trained(config(n_in=n, n_out=n, rank=min(r, n)), seed=seed + i) for i, r in enumerate(ranks)
    ]
    x = inputs(np.random.default_rng(seed), n, batch)
    cur = f64(x)
    for a in adapters:  # x → x + Δ₁(x) → …, as the docstring defines it
        cur = cur + cur @ delta64(a, Q).T
    expected = cur - f64(x)
    got = MicroLoRA.compose_sequential(adapters).forward(x, Q)
    assert got.dtype == np.float32 and got.shape == expected.shape
    atol = 1e-4 * (1 + np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol)


def one_entry(a0: float, b0: float, n: int = 4) -> MicroLoRA:
    """A rank-1 adapter with ΔW = a0·b0 at (0, 0) and zero elsewhere (scaling 1)."""
    lora = MicroLoRA(MicroLoraConfig(in_features=n, out_features=n, rank=1, alpha=1.0), seed=0)
    a = np.zeros((1, n))
    bt = np.zeros((1, n))
    a[0, 0], bt[0, 0] = a0, b0
    for m in lora.modules:
        lora.set_factors(m, a, bt)
    return lora


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("batch", [False, True])
def test_a_composed_delta_beyond_float32_is_an_error_not_inf(mode: str, batch: bool) -> None:
    """Two adapters whose deltas are 0.9 of float32's max each (valid on their own): their
    sequence adds up to inf, and x = 2 makes each delta overflow alone. Both used to come back
    as inf; now they are refused, and the adapters are untouched."""
    adapters = [one_entry(1.0, 0.9 * F32_MAX), one_entry(1.0, 0.9 * F32_MAX)]
    before = [Snapshot.of(a) for a in adapters]
    compose = MicroLoRA.compose_sequential if mode == "sequential" else MicroLoRA.compose_parallel
    comp = compose(adapters)
    scales = (1.0, 2.0) if mode == "sequential" else (2.0,)
    for scale in scales:
        x = np.zeros((2, 4) if batch else 4, np.float32)
        x[..., 0] = scale
        with pytest.raises(InvalidInputError, match="overflows float32"):
            comp.forward(x, Q)
    assert [Snapshot.of(a) for a in adapters] == before


def test_an_intermediate_input_beyond_float32_is_not_called_nan_in_x() -> None:
    """The first delta is finite (1e20) but the second adapter's s·A·(x + 1e20) overflows: the
    error used to say that x holds NaN or inf, which the caller's x does not."""
    comp = MicroLoRA.compose_sequential([one_entry(1.0, 1e20), one_entry(1e20, 1.0)])
    x = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    with pytest.raises(InvalidInputError, match=r"adapters\[1\] receives") as info:
        comp.forward(x, Q)
    assert "NaN" not in str(info.value)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        comp.forward(np.array([math.nan, 0, 0, 0], np.float32), Q)


def test_a_composition_is_a_live_view_of_its_adapters() -> None:
    """As documented: what an adapter learns after being composed shows in the composition;
    a composition of clones keeps what they were."""
    lora = trained(config(n_in=8, n_out=8), seed=3)
    live = MicroLoRA.compose_parallel([lora])
    frozen = MicroLoRA.compose_parallel([lora.clone()])
    rng = np.random.default_rng(0)
    x = vec(rng, 8)
    before = lora.forward(x, Q).copy()
    assert lora.adapt(x, AdaptFeedback.from_quality(1.0).with_target(vec(rng, 8)), Q)
    assert lora.apply_updates(0.5)
    np.testing.assert_array_equal(live.forward(x, Q), lora.forward(x, Q))
    np.testing.assert_allclose(frozen.forward(x, Q), before, rtol=1e-6)
    assert not np.allclose(before, lora.forward(x, Q))
