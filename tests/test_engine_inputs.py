"""Bad input to every ``SonaLlm`` entry point is refused at the call and changes nothing.

API.md: every invalid argument raises a ``ValueError`` or ``TypeError`` subclass and leaves every
object unchanged. "Unchanged" is checked on everything a host could observe: the statistics,
the live adapter, the consolidated adapter(s), the pattern bank, the replay buffer and the
held-back samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest

from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.engine import SonaLlm
from sona.errors import ConfigError
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.sample import TrainingSample

D = 32
Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
K = TargetModule.K_PROJ  # not targeted


def _config(strategy: ConsolidationStrategy) -> SonaLlmConfig:
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V)),
        background_min_samples=4,
        consolidation_strategy=strategy,
        pattern_clusters=3,
    )


def _unit(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    x = rng.standard_normal((n or 1, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x if n is not None else x[0]


def _trained(strategy: ConsolidationStrategy) -> SonaLlm:
    """An engine with a consolidated state, held-back samples and pending live learning."""
    rng = np.random.default_rng(5)
    engine = SonaLlm(_config(strategy), seed=3, clock=lambda: 0.0)
    for _ in range(12):
        x = _unit(rng)
        engine.adapt(x, AdaptFeedback.from_quality(0.9).with_target(rng.standard_normal(D)))
    engine.run_background()
    for _ in range(3):
        engine.instant_adapt(_unit(rng), _unit(rng), 0.8)
    assert engine.background.held_back > 0 and engine.instant.pending
    return engine


def _fingerprint(engine: SonaLlm) -> dict[str, Any]:
    bg = engine.background
    pub = bg.published
    return {
        "stats": msgspec.structs.asdict(engine.stats()),
        "live": engine.instant.live.export_weights(),
        "base": pub.base.export_weights(),
        "ensemble": {k: a.export_weights() for k, a in pub.ensemble.items()},
        "centroids": None if pub.centroids is None else pub.centroids.tobytes(),
        "bank": (bg.bank.size, bg.bank.centroids.tobytes(), bg.bank.counts.tobytes()),
        "replay": len(bg.replay),
        "carry": [sid for sid, _ in bg.carry],
        "pending": [sid for sid, _ in engine.instant.pending],
        "version": bg.version,
        "pipeline": bg.pipeline.state_dict()[0],
    }


def _nan(v: np.ndarray) -> np.ndarray:
    out = v.copy()
    out[3] = np.nan
    return out


def _inf(v: np.ndarray) -> np.ndarray:
    out = v.copy()
    out[0] = np.inf
    return out


_rng = np.random.default_rng(11)
X = _unit(_rng)
Y = _unit(_rng)
FB = AdaptFeedback.from_quality(0.9).with_target(Y)
GOOD = TrainingSample(X, Y, 0.9)

BAD_CALLS: dict[str, Callable[[SonaLlm], object]] = {
    # instant_adapt / make_sample
    "instant_adapt query too long": lambda e: e.instant_adapt(np.zeros(D + 1), Y, 0.9),
    "instant_adapt query 2-D": lambda e: e.instant_adapt(np.zeros((2, D)), Y, 0.9),
    "instant_adapt response too short": lambda e: e.instant_adapt(X, np.zeros(D - 1), 0.9),
    "instant_adapt NaN query": lambda e: e.instant_adapt(_nan(X), Y, 0.9),
    "instant_adapt inf response": lambda e: e.instant_adapt(X, _inf(Y), 0.9),
    "instant_adapt quality above 1": lambda e: e.instant_adapt(X, Y, 1.5),
    "instant_adapt quality below 0": lambda e: e.instant_adapt(X, Y, -0.1),
    "instant_adapt quality NaN": lambda e: e.instant_adapt(X, Y, float("nan")),
    "instant_adapt quality str": lambda e: e.instant_adapt(X, Y, "0.5"),
    "instant_adapt quality bool": lambda e: e.instant_adapt(X, Y, True),
    "instant_adapt query None": lambda e: e.instant_adapt(None, Y, 0.5),
    "instant_adapt query list of str": lambda e: e.instant_adapt(["a", "b"], Y, 0.5),
    "instant_adapt complex query": lambda e: e.instant_adapt(X.astype(np.complex64), Y, 0.5),
    "make_sample quality 2": lambda e: e.make_sample("hi", "there", 2.0),
    "instant_adapt lone surrogate in query": lambda e: e.instant_adapt("caf\udce9", Y, 0.9),
    "instant_adapt lone surrogate in response": lambda e: e.instant_adapt(X, "ok \ud800", 0.9),
    "instant_adapt scalar query": lambda e: e.instant_adapt(np.float64(1.0), Y, 0.9),
    "instant_adapt quality beyond float": lambda e: e.instant_adapt(X, Y, 2**2000),
    # adapt
    "adapt x wrong shape": lambda e: e.adapt(np.zeros(D + 2), FB),
    "adapt x NaN": lambda e: e.adapt(_nan(X), FB),
    "adapt feedback not feedback": lambda e: e.adapt(X, "good"),
    "adapt feedback None": lambda e: e.adapt(X, None),
    "adapt target wrong dim": lambda e: e.adapt(
        X, AdaptFeedback.from_quality(0.9).with_target(np.zeros(D + 1))
    ),
    "adapt gradient wrong dim": lambda e: e.adapt(
        X, AdaptFeedback.from_quality(0.9).with_gradient(np.zeros(D - 1))
    ),
    "adapt group wrong dim": lambda e: e.adapt(
        X, AdaptFeedback.from_group(np.zeros((3, D + 1)), [0.1, 0.5, 0.9])
    ),
    "adapt unknown module name": lambda e: e.adapt(X, FB, module="not_a_proj"),
    "adapt untargeted module": lambda e: e.adapt(X, FB, module=K),
    "adapt module int": lambda e: e.adapt(X, FB, module=3),
    # submit
    "submit not a sample": lambda e: e.submit((X, Y, 0.9)),
    "submit input wrong dim": lambda e: e.submit(TrainingSample(np.zeros(D + 1), Y, 0.9)),
    "submit output wrong dim": lambda e: e.submit(TrainingSample(X, np.zeros(D + 1), 0.9)),
    "submit feedback target wrong dim": lambda e: e.submit(
        GOOD.with_feedback(AdaptFeedback.from_quality(0.9).with_target(np.zeros(D + 1)))
    ),
    "submit feedback gradient wrong dim": lambda e: e.submit(
        GOOD.with_feedback(AdaptFeedback.from_quality(0.9).with_gradient(np.zeros(D - 1)))
    ),
    "submit untargeted module": lambda e: e.submit(GOOD, module=K),
    "submit unknown module": lambda e: e.submit(GOOD, module="qproj"),
    # forward
    "forward x wrong dim": lambda e: e.forward(np.zeros(D + 1, np.float32), Q),
    "forward x batch wrong dim": lambda e: e.forward(np.zeros((4, D - 1), np.float32), Q),
    "forward x 3-D": lambda e: e.forward(np.zeros((2, 2, D), np.float32), Q),
    "forward x NaN": lambda e: e.forward(_nan(X), Q),
    "forward batch inf": lambda e: e.forward(np.stack([X, _inf(X)]), Q),
    "forward x text": lambda e: e.forward("hello", Q),
    "forward untargeted module": lambda e: e.forward(X, K),
    "forward unknown module": lambda e: e.forward(X, "qkv"),
    "forward module None": lambda e: e.forward(X, None),
    # deep
    "deep_optimize not samples": lambda e: e.deep_optimize([X]),
    "deep_optimize sample wrong dim": lambda e: e.deep_optimize(
        [GOOD, TrainingSample(np.zeros(D + 1), Y, 0.9)]
    ),
    "deep_optimize feedback wrong dim": lambda e: e.deep_optimize(
        [GOOD.with_feedback(AdaptFeedback.from_quality(0.9).with_target(np.zeros(D + 3)))]
    ),
    "deep_job not samples": lambda e: e.deep_job(["sample"]),
    "install_deep not an outcome": lambda e: e.install_deep("outcome"),
}


@pytest.mark.parametrize(
    "strategy", [ConsolidationStrategy.EWC_MERGE, ConsolidationStrategy.ENSEMBLE]
)
def test_every_bad_call_raises_a_value_or_type_error_and_changes_nothing(
    strategy: ConsolidationStrategy,
) -> None:
    engine = _trained(strategy)
    failures = []
    for name, call in BAD_CALLS.items():
        before = _fingerprint(engine)
        try:
            call(engine)
        except (ValueError, TypeError):
            pass
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
            continue
        else:
            failures.append(f"{name}: did not raise")
            continue
        if _fingerprint(engine) != before:
            failures.append(f"{name}: changed the engine's state")
    assert not failures, "\n".join(failures)


def test_the_error_message_names_the_argument_and_what_was_expected() -> None:
    engine = SonaLlm(_config(ConsolidationStrategy.EWC_MERGE), seed=0)
    with pytest.raises(ValueError, match=r"query.*\(32,\)"):
        engine.instant_adapt(np.zeros(33), Y, 0.5)
    with pytest.raises(ValueError, match=r"quality.*\[0, 1\]"):
        engine.instant_adapt(X, Y, 1.2)
    with pytest.raises(ValueError, match=r"target.*32"):
        engine.submit(
            GOOD.with_feedback(AdaptFeedback.from_quality(0.9).with_target(np.zeros(D + 1)))
        )
    with pytest.raises(ValueError, match="k_proj"):
        engine.forward(X, K)


def test_a_valid_call_after_refused_ones_behaves_as_on_a_fresh_engine() -> None:
    """Refused calls leave no trace: the next good sample gives the same weights and counts as
    on an engine that never saw them."""
    clean = SonaLlm(_config(ConsolidationStrategy.EWC_MERGE), seed=4)
    dirty = SonaLlm(_config(ConsolidationStrategy.EWC_MERGE), seed=4)
    for call in BAD_CALLS.values():
        with pytest.raises((ValueError, TypeError)):
            call(dirty)
    for engine in (clean, dirty):
        res = engine.adapt(X, FB)
        assert res.applied
    np.testing.assert_array_equal(clean.forward(X, Q), dirty.forward(X, Q))
    untimed = [
        msgspec.structs.replace(e.stats(), instant_avg_latency_us=0.0) for e in (clean, dirty)
    ]
    assert untimed[0] == untimed[1]


def test_constructor_refuses_a_config_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="SonaLlmConfig"):
        SonaLlm({"instant_lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SonaLlm(SonaLlmConfig(), embedder="not an embedder")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seed", "error"),
    [
        (-5, ValueError),
        (1 << 62, ValueError),
        ("abc", TypeError),
        (1.7, TypeError),
        (True, TypeError),
    ],
)
def test_seeds_are_checked_for_every_engine(seed: object, error: type[Exception]) -> None:
    from sona.config import Chaos
    from sona.runtime import SonaRuntime

    cfg = _config(ConsolidationStrategy.EWC_MERGE)
    builds = [
        lambda: SonaLlm(cfg, seed=seed),  # type: ignore[arg-type]
        lambda: SonaRuntime(cfg, seed=seed),  # type: ignore[arg-type]
    ]
    if seed != 1 << 62:  # the engines derive adapter seeds from theirs; Chaos does not
        builds.append(lambda: Chaos(crash_probability=0.1, seed=seed))  # type: ignore[arg-type]
    for build in builds:
        with pytest.raises(error, match="seed"):
            build()
    assert SonaLlm(cfg, seed=np.int32(3)).seed == 3


@pytest.mark.parametrize(
    ("loops", "error", "message"),
    [
        ("instant", TypeError, "sequence of loop names"),  # not the letters of "instant"
        (None, TypeError, "sequence of loop names"),
        (("instant", "later"), ConfigError, "unknown loops"),
    ],
)
def test_chaos_loops_must_be_a_sequence_of_loop_names(
    loops: object, error: type[Exception], message: str
) -> None:
    from sona.config import Chaos

    with pytest.raises(error, match=message):
        Chaos(crash_probability=0.1, loops=loops)  # type: ignore[arg-type]
    assert Chaos(crash_probability=0.1, loops=["deep"]).loops == ("deep",)
    assert Chaos(crash_probability=0.1, loops={"deep"}).loops == ("deep",)


def test_text_and_list_inputs_of_the_right_width_are_accepted() -> None:
    """The refusals above are not a blanket refusal: the documented conversions still work."""
    engine = SonaLlm(_config(ConsolidationStrategy.EWC_MERGE), seed=0)
    assert engine.instant_adapt("how do I sort a list", "use sorted()", 0.9).applied
    assert engine.instant_adapt(X.astype(np.float64).tolist(), Y.astype(np.float16), 0.9).applied
    assert engine.adapt(X.astype(np.float64), FB, module="v_proj").applied
    out = engine.forward(X.tolist(), "q_proj")
    assert out.shape == (D,) and out.dtype == np.float32
