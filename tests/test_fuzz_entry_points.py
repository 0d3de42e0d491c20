"""Fuzzing the public entry points with hostile arguments.

Every call either works or raises a ``ValueError``/``TypeError`` subclass, and a call that
raised leaves the object exactly as it was (compared through its exported state, its
statistics and its outputs on fixed probes). The async runtime is driven from hypothesis
through a blocking portal, so one running runtime takes thousands of cases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fuzzing import DIM, EXPECTED, fuzz
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sona.config import Chaos, ConsolidationStrategy, SonaLlmConfig, SupervisionConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.training_config import TrainingConfig

special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1e300])
any_array = hnp.arrays(
    dtype=st.sampled_from(
        [np.float32, np.float64, np.float16, np.int8, np.int64, np.uint8, np.bool_, np.complex64]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8),
)


def near(width: int) -> st.SearchStrategy[Any]:
    """Vectors of about the right width: right, one off, with NaN/inf/huge values, as lists."""
    good = hnp.arrays(np.float32, width, elements=st.floats(-3, 3, width=32))
    return st.one_of(
        good,
        st.tuples(good, st.integers(0, width - 1), special).map(_poke),
        hnp.arrays(np.float64, width, elements=st.floats(allow_nan=True, allow_infinity=True)),
        hnp.arrays(np.float32, st.integers(0, width + 2)),
        good.map(lambda a: a.tolist()),
        good.map(lambda a: a.reshape(1, -1)),
    )


def _poke(args: tuple[np.ndarray, int, float]) -> np.ndarray:
    arr, i, v = args
    arr = arr.copy()
    with np.errstate(over="ignore"):
        arr[i] = v
    return arr


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.lists(st.floats(), max_size=5),
    any_array,
    st.just(object()),
    st.just(np.float32(0.5)),
    st.just(np.array("text")),
)
no_text = junk.filter(lambda v: not isinstance(v, str))  # never a path into the working tree
modules = st.one_of(
    st.sampled_from([*TargetModule, None, "q_proj", "v_proj", "k_proj", "Q_PROJ", ""]), junk
)


def qualities() -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, np.nan, np.inf]), junk)


def feedbacks(width: int) -> st.SearchStrategy[Any]:
    """Valid feedback of any width, and things that are not feedback at all."""
    q = st.floats(0, 1)
    vec = hnp.arrays(np.float32, width, elements=st.floats(-2, 2, width=32))
    wrong = hnp.arrays(
        np.float32, st.sampled_from([width - 1, width + 1]), elements=st.floats(-2, 2, width=32)
    )
    return st.one_of(
        q.map(AdaptFeedback.from_quality),
        st.tuples(q, st.one_of(vec, wrong)).map(
            lambda a: AdaptFeedback.from_quality(a[0]).with_target(a[1])
        ),
        st.tuples(q, vec).map(lambda a: AdaptFeedback.from_quality(a[0]).with_gradient(a[1])),
        st.tuples(q, st.one_of(vec, wrong)).map(
            lambda a: AdaptFeedback.from_quality(a[0]).with_output(a[1])
        ),
        junk,
    )


def samples(width: int) -> st.SearchStrategy[Any]:
    q = st.floats(0, 1)
    vec = hnp.arrays(np.float32, width, elements=st.floats(-2, 2, width=32))
    other = hnp.arrays(np.float32, st.sampled_from([1, width + 3]), elements=st.floats(-1, 1))
    huge = hnp.arrays(np.float32, width, elements=st.sampled_from([-3e38, 3e38, 1e20, -1.5]))
    # inputs up to the largest norm a sample may have (‖x‖ = 1e19 for the widths used here)
    large = hnp.arrays(np.float32, width, elements=st.sampled_from([-3e18, 3e18, 1e17, -1.5]))
    return st.one_of(
        st.builds(TrainingSample, vec, vec, q),
        st.builds(TrainingSample, st.one_of(vec, other), st.one_of(vec, other), q),
        st.builds(TrainingSample, large, huge, q),  # finite, but gradients overflow float32
        st.tuples(st.builds(TrainingSample, vec, vec, q), feedbacks(width)).map(_with_feedback),
        junk,
    )


def _with_feedback(args: tuple[TrainingSample, Any]) -> Any:
    sample, fb = args
    return sample.with_feedback(fb) if isinstance(fb, AdaptFeedback) else sample


def outcome(call: Callable[[], Any], state: Callable[[], Any]) -> bool:
    """Run ``call``; True when it worked. A refusal must be documented and change nothing."""
    before = state()
    try:
        call()
    except EXPECTED:
        after = state()
        assert after == before, "a refused call changed state"
        return False
    return True


# ---------------------------------------------------------------------- values
@fuzz(700)
@given(junk | near(DIM), junk | near(DIM), qualities(), st.data())
def test_training_sample(x: Any, y: Any, q: Any, data: st.DataObject) -> None:
    try:
        s = TrainingSample(x, y, q)
    except EXPECTED:
        return
    assert np.isfinite(s.input_embedding).all() and 0.0 <= s.quality <= 1.0
    for method in ("with_query", "with_response", "with_session", "with_latency", "with_tokens"):
        arg = data.draw(junk)
        try:
            twin = getattr(s, method)(arg)
        except EXPECTED:
            continue
        assert twin is not s
    assert not s.input_embedding.flags.writeable


@fuzz(700)
@given(qualities(), junk | near(DIM), junk | any_array, st.data())
def test_adapt_feedback(q: Any, vec: Any, group: Any, data: st.DataObject) -> None:
    try:
        fb = AdaptFeedback.from_quality(q)
    except EXPECTED:
        return
    for method in ("with_output", "with_target", "with_gradient"):
        try:
            out = getattr(fb, method)(vec)
        except EXPECTED:
            continue
        assert np.isfinite(out.vector).all()
    try:
        g = AdaptFeedback.from_group(group, data.draw(junk | any_array))
    except EXPECTED:
        return
    assert g.vector is not None and np.isfinite(g.vector).all() and 0 <= g.quality <= 1


CONFIG_FIELDS = {
    SonaLlmConfig: [
        "instant_lr",
        "background_interval_ms",
        "background_min_samples",
        "deep_trigger_threshold",
        "consolidation_strategy",
        "max_pending_samples",
        "overflow",
        "replay_capacity",
        "pattern_clusters",
        "checkpoint_interval_s",
        "deep_epochs",
        "consolidated_rank",
        "micro_lora",
        "training",
        "supervision",
    ],
    MicroLoraConfig: [
        "in_features",
        "out_features",
        "rank",
        "alpha",
        "dropout",
        "target_modules",
        "explore_std",
        "advantage_temperature",
        "advantage_cap",
        "baseline_decay",
    ],
    TrainingConfig: [
        "learning_rate",
        "ewc_lambda",
        "quality_threshold",
        "fisher_samples",
        "online_ewc_gamma",
        "max_grad_norm",
        "ewc_rank",
    ],
    SupervisionConfig: ["max_restarts", "within_s", "backoff_min_s", "backoff_max_s", "jitter"],
    Chaos: ["crash_probability", "loops", "seed"],
}


@fuzz(700)
@given(st.sampled_from(sorted(CONFIG_FIELDS, key=lambda c: c.__name__)), st.data())
def test_configs(cls: Any, data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(CONFIG_FIELDS[cls]), min_size=1, max_size=3))
    values = {n: data.draw(junk | st.integers(-3, 5000) | st.floats(-1, 2)) for n in names}
    if cls is Chaos:
        values.setdefault("crash_probability", 0.1)
    try:
        cls(**values)
    except EXPECTED:
        return


# ---------------------------------------------------------------------- MicroLoRA
def lora_state(lora: MicroLoRA) -> tuple[Any, ...]:
    grads = tuple(g.tobytes() for m in lora.modules for g in lora.gradients(m))
    return lora.export_weights(), lora.pending_updates, grads


@pytest.fixture(scope="module")
def lora() -> MicroLoRA:
    return MicroLoRA(MicroLoraConfig(in_features=DIM, out_features=4, rank=2), seed=1)


@fuzz(1000)
@given(st.data())
def test_micro_lora(lora: MicroLoRA, data: st.DataObject) -> None:
    call = data.draw(st.sampled_from(["forward", "forward_add", "adapt", "step", "apply", "set"]))
    x = data.draw(near(DIM) | junk)
    module = data.draw(modules)
    state = lambda: lora_state(lora)  # noqa: E731
    if call == "forward":
        before = state()
        try:
            out = lora.forward(x, module)
        except EXPECTED:
            pass
        else:
            assert np.isfinite(out).all() or not np.isfinite(np.asarray(x, np.float64)).all()
        assert state() == before  # reading never changes the adapter
    elif call == "forward_add":
        out = data.draw(junk | hnp.arrays(np.float32, st.sampled_from([(4,), (1, 4), (3,)])))
        outcome(lambda: lora.forward_add(x, module, out), state)
    elif call == "adapt":
        fb = data.draw(feedbacks(4))
        weight = data.draw(st.one_of(st.just(1.0), st.floats(-1, 3), junk))
        outcome(lambda: lora.adapt(x, fb, module, weight=weight), state)
    elif call == "step":
        fb = data.draw(feedbacks(4))
        lr = data.draw(st.one_of(st.just(0.01), st.floats(-1, 10), junk))
        max_norm = data.draw(st.one_of(st.just(1.0), st.none(), st.floats(-1, 10), junk))
        outcome(lambda: lora.step(x, fb, lr, max_norm=max_norm, module=module), state)
    elif call == "apply":
        lr = data.draw(st.one_of(st.floats(-1, 10), junk))
        outcome(lambda: lora.apply_updates(lr, max_norm=data.draw(st.none() | st.floats())), state)
    else:
        a, bt = data.draw(junk | any_array), data.draw(junk | any_array)
        outcome(lambda: lora.set_factors(module, a, bt), state)


# ---------------------------------------------------------------------- SonaLlm
def small_config() -> SonaLlmConfig:
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM),
        background_min_samples=5,
        max_pending_samples=100_000,
        deep_trigger_threshold=1e12,
        pattern_clusters=3,
        replay_capacity=50,
        consolidation_strategy=ConsolidationStrategy.ENSEMBLE,
    )


PROBE = np.linspace(-1, 1, 3 * DIM, dtype=np.float32).reshape(3, DIM)


def engine_state(engine: SonaLlm) -> tuple[Any, ...]:
    outs = tuple(
        engine.forward(PROBE, m).tobytes() for m in engine.config.micro_lora.target_modules
    )
    return (
        engine.stats(),
        engine.instant.live.export_weights(),
        engine.background.base.export_weights(),
        outs,
    )


@pytest.fixture(scope="module")
def engine() -> SonaLlm:
    return SonaLlm(small_config(), seed=4)


@fuzz(900)
@given(st.data())
def test_sona_llm(engine: SonaLlm, data: st.DataObject) -> None:
    call = data.draw(st.sampled_from(["instant_adapt", "adapt", "submit", "forward", "deep"]))
    state = lambda: engine_state(engine)  # noqa: E731
    text_or_vec = st.one_of(st.text(max_size=12), near(DIM), junk)
    if call == "instant_adapt":
        q, r, quality = data.draw(text_or_vec), data.draw(text_or_vec), data.draw(qualities())
        outcome(lambda: engine.instant_adapt(q, r, quality), state)
    elif call == "adapt":
        x, fb, module = data.draw(near(DIM) | junk), data.draw(feedbacks(DIM)), data.draw(modules)
        outcome(lambda: engine.adapt(x, fb, module), state)
    elif call == "submit":
        s, module = data.draw(samples(DIM)), data.draw(modules)
        outcome(lambda: engine.submit(s, module=module), state)
    elif call == "forward":
        x, module = data.draw(near(DIM) | junk), data.draw(modules)
        before = state()
        with contextlib.suppress(*EXPECTED):
            engine.forward(x, module)
        assert state() == before
    else:
        batch = data.draw(st.one_of(st.lists(samples(DIM), max_size=3), junk))
        outcome(lambda: engine.deep_optimize(batch), state)


# ---------------------------------------------------------------------- SonaRuntime
class Running:
    def __init__(self, portal: BlockingPortal, rt: SonaRuntime, tmp: Path) -> None:
        self.portal = portal
        self.rt = rt
        self.tmp = tmp

    def state(self) -> tuple[Any, ...]:
        rt = self.rt
        self.portal.call(rt.drain)
        outs = tuple(rt.forward(PROBE, m).tobytes() for m in rt.config.micro_lora.target_modules)
        return (
            rt.stats(),
            rt._instant.live.export_weights(),
            rt._background.published.base.export_weights(),
            outs,
        )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("rt")
    cfg = small_config().replace(background_interval_ms=3_600_000)
    rt = SonaRuntime(cfg, seed=6, checkpoint_dir=tmp / "dir")
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(rt):
        yield Running(portal, rt, tmp)


@fuzz(1500)
@given(st.data())
def test_sona_runtime(running: Running, data: st.DataObject) -> None:
    rt, portal = running.rt, running.portal
    call = data.draw(
        st.sampled_from(
            ["submit", "submit_nowait", "adapt", "instant_adapt", "forward", "deep", "checkpoint"]
        )
    )
    state = running.state
    text_or_vec = st.one_of(st.text(max_size=12), near(DIM), junk)
    if call == "submit":
        s, module = data.draw(samples(DIM)), data.draw(modules)
        outcome(lambda: portal.call(lambda: rt.submit(s, module=module)), state)
    elif call == "submit_nowait":
        s, module = data.draw(samples(DIM)), data.draw(modules)
        outcome(lambda: portal.call(_nowait, rt, s, module), state)
    elif call == "adapt":
        x, fb, module = data.draw(near(DIM) | junk), data.draw(feedbacks(DIM)), data.draw(modules)
        outcome(lambda: portal.call(rt.adapt, x, fb, module), state)
    elif call == "instant_adapt":
        q, r, quality = data.draw(text_or_vec), data.draw(text_or_vec), data.draw(qualities())
        outcome(lambda: portal.call(rt.instant_adapt, q, r, quality), state)
    elif call == "forward":
        x, module = data.draw(near(DIM) | junk), data.draw(modules)
        before = state()
        with contextlib.suppress(*EXPECTED):
            rt.forward(x, module)
        assert state() == before
    elif call == "deep":
        batch = data.draw(st.one_of(st.lists(samples(DIM), min_size=1, max_size=3), junk))
        outcome(lambda: portal.call(lambda: rt.deep_optimize(batch)), state)
    else:
        where = data.draw(st.one_of(no_text, st.just(running.tmp), st.just(running.tmp / "dir")))
        outcome(lambda: portal.call(rt.checkpoint, where), state)


async def _nowait(rt: SonaRuntime, s: Any, module: Any) -> None:
    rt.submit_nowait(s, module=module)


@fuzz(300)
@given(st.one_of(no_text, st.text(max_size=8).map(lambda t: Path("/nonexistent") / t)), junk)
def test_restore_arguments(path: Any, config: Any) -> None:
    try:
        SonaRuntime.restore(path, config=config)
    except EXPECTED:
        return
    pytest.fail("restore accepted a path that holds no checkpoint")
