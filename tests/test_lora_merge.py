"""merge_adapters is exact in weight space (or the best rank-r approximation); compose_* chain
or average the deltas."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lora_reference import K, Q, Snapshot, V, config, f64, trained, vec

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
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


def test_ranks_adding_up_to_the_full_rank_are_concatenated_keeping_every_sources_a() -> None:
    """2 + 2 = min(6, 4): the ranks still add (no SVD), so an untrained source's rows of A,
    whose B is still zero, stay in the merged adapter and steer what it learns next."""
    cfg = config(n_in=6, n_out=4, rank=2)
    learned = trained(cfg, seed=1)
    fresh = MicroLoRA(cfg, seed=2)
    merged = MicroLoRA.merge_adapters([(learned, 1.0), (fresh, 1.0)])
    assert merged.config.rank == 4
    for m in (Q, V):
        want = np.concatenate([learned.factors(m)[0], fresh.factors(m)[0]])
        np.testing.assert_array_equal(merged.factors(m)[0], want)
        np.testing.assert_allclose(merged.delta_weight(m), delta64(learned, m), atol=1e-6)


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


@pytest.mark.parametrize(
    "combine",
    [MicroLoRA.merge_adapters, MicroLoRA.compose_sequential, MicroLoRA.compose_parallel],
)
@pytest.mark.parametrize("adapters", [None, 3, "ab"])
def test_adapters_that_are_not_a_sequence_are_named_in_the_error(
    combine: Any, adapters: object
) -> None:
    with pytest.raises(TypeError, match=r"^adapters must be a sequence of "):
        combine(adapters)


def test_numpy_weights_are_weights() -> None:
    src = trained(config())
    merged = MicroLoRA.merge_adapters([(src, np.float32(0.5)), (src, np.int64(1))])
    plain = MicroLoRA.merge_adapters([(src, 0.5), (src, 1)])
    for m in (Q, V):
        assert np.array_equal(merged.delta_weight(m), plain.delta_weight(m))


# ---------------------------------------------------------------------------- float32 range

F32_MAX = float(np.finfo(np.float32).max)


def bound(scale: float, a: Any, bt: Any) -> float:
    """s·‖A‖·‖B‖ in float64: what every adapter keeps below float32's max."""
    return scale * float(np.linalg.norm(f64(a))) * float(np.linalg.norm(f64(bt)))


def near_limit(fraction: float = 0.9, seed: int = 0) -> MicroLoRA:
    """An adapter with s·‖A‖·‖B‖ = ``fraction`` of float32's max: valid on its own."""
    lora = MicroLoRA(config(n_in=8, n_out=8, rank=1), seed=seed)
    rng = np.random.default_rng(seed)
    for m, _, _ in list(lora.iter_factors()):
        a, bt = rng.standard_normal((1, 8)), rng.standard_normal((1, 8))
        c = math.sqrt(fraction * F32_MAX / (lora.scaling * np.linalg.norm(a) * np.linalg.norm(bt)))
        lora.set_factors(m, c * a, c * bt)
    for _, a, bt in lora.iter_factors():
        assert bound(lora.scaling, a, bt) < F32_MAX
    return lora


def nuclear(matrix: np.ndarray, rank: int | None = None) -> float:
    """Σσ over the ``rank`` largest singular values: the smallest ‖A‖·‖B‖ of any factors."""
    return float(np.sum(np.linalg.svd(matrix, compute_uv=False)[:rank]))


@pytest.mark.parametrize(
    ("weights", "kw"),
    [
        ([1.0] * 10, {}),  # ten valid adapters whose deltas add up beyond float32
        ([10.0], {}),
        ([1e300], {}),  # once an overflow warning inside the merge
        ([1e308, 1e308], {}),
        ([10.0, 1.0], {"rank": 1}),
        ([1e300, -1e300], {"rank": 1}),  # once numpy's "SVD did not converge"
    ],
)
def test_a_merge_whose_sum_overflows_float32_is_refused(
    weights: list[float], kw: dict[str, Any]
) -> None:
    """Individually valid adapters can sum to a delta beyond float32: the merge says so with
    an InvalidInputError naming the module, instead of an adapter whose forward gives inf (or
    a warning or a LinAlgError from inside), and the sources stay untouched."""
    src = near_limit()
    before = Snapshot.of(src)
    with pytest.raises(InvalidInputError, match=r"q_proj .*too large for float32"):
        MicroLoRA.merge_adapters([(src, w) for w in weights], **kw)
    assert Snapshot.of(src) == before


def test_a_sum_that_fits_is_merged_even_when_its_concatenated_factors_do_not() -> None:
    """X - X is zero, yet concatenating X's factors with -X's gives s·‖A‖·‖B‖ = 2·0.9 of
    float32's max; the lopsided pair (A ~ 1e25 with B ~ 1e-13, and the reverse) averages to a
    small delta whose concatenated factors reach ~1e50. The exact merge then keeps the same
    sum in its smallest factors (the SVD's), which fit, so the result keeps learning: factors
    beyond the bound would make every later update be refused."""
    big = near_limit()
    lopsided = []
    for seed, (sa, sb) in enumerate(((1e25, 1e-13), (1e-13, 1e25))):
        lora = MicroLoRA(config(), seed=seed)
        rng = np.random.default_rng(seed)
        for m, a, bt in list(lora.iter_factors()):
            lora.set_factors(
                m, sa * rng.standard_normal(a.shape), sb * rng.standard_normal(bt.shape)
            )
        lopsided.append(lora)
    for pairs in ([(big, 1.0), (big, -1.0)], [(lopsided[0], 0.5), (lopsided[1], 0.5)]):
        merged = MicroLoRA.merge_adapters(pairs)
        assert merged.config.rank == sum(a.config.rank for a, _ in pairs)
        n_in = merged.config.in_features
        x = vec(np.random.default_rng(3), n_in)
        for m in (Q, V):
            a, bt = merged.factors(m)
            assert bound(merged.scaling, a, bt) < F32_MAX
            expected = sum(w * delta64(src, m) for src, w in pairs)
            scale = max(abs(w) * float(np.abs(delta64(src, m)).max()) for src, w in pairs)
            np.testing.assert_allclose(merged.delta_weight(m), expected, atol=1e-6 * scale)
            assert np.isfinite(merged.forward(x, m)).all()
        target = vec(np.random.default_rng(4), merged.config.out_features)
        fb = AdaptFeedback.from_quality(1.0).with_target(target)
        assert merged.adapt(x, fb) and merged.apply_updates(0.1), merged.last_note


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize(
    "weights",
    [(1.0, 1e-200), (1.0, 1e-158), (7e-141, 2e-313), (1e-300, -1e-300), (1.0, 1e-310)],
)
def test_weights_of_any_magnitude_merge_without_warnings(
    weights: tuple[float, float], rank: int | None
) -> None:
    """Weights far apart, or all tiny: the sum is what float32 can show of it (the dominant
    term, or zero), with no overflow, underflow or NaN along the way (warnings are errors
    here)."""
    pairs = [(trained(config(), seed=s), w) for s, w in enumerate(weights)]
    merged = MicroLoRA.merge_adapters(pairs, rank=rank)
    for m in (Q, V):
        expected = sum(w * delta64(a, m) for a, w in pairs)
        got = merged.delta_weight(m)
        assert np.isfinite(got).all()
        if rank is None:
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(got, expected, atol=1e-5 * scale + 1e-44)


@pytest.mark.parametrize("tiny", [2.0**-140, 2.0**-160, 2.0**-200])
def test_a_source_with_a_tiny_scaling_keeps_its_delta(tiny: float) -> None:
    """s = alpha/rank below float32's range, A near 1e30: the delta (1e-12 to 1e-31) fits
    float32, so the exact merge keeps it, though s folded into B would be subnormal or zero."""
    lora = MicroLoRA(config(alpha=2.0 * tiny), seed=0)
    rng = np.random.default_rng(1)
    for m, a, bt in list(lora.iter_factors()):
        lora.set_factors(m, np.ldexp(a, 100), rng.standard_normal(bt.shape))
    merged = MicroLoRA.merge_adapters([(lora, 1.0)])
    assert merged.config.rank == 2
    for m in (Q, V):
        expected = delta64(lora, m)
        assert float(np.abs(expected).min()) > 1e-36  # normal float32 numbers
        np.testing.assert_allclose(merged.delta_weight(m), expected, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    exps=st.lists(st.floats(15.0, 20.0), min_size=4, max_size=4),
    weights=st.lists(
        st.just(0.0) | st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3), min_size=2, max_size=2
    ),
    rank=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 2**16),
)
@example(exps=[18.0, 18.0, 18.0, 18.0], weights=[1.0, 1.0], rank=None, seed=0)
@example(exps=[19.0, 19.0, 19.0, 19.0], weights=[1.0, -1.0], rank=None, seed=0)
def test_merges_are_refused_exactly_when_the_sum_cannot_fit_float32(
    exps: list[float], weights: list[float], rank: int | None, seed: int
) -> None:
    """Two valid adapters (factors up to 1e20, s·‖A‖·‖B‖ capped below the bound) and weights up
    to 1e3, so that sums land on both sides of the bound: the merge is refused only when even
    the smallest factors of its (truncated) sum reach float32's max, and otherwise its factors
    keep the bound and its delta is the exact sum (or its best rank-r approximation)."""
    rng = np.random.default_rng(seed)
    sources = []
    for i in range(2):
        lora = MicroLoRA(config(n_in=6, n_out=5), seed=seed + i)
        for m, a, bt in list(lora.iter_factors()):
            fa = 10.0 ** exps[2 * i] * rng.standard_normal(a.shape)
            fbt = 10.0 ** (exps[2 * i + 1] - 2.0) * rng.standard_normal(bt.shape)
            if bound(lora.scaling, fa.astype(np.float32), fbt.astype(np.float32)) >= F32_MAX:
                fbt *= 0.5 * F32_MAX / bound(lora.scaling, fa, fbt)
            lora.set_factors(m, fa, fbt)
        sources.append(lora)
    pairs = list(zip(sources, weights, strict=True))
    sums = {m: sum(w * delta64(a, m) for a, w in pairs) for m in (Q, V)}
    try:
        merged = MicroLoRA.merge_adapters(pairs, rank=rank)
    except InvalidInputError:
        assert max(nuclear(d, rank) for d in sums.values()) >= F32_MAX * (1 - 1e-5)
        return
    for m, expected in sums.items():
        a, bt = merged.factors(m)
        assert bound(merged.scaling, a, bt) < F32_MAX
        assert nuclear(expected, rank) < F32_MAX * (1 + 1e-5)
        got = f64(merged.delta_weight(m))
        assert np.isfinite(got).all()
        scale = sum(abs(w) * nuclear(delta64(src, m)) for src, w in pairs)
        if rank is None:
            np.testing.assert_allclose(got, expected, atol=1e-5 * scale)
        else:
            sv = np.linalg.svd(expected, compute_uv=False)
            best = float(np.sqrt(np.sum(sv[rank:] ** 2)))
            assert float(np.linalg.norm(got - expected)) <= best + 1e-5 * scale


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


@pytest.mark.parametrize(
    ("weights", "rank"),
    [
        ((0.0,), 2),  # a zero sum
        ((1.0, -1.0), 2),  # adapters that cancel
        ((1.0,), 4),  # a rank above the sum's
        ((1.0, 1.0), None),  # untrained (B = 0) sources past the full rank: the SVD path
    ],
)
def test_a_merge_whose_sum_has_fewer_directions_than_its_rank_still_learns(
    weights: tuple[float, ...], rank: int | None
) -> None:
    """The truncated SVD leaves a rank with zero rows in both A and Bᵀ wherever the sum has
    no direction for it. Such a rank has zero gradients: apply_updates reported success and
    the adapter never changed. It now gets a fresh A row (Bᵀ's stays zero, so the delta is
    the same), and learns like a new adapter."""
    src = trained(config(n_in=5, n_out=4, rank=1), seed=3)
    if rank is None:
        src = MicroLoRA(config(n_in=5, n_out=4, rank=3), seed=3)  # 3 + 3 > min(5, 4)
    merged = MicroLoRA.merge_adapters([(src, w) for w in weights], rank=rank)
    for m in (Q, V):
        expected = sum(w * delta64(src, m) for w in weights)
        np.testing.assert_allclose(merged.delta_weight(m), expected, atol=1e-6)
        a, bt = merged.factors(m)
        assert (a.any(axis=1) | bt.any(axis=1)).all()  # no rank is zero on both sides
    rng = np.random.default_rng(0)
    x, target = vec(rng, 5), vec(rng, 4)
    before = {m: merged.forward(x, m).copy() for m in (Q, V)}
    for _ in range(10):
        assert merged.adapt(x, AdaptFeedback.from_quality(1.0).with_target(target))
        assert merged.apply_updates(0.5)
    for m in (Q, V):
        err_before = np.linalg.norm(before[m] - target)
        assert np.linalg.norm(merged.forward(x, m) - target) < 0.5 * err_before
