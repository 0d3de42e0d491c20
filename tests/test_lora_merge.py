"""merge_adapters is exact in weight space (or the best rank-r approximation); compose_* chain
or average the deltas."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import K, Q, Snapshot, V, config, f64, trained, vec

from sona.errors import InvalidInputError
from sona.lora import ComposedAdapter, MicroLoRA


def delta64(lora: MicroLoRA, m: Any) -> np.ndarray:
    a, bt = lora.factors(m)
    return f64(lora.scaling * f64(bt).T @ f64(a))


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    weights=st.lists(st.floats(-3.0, 3.0), min_size=4, max_size=4),
    alphas=st.lists(st.floats(0.5, 16.0), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_exact_merge_sums_the_weighted_deltas(
    ranks: list[int], weights: list[float], alphas: list[float], seed: int
) -> None:
    adapters = [
        trained(config(n_in=20, n_out=16, rank=r, alpha=alphas[i]), seed=seed + i)
        for i, r in enumerate(ranks)
    ]
    pairs = list(zip(adapters, weights[: len(ranks)], strict=True))
    before = [Snapshot.of(a) for a in adapters]
    merged = MicroLoRA.merge_adapters(pairs)
    assert merged.config.rank == sum(ranks)  # ranks add: exact, not A and B averaged
    assert merged.modules == adapters[0].modules
    x = vec(np.random.default_rng(seed), 20)
    for m in (Q, V):
        expected = sum(w * delta64(a, m) for a, w in pairs)
        scale = max(float(np.abs(expected).max()), 1e-3)
        np.testing.assert_allclose(merged.delta_weight(m), expected, atol=1e-5 * scale)
        fwd = sum(w * f64(a.forward(x, m)) for a, w in pairs)
        np.testing.assert_allclose(merged.forward(x, m), fwd, atol=1e-4 * scale)
    assert [Snapshot.of(a) for a in adapters] == before  # sources untouched


def test_averaging_factors_would_be_wrong_and_merge_does_not() -> None:
    a, b = trained(config(), seed=1), trained(config(), seed=2)
    merged = MicroLoRA.merge_adapters([(a, 0.5), (b, 0.5)])
    exact = 0.5 * delta64(a, Q) + 0.5 * delta64(b, Q)
    naive = (
        a.scaling
        * f64(0.5 * (a.factors(Q)[1] + b.factors(Q)[1])).T
        @ f64(0.5 * (a.factors(Q)[0] + b.factors(Q)[0]))
    )
    assert np.abs(naive - exact).max() > 0.1  # the cross terms are not small
    np.testing.assert_allclose(merged.delta_weight(Q), exact, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_rank_limited_merge_is_the_best_approximation(rank: int) -> None:
    adapters = [trained(config(n_in=20, n_out=16, rank=2), seed=s) for s in range(3)]
    pairs = [(adapters[0], 1.0), (adapters[1], -0.5), (adapters[2], 2.0)]
    merged = MicroLoRA.merge_adapters(pairs, rank=rank)
    assert merged.config.rank == rank
    for m in (Q, V):
        exact = sum(w * delta64(a, m) for a, w in pairs)
        sv = np.linalg.svd(exact, compute_uv=False)
        best = float(np.sqrt(np.sum(sv[rank:] ** 2)))  # Eckart–Young
        err = float(np.linalg.norm(f64(merged.delta_weight(m)) - exact))
        assert err == pytest.approx(best, rel=1e-3, abs=1e-4 * sv[0])
        assert np.linalg.matrix_rank(merged.delta_weight(m), tol=1e-4 * sv[0]) <= rank


def test_merge_beyond_the_full_rank_stays_exact() -> None:
    adapters = [trained(config(n_in=5, n_out=4, rank=3), seed=s) for s in range(3)]
    pairs = [(a, 0.7) for a in adapters]
    merged = MicroLoRA.merge_adapters(pairs)  # 9 > min(5, 4): the exact sum has rank <= 4
    assert merged.config.rank <= 4
    exact = sum(w * delta64(a, Q) for a, w in pairs)
    np.testing.assert_allclose(merged.delta_weight(Q), exact, atol=1e-5)


def test_merge_of_one_with_unit_weight_reproduces_it() -> None:
    src = trained(config(rank=3, alpha=6.0), seed=7)
    merged = MicroLoRA.merge_adapters([(src, 1.0)])
    x = vec(np.random.default_rng(0), 12)
    for m in (Q, V):
        np.testing.assert_allclose(merged.forward(x, m), src.forward(x, m), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        MicroLoRA.merge_adapters([(src, 0.0)]).delta_weight(Q), 0.0, atol=0.0
    )


def test_merged_adapters_can_keep_learning() -> None:
    from sona.feedback import AdaptFeedback

    merged = MicroLoRA.merge_adapters([(trained(config(), seed=s), 0.5) for s in range(2)])
    rng = np.random.default_rng(1)
    assert merged.adapt(vec(rng, 12), AdaptFeedback.from_quality(1.0).with_target(vec(rng, 10)))
    assert merged.apply_updates(0.1)


@pytest.mark.parametrize(
    ("pairs", "kw", "error"),
    [
        ([], {}, InvalidInputError),
        ([trained(config())], {}, TypeError),
        ([(trained(config()),)], {}, TypeError),
        ([(object(), 1.0)], {}, TypeError),
        ([(trained(config()), float("nan"))], {}, InvalidInputError),
        ([(trained(config()), float("inf"))], {}, InvalidInputError),
        ([(trained(config()), "1")], {}, TypeError),
        ([(trained(config()), True)], {}, TypeError),
        ([(trained(config()), 10**400)], {}, InvalidInputError),
        ([(trained(config()), 1.0), (trained(config(n_in=13)), 1.0)], {}, InvalidInputError),
        ([(trained(config()), 1.0), (trained(config(modules=(Q, K))), 1.0)], {}, InvalidInputError),
        ([(trained(config()), 1.0)], {"rank": 0}, InvalidInputError),
        ([(trained(config()), 1.0)], {"rank": 11}, InvalidInputError),
        ([(trained(config()), 1.0)], {"rank": 2.0}, InvalidInputError),
    ],
)
def test_merge_rejects_bad_arguments(pairs: Any, kw: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        MicroLoRA.merge_adapters(pairs, **kw)


def test_numpy_weights_are_weights() -> None:
    src = trained(config())
    merged = MicroLoRA.merge_adapters([(src, np.float32(0.5)), (src, np.int64(1))])
    plain = MicroLoRA.merge_adapters([(src, 0.5), (src, 1)])
    for m in (Q, V):
        assert np.array_equal(merged.delta_weight(m), plain.delta_weight(m))


# ---------------------------------------------------------------------------- composition


def test_parallel_composition_is_the_mean_delta() -> None:
    adapters = [trained(config(rank=r), seed=r) for r in (1, 2, 3)]
    comp = MicroLoRA.compose_parallel(adapters)
    assert isinstance(comp, ComposedAdapter)
    rng = np.random.default_rng(0)
    for x in (vec(rng, 12), rng.standard_normal((4, 12)).astype(np.float32)):
        expected = np.mean([f64(a.forward(x, V)) for a in adapters], axis=0)
        got = comp.forward(x, V)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_sequential_composition_feeds_each_adapter_the_previous_output() -> None:
    adapters = [trained(config(n_in=10, n_out=10, rank=2), seed=s) for s in range(3)]
    comp = MicroLoRA.compose_sequential(adapters)
    rng = np.random.default_rng(1)
    for x in (vec(rng, 10), rng.standard_normal((3, 10)).astype(np.float32)):
        cur = f64(x)
        for a in adapters:  # x_k = x_{k-1} + Δ_k(x_{k-1}), by the delta matrices
            cur = cur + cur @ delta64(a, Q).T
        expected = cur - f64(x)
        got = comp.forward(x, Q)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    only = MicroLoRA.compose_sequential(adapters[:1])
    x = vec(rng, 10)
    np.testing.assert_allclose(only.forward(x, Q), adapters[0].forward(x, Q), rtol=1e-6)


def test_composition_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidInputError):
        MicroLoRA.compose_parallel([])
    with pytest.raises(TypeError):
        MicroLoRA.compose_parallel([trained(config()), "adapter"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError):
        MicroLoRA.compose_parallel([trained(config()), trained(config(n_out=11))])
    with pytest.raises(InvalidInputError, match="in_features == out_features"):
        MicroLoRA.compose_sequential([trained(config(n_in=12, n_out=10))])
    comp = MicroLoRA.compose_parallel([trained(config())])
    with pytest.raises(InvalidInputError, match="x"):
        comp.forward(np.ones(11, np.float32), Q)
    with pytest.raises(InvalidInputError, match="module"):
        comp.forward(np.ones(12, np.float32), K)
