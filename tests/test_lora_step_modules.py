"""``step`` over several modules at once (module=None): the fused multi-module path.

Each module's gradient is computed into scratch (``step_fused_grad``), one decision clips on the
joint norm of every module's gradient and guards every module (``step_fused_decide``), and only
then are the weights written (``step_fused_apply``). Every outcome must be the general path's:
result, note, norm, baseline, weights, errors, and bit-identical weights on any refusal.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import K, Q, Snapshot, V, config, f64, step_weight, trained, vec, weights_bytes
from sona.kernels import lora as kl
from sona.kernels.warmup import fast, warm_up

from sona.errors import InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA

F32 = np.float32


def general_twin(lora: MicroLoRA) -> MicroLoRA:
    """A copy whose step always takes the general path."""
    twin = lora.clone()
    twin._fused_by_id.clear()
    twin._fused_all = None
    return twin


def feedback(kind: str, rng: np.random.Generator, n_out: int, q: float, scale: float = 1.0) -> Any:
    base = AdaptFeedback.from_quality(q)
    if kind == "target":
        return base.with_target(vec(rng, n_out, scale))
    if kind == "gradient":
        return base.with_gradient(vec(rng, n_out, scale))
    if kind == "output":
        return base.with_output(vec(rng, n_out, scale))
    return AdaptFeedback.from_group(
        np.stack([vec(rng, n_out, scale) for _ in range(3)]), [q, q / 2, 1.0 - q / 3]
    )


def assert_same(fast_: MicroLoRA, general: MicroLoRA, exact: bool = False) -> None:
    assert fast_.last_note == general.last_note
    assert fast_.version == general.version
    assert fast_.pending_updates == general.pending_updates == 0
    assert fast_.baseline.state() == general.baseline.state()
    if general.last_update_norm is None:
        assert fast_.last_update_norm is None
    else:
        assert fast_.last_update_norm == pytest.approx(general.last_update_norm, rel=1e-4)
    if exact:
        assert weights_bytes(fast_) == weights_bytes(general)
        return
    for (m, a, bt), (_, ga, gbt) in zip(fast_.iter_factors(), general.iter_factors(), strict=True):
        for mine, theirs in ((a, ga), (bt, gbt)):
            atol = 1e-6 * (1.0 + float(np.abs(theirs).max()))
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=atol, err_msg=m.value)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the multi-module kernels' calls (through ``fast``)."""
    warm_up()
    counts = {"grad": 0, "decide": 0, "apply": 0, "pair": 0}
    for name, attr in (("grad", "step_fused_grad"), ("decide", "step_fused_decide"),
                       ("apply", "step_fused_apply"), ("pair", "step_fused_pair")):  # fmt: skip
        real = getattr(fast, attr)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(fast, attr, spy)
    return counts


@pytest.mark.parametrize("modules", [(Q, V), (Q, K, V)])
@pytest.mark.parametrize("rank", [1, 2])
def test_module_none_takes_the_multi_module_kernels(
    modules: tuple[Any, ...], rank: int, calls: dict[str, int]
) -> None:
    lora = trained(config(n_in=16, n_out=16, rank=rank, modules=modules), seed=3)
    general = general_twin(lora)
    rng = np.random.default_rng(0)
    x = vec(rng, 16)
    fb = AdaptFeedback.from_quality(0.9).with_target(vec(rng, 16))
    assert lora.step(x, fb, 0.1)
    n = len(modules)
    # two modules (the default configuration) in one call, more in one call per phase
    want = {"grad": 0, "decide": 0, "apply": 0, "pair": 1}
    if n > 2:
        want = {"grad": n, "decide": 1, "apply": n, "pair": 0}
    assert calls == want
    assert general.step(x, fb, 0.1)
    assert calls == want  # the twin went the general way
    assert_same(lora, general)


def test_the_clip_uses_the_joint_norm_of_all_modules() -> None:
    lora = trained(config(n_in=12, n_out=10, rank=2, modules=(Q, V)), seed=4)
    before = {m: (f64(a).copy(), f64(bt).copy()) for m, a, bt in lora.iter_factors()}
    rng = np.random.default_rng(1)
    x = vec(rng, 12, scale=2.0)
    target = vec(rng, 10, scale=5.0)
    fb = AdaptFeedback.from_quality(1.0).with_target(target)
    s = lora.scaling
    grads = {}
    for m, (a, bt) in before.items():
        h = s * a @ f64(x)
        g = step_weight(x) * (bt.T @ h - f64(target))
        grads[m] = (np.outer(s * bt @ g, f64(x)), np.outer(h, g))
    joint = math.sqrt(sum(float(np.sum(da**2) + np.sum(db**2)) for da, db in grads.values()))
    max_norm = joint / 3.0  # below the joint norm, above each module's own
    assert all(math.sqrt(float(np.sum(da**2) + np.sum(db**2))) > 0 for da, db in grads.values())
    lr = 0.5
    assert lora.step(x, fb, lr, max_norm=max_norm)
    assert lora.last_update_norm == pytest.approx(max_norm, rel=1e-4)
    c = lr * max_norm / joint
    for m, a, bt in lora.iter_factors():
        da, db = grads[m]
        np.testing.assert_allclose(a, before[m][0] - c * da, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bt, before[m][1] - c * db, rtol=1e-4, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(
    rank=st.integers(1, 2),
    three=st.booleans(),
    square=st.booleans(),
    kind=st.sampled_from(["target", "gradient", "output", "group"]),
    offsets=st.sampled_from([None, "array", "one module", "list", "strided", "empty"]),
    weight=st.sampled_from([1.0, 0.5, 0.0]),
    lr=st.sampled_from([1e-3, 0.3, 5.0]),
    max_norm=st.sampled_from([None, 0.01, 1.0]),
    seed=st.integers(0, 9999),
)
def test_step_over_all_modules_takes_the_general_paths_decisions(
    rank: int,
    three: bool,
    square: bool,
    kind: str,
    offsets: str | None,
    weight: float,
    lr: float,
    max_norm: float | None,
    seed: int,
) -> None:
    n_in, n_out = (12, 12) if square else (12, 10)
    modules = (Q, K, V) if three else (Q, V)
    fast_ = trained(config(n_in=n_in, n_out=n_out, rank=rank, modules=modules), seed)
    general = general_twin(fast_)
    rng = np.random.default_rng(seed)
    # Several steps only where the dynamics are stable: large (unclipped) steps amplify float32
    # rounding differences between the paths, up to diverging.
    steps = 4 if lr == 1e-3 or (lr <= 0.3 and max_norm is not None) else 1
    for _ in range(steps):
        x = vec(rng, n_in, scale=2.0)
        fb = feedback(kind, rng, n_out, float(rng.uniform(0.1, 1.0)))
        off: dict[Any, Any] | None = None
        if offsets == "array":
            off = {m: vec(rng, n_out) for m in modules}
        elif offsets == "one module":
            off = {V: vec(rng, n_out)}
        elif offsets == "list":
            off = {Q: vec(rng, n_out), V: list(vec(rng, n_out))}
        elif offsets == "strided":
            off = {V: np.stack([vec(rng, n_out)] * 2, axis=1)[:, 0]}
        elif offsets == "empty":
            off = {}
        kw: dict[str, Any] = {"max_norm": max_norm, "weight": weight, "offsets": off}
        assert fast_.step(x, fb, lr, **kw) == general.step(x, fb, lr, **kw)
        assert_same(fast_, general)


@settings(max_examples=200, deadline=None)
@given(
    rank=st.integers(1, 2),
    kind=st.sampled_from(["target", "gradient"]),
    a_scale=st.sampled_from([1e-3, 1.0, 1e15, 1e20]),
    b_scales=st.sampled_from([(0.0, 1.0), (1.0, 1e15), (1e-3, 1e15), (1e15, 1e15), (1.0, 1.0)]),
    x_scale=st.sampled_from([1e-3, 1.0, 1e20]),
    v_scale=st.sampled_from([1.0, 1e30]),
    lr=st.sampled_from([1e-3, 1.0, 1e30]),
    max_norm=st.sampled_from([None, 1.0]),
    seed=st.integers(0, 9999),
)
def test_decisions_match_the_general_path_at_any_magnitude(
    rank: int,
    kind: str,
    a_scale: float,
    b_scales: tuple[float, float],
    x_scale: float,
    v_scale: float,
    lr: float,
    max_norm: float | None,
    seed: int,
) -> None:
    """Huge but finite weights, inputs and targets (float32 norm sums overflow and are redone
    in float64), with the modules at different magnitudes so one can fail its guard while the
    other passes: every decision is the general path's, and a refusal (or error) leaves every
    module's weights bit-identical."""
    rng = np.random.default_rng(seed)
    n_in, n_out = 40, 30
    lora = MicroLoRA(config(n_in=n_in, n_out=n_out, rank=rank, modules=(Q, V)), seed=seed)
    for m, b_scale in zip((Q, V), b_scales, strict=True):
        a = a_scale * rng.standard_normal((rank, n_in))
        bt = b_scale * rng.standard_normal((rank, n_out))
        lora.set_factors(m, a.astype(F32), bt.astype(F32))
    general = general_twin(lora)
    before = weights_bytes(lora)
    x = vec(rng, n_in, scale=x_scale)
    fb = feedback(kind, rng, n_out, 0.7, scale=v_scale)
    kw: dict[str, Any] = {"max_norm": max_norm}
    try:
        expected = general.step(x, fb, lr, **kw)
    except InvalidInputError as e:
        snap = Snapshot.of(lora)
        with pytest.raises(InvalidInputError, match=str(e)):
            lora.step(x, fb, lr, **kw)
        assert Snapshot.of(lora) == snap
        return
    assert lora.step(x, fb, lr, **kw) == expected
    assert lora.last_note == general.last_note
    if not expected:
        assert weights_bytes(lora) == before == weights_bytes(general)
        assert lora.version == general.version
        return
    assert_same(lora, general)


def test_one_module_failing_its_guard_refuses_the_whole_step() -> None:
    """Q's update is fine, V's would make delta_weight overflow: neither is written."""
    lora = MicroLoRA(config(n_in=8, n_out=8, rank=2, modules=(Q, V)), seed=2)
    # V sits just inside the bound (s·‖A‖·‖B‖ = s·16c² < float32's max), and the step below
    # grows both of its factors: h = s·A·x > 0 and a gradient of -1 push B up, and B·g < 0
    # pushes A up.
    c = F32(math.sqrt(float(np.finfo(F32).max) / (lora.scaling * 16)) * (1 - 1e-6))
    lora.set_factors(V, np.full((2, 8), c, F32), np.full((2, 8), c, F32))
    general = general_twin(lora)
    before = weights_bytes(lora)
    x = np.full(8, 0.3, F32)
    fb = AdaptFeedback.from_quality(1.0).with_gradient(np.full(8, -1.0, F32))
    for who in (lora, general):
        assert not who.step(x, fb, 1e-3, max_norm=None)
    assert lora.last_note == general.last_note
    assert lora.last_note is not None and lora.last_note.startswith("rejected")
    assert weights_bytes(lora) == before == weights_bytes(general)
    assert lora.version == general.version
    # and a later good step still goes through on both
    lora.set_factors(V, np.ones((2, 8), F32), np.ones((2, 8), F32))
    general.set_factors(V, np.ones((2, 8), F32), np.ones((2, 8), F32))
    assert lora.step(x, fb, 1e-3) and general.step(x, fb, 1e-3)
    assert_same(lora, general)


@pytest.mark.parametrize("where", ["x", "overflow", "offset Q", "offset V"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_non_finite_inputs_raise_the_general_paths_error_and_change_nothing(
    where: str, bad: float, weight: float
) -> None:
    lora = trained(config(n_in=12, n_out=10, modules=(Q, V)), seed=9)
    general = general_twin(lora)
    rng = np.random.default_rng(4)
    x, target = vec(rng, 12), vec(rng, 10)
    off = {Q: vec(rng, 10), V: vec(rng, 10)}
    if where == "x":
        x[5] = bad
    elif where == "overflow":  # finite inputs, but target − offset overflows float32
        target[3] = math.copysign(3e38, bad)
        off[V][3] = -target[3]
    else:
        off[Q if where == "offset Q" else V][7] = bad
    fb = AdaptFeedback.from_quality(0.6).with_target(target)
    with pytest.raises(Exception) as want:
        general.step(x, fb, 0.1, offsets=off, weight=weight)
    snap = Snapshot.of(lora)
    baseline = lora.baseline.state()
    with pytest.raises(type(want.value), match=str(want.value).replace("[", r"\[")):
        lora.step(x, fb, 0.1, offsets=off, weight=weight)
    assert Snapshot.of(lora) == snap
    assert lora.baseline.state() == baseline


def test_kernels_refuse_other_shapes_ranks_and_modes_before_writing() -> None:
    rng = np.random.default_rng(0)
    a, bt = rng.standard_normal((2, 6)).astype(F32), rng.standard_normal((2, 5)).astype(F32)
    x, v = vec(rng, 6), vec(rng, 5)
    row = np.zeros(kl.FUSED_SCRATCH)
    unsupported = kl.STEP_UNSUPPORTED
    grad = kl.step_fused_grad
    assert grad(a, bt, 1.0, vec(rng, 7), v, v, 1.0, kl.MODE_REGRESS, row) == unsupported
    assert grad(a, bt, 1.0, x, vec(rng, 4), v, 1.0, kl.MODE_GRADIENT, row) == unsupported
    assert grad(a, bt, 1.0, x, v, vec(rng, 4), 1.0, kl.MODE_RESIDUAL, row) == unsupported
    assert grad(a, bt, 1.0, x, v, v, 1.0, kl.MODE_NOISE, row) == unsupported
    three = rng.standard_normal((3, 6)).astype(F32), rng.standard_normal((3, 5)).astype(F32)
    assert grad(*three, 1.0, x, v, v, 1.0, kl.MODE_REGRESS, row) == unsupported
    assert grad(a, bt, 1.0, x, v, v, 1.0, kl.MODE_REGRESS, np.zeros(4)) == unsupported
    assert not row.any()
    assert grad(a, bt, 1.0, x, v, v, 1.0, kl.MODE_REGRESS, row) == 0


@pytest.mark.parametrize("rank", [1, 2])
def test_one_module_through_the_split_kernels_is_step_fused(rank: int) -> None:
    """grad + decide + apply on a single module is step_fused's step (up to the order of the
    float32 sums, which the compiler may vectorise differently in the two kernels)."""
    rng = np.random.default_rng(rank)
    for trial in range(50):
        n_in, n_out = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        a = rng.standard_normal((rank, n_in)).astype(F32)
        bt = (0.5 * rng.standard_normal((rank, n_out))).astype(F32)
        x, v, o = vec(rng, n_in, 2.0), vec(rng, n_out), vec(rng, n_out)
        mode = [kl.MODE_REGRESS, kl.MODE_GRADIENT, kl.MODE_RESIDUAL][trial % 3]
        lr, max_norm = [(1e-3, -1.0), (0.1, 1.0), (2.0, 0.01)][trial % 3]
        fa, fbt = a.copy(), bt.copy()
        r = kl.step_fused(fa, fbt, 2.0 / rank, x, v, o, 0.7, mode, lr, max_norm)
        sa, sbt = a.copy(), bt.copy()
        rows = np.zeros((1, kl.FUSED_SCRATCH))
        assert kl.step_fused_grad(sa, sbt, 2.0 / rank, x, v, o, 0.7, mode, rows[0]) == 0
        assert sa.tobytes() == a.tobytes() and sbt.tobytes() == bt.tobytes()
        r2 = kl.step_fused_decide(rows, 2.0 / rank, lr, max_norm)
        assert r2 == pytest.approx(r, rel=1e-5)
        kl.step_fused_apply(sa, sbt, x, v, o, mode, rows[0])
        np.testing.assert_allclose(sa, fa, rtol=1e-5, atol=1e-6 * float(np.abs(fa).max()))
        np.testing.assert_allclose(sbt, fbt, rtol=1e-5, atol=1e-6 * float(np.abs(fbt).max()))


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("modules", [(Q, V), (Q, K, V)])
def test_factors_beyond_float32_take_the_float64_update(
    rank: int, modules: tuple[Any, ...]
) -> None:
    """lr·h overflows float32 while the update itself is small (a tiny gradient): the step is
    computed in float64, as on the general path, and the weights stay finite."""
    cfg = config(n_in=16, n_out=16, rank=rank, modules=modules)
    lora = trained(cfg, seed=6)
    before = weights_bytes(lora)
    general = general_twin(lora)
    rng = np.random.default_rng(6)
    x = vec(rng, 16, scale=10.0)
    fb = AdaptFeedback.from_quality(1.0).with_gradient(np.full(16, 1e-37, F32))
    with np.errstate(over="ignore"):
        h = lora.scaling * lora.factors(Q)[0] @ x
        assert float(np.max(np.abs(F32(1e38) * h))) == np.inf
    assert lora.step(x, fb, 1e38, max_norm=None)
    assert general.step(x, fb, 1e38, max_norm=None)
    assert all(np.isfinite(arr).all() for _, a, bt in lora.iter_factors() for arr in (a, bt))
    assert weights_bytes(lora) != before
    assert_same(lora, general)


@pytest.mark.parametrize("call", ["step", "adapt"])
def test_a_residual_target_that_overflows_is_refused_without_a_warning(call: str) -> None:
    """target − offset beyond float32 (both finite) is refused like an overflowing gradient:
    an error, the weights unchanged, and no RuntimeWarning escaping numpy (which a host that
    turns warnings into errors would get instead)."""
    lora = trained(config(16, 16, modules=(Q,)))
    before = weights_bytes(lora)
    x = np.full(16, 0.25, F32)
    fb = AdaptFeedback.from_quality(1.0).with_target(np.full(16, 3e38, F32))
    offsets = {Q: np.full(16, -3e38, F32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInputError, match="overflows"):
            if call == "step":
                lora.step(x, fb, 0.01, offsets=offsets)
            else:
                lora.adapt(x, fb, offsets=offsets)
    assert weights_bytes(lora) == before
