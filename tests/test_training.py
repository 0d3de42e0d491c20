"""TrainingPipeline: gating, EWC++ behaviour, exact plain SGD at λ = 0, checkpoints, bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import numpy as np
import pytest

from sona.bench.tasks import SubspaceSequence
from sona.errors import ConfigError, ConfigMismatchError, FormatError, InvalidInputError
from sona.feedback import AdaptFeedback
from sona.lora import MicroLoRA, MicroLoraConfig, TargetModule
from sona.training import StepResult, TrainingConfig, TrainingPipeline, TrainingSample

Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
F32 = np.float32


def _lora(
    d: int = 32, rank: int = 2, modules: tuple[TargetModule, ...] = (Q,), seed: int = 7
) -> MicroLoRA:
    cfg = MicroLoraConfig(in_features=d, out_features=d, rank=rank, target_modules=modules)
    return MicroLoRA(cfg, seed=seed)


def _target(y: np.ndarray, quality: float = 1.0) -> AdaptFeedback:
    return AdaptFeedback.from_quality(quality).with_target(y)


def _weights(lora: MicroLoRA) -> list[np.ndarray]:
    return [arr.copy() for _, a, bt in lora.iter_factors() for arr in (a, bt)]


def _train(
    pipe: TrainingPipeline, lora: MicroLoRA, seq: SubspaceSequence, task: int, n: int, seed: int
) -> list[StepResult]:
    rng = np.random.default_rng(seed)
    x = seq.inputs(task, n, rng)
    y = seq.target_delta(task, x)
    return [pipe.train_step(lora, x[i], _target(y[i])) for i in range(n)]


def _seq(d: int = 32) -> SubspaceSequence:
    return SubspaceSequence.make(d=d, n_tasks=2, subspace_dim=4, held_out=64, seed=3)


# ---------------------------------------------------------------------- config and samples
@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("learning_rate", 0.0, ConfigError),
        ("learning_rate", float("nan"), ConfigError),
        ("ewc_lambda", -1.0, ConfigError),
        ("quality_threshold", 1.5, ConfigError),
        ("fisher_samples", 0, ConfigError),
        ("fisher_samples", 2.5, TypeError),
        ("online_ewc_gamma", 1.01, ConfigError),
        ("max_grad_norm", 0.0, ConfigError),
        ("ewc_rank", 0, ConfigError),
        ("boundary_detection", 1, TypeError),
        ("ewc_lambda", "1", TypeError),
    ],
)
def test_config_rejects_bad_values_naming_the_field(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=field):
        TrainingConfig(**{field: value})  # type: ignore[arg-type]


def test_config_defaults_follow_the_contract_and_round_trip() -> None:
    c = TrainingConfig()
    assert (c.learning_rate, c.ewc_lambda, c.quality_threshold) == (0.001, 0.1, 0.5)
    assert (c.fisher_samples, c.online_ewc_gamma, c.max_grad_norm) == (100, 0.95, 1.0)
    assert (c.ewc_rank, c.boundary_detection) == (16, True)
    assert TrainingConfig.from_dict(c.to_dict()) == c
    assert c.replace(ewc_lambda=2).ewc_lambda == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ewc_lambda = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown"):
        c.replace(lambda_=1.0)


def test_sample_copies_arrays_read_only_and_builders_return_new_instances() -> None:
    x = np.ones(4)
    y = np.zeros(3, F32)
    s = TrainingSample(x, y, 0.7)
    x[0] = 5.0
    assert s.input_embedding[0] == 1.0 and s.input_embedding.dtype == F32
    with pytest.raises(ValueError):
        s.input_embedding[0] = 2.0
    s2 = (
        s.with_query("q")
        .with_response("r")
        .with_latency(3.5)
        .with_tokens(12)
        .with_session("abc")
        .with_feedback(AdaptFeedback.from_quality(0.9).with_target(np.ones(3)))
    )
    assert (s.query, s.response, s.latency_ms, s.token_count, s.session_id) == (
        None,
        None,
        0,
        0,
        "",
    )
    assert s.feedback is None
    assert (s2.query, s2.response, s2.latency_ms, s2.token_count, s2.session_id) == (
        "q",
        "r",
        3.5,
        12,
        "abc",
    )
    assert s2.to_feedback().kind.value == "target"
    assert s.to_feedback().kind.value == "output"
    with pytest.raises(AttributeError):
        s.quality = 0.1  # type: ignore[misc]


def _sample() -> TrainingSample:
    return TrainingSample(np.ones(3), np.ones(3), 0.5)


def test_samples_pickle_and_copy_with_every_field_and_stay_read_only() -> None:
    """The immutability guard refused the default slot-state protocol: pickle, copy.copy and
    copy.deepcopy all raised AttributeError."""
    fb = AdaptFeedback.from_quality(0.75).with_gradient(np.arange(3, dtype=F32))
    sample = (
        TrainingSample(np.arange(4, dtype=F32), np.ones(3, F32), 0.75)
        .with_query("q")
        .with_response("r")
        .with_latency(2.5)
        .with_tokens(7)
        .with_session("s")
        .with_feedback(fb)
        .with_module(V)
    )
    for twin in (
        pickle.loads(pickle.dumps(sample)),
        copy.copy(sample),
        copy.deepcopy(sample),
    ):
        assert twin is not sample and repr(twin) == repr(sample)
        for name in ("quality", "query", "response", "latency_ms", "token_count", "session_id"):
            assert getattr(twin, name) == getattr(sample, name), name
        assert twin.feedback == fb and twin.module is V
        for name in ("input_embedding", "output_embedding"):
            arr = getattr(twin, name)
            assert arr.tobytes() == getattr(sample, name).tobytes()
            assert not arr.flags.writeable
            with pytest.raises(ValueError):
                arr[0] = 1.0
        with pytest.raises(AttributeError):
            twin.quality = 0.1  # type: ignore[misc]


def test_numpy_scalars_are_numbers_for_the_builders() -> None:
    s = _sample().with_latency(np.float32(2.5)).with_tokens(np.int64(7))
    assert (s.latency_ms, s.token_count) == (2.5, 7)
    assert type(s.token_count) is int


@pytest.mark.parametrize(
    ("build", "error", "name"),
    [
        (lambda: TrainingSample(np.ones(3), np.ones(3), 1.5), InvalidInputError, "quality"),
        (lambda: TrainingSample([np.nan, 1.0], np.ones(3), 0.5), InvalidInputError, "input"),
        (lambda: TrainingSample(np.ones(3), np.ones((2, 3)), 0.5), InvalidInputError, "output"),
        (lambda: TrainingSample(np.ones(3), ["a"], 0.5), TypeError, "output"),
        (lambda: TrainingSample(np.ones(3), np.ones(3), 0.5).with_latency(-1), ValueError, "ms"),
        (lambda: TrainingSample(np.ones(3), np.ones(3), 0.5).with_tokens(True), TypeError, "n"),
        (lambda: TrainingSample(np.ones(3), np.ones(3), 0.5).with_query(3), TypeError, "query"),
        (lambda: TrainingSample(np.ones(3), np.ones(3), 0.5).with_feedback(1), TypeError, "feed"),
        (lambda: TrainingSample(np.ones(3), np.ones(3), 2**2000), InvalidInputError, "quality"),
        (lambda: TrainingSample(np.ones(3), np.ones(3), np.bool_(True)), TypeError, "quality"),
        (lambda: TrainingSample(np.float64(2.0), np.ones(3), 0.5), InvalidInputError, "input"),
        (lambda: TrainingSample(np.ma.ones(3), np.ones(3), 0.5), TypeError, "masked"),
        (lambda: _sample().with_latency(10**400), InvalidInputError, "ms"),
        (lambda: _sample().with_tokens(2**64), InvalidInputError, "n"),
        (lambda: _sample().with_query("caf\udce9"), InvalidInputError, "query.*Unicode"),
        (lambda: _sample().with_response("\ud800"), InvalidInputError, "response"),
        (lambda: _sample().with_session("a\udfffb"), InvalidInputError, "session_id"),
    ],
)
def test_sample_rejects_bad_input(build: object, error: type[Exception], name: str) -> None:
    """Checked when the sample is built: text UTF-8 cannot encode would otherwise fail only when
    the durable log or a checkpoint writes the sample, taking its batch with it."""
    assert callable(build)
    with pytest.raises(error, match=name):
        build()


# ---------------------------------------------------------------------- the penalty
def test_penalty_is_zero_before_the_first_boundary_and_positive_after_once_weights_move() -> None:
    seq = _seq()
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=1.0))
    pipe.init_for_lora(lora)
    results = _train(pipe, lora, seq, 0, 300, seed=1)
    assert pipe.task_count == 0
    assert all(r.ewc_penalty == 0.0 for r in results)
    assert pipe.ewc_penalty(lora) == 0.0
    pipe.start_new_task(lora)
    assert pipe.task_count == 1
    assert pipe.ewc_penalty(lora) == pytest.approx(0.0, abs=1e-9)  # anchored at the current ΔW
    results = _train(pipe, lora, seq, 1, 50, seed=2)
    assert all(r.applied for r in results)
    assert results[-1].ewc_penalty > 0.0
    assert pipe.ewc_penalty(lora) == pytest.approx(results[-1].ewc_penalty, rel=1e-5)


def test_lambda_zero_reproduces_plain_sgd_bit_for_bit() -> None:
    seq = _seq()
    config = TrainingConfig(learning_rate=0.05, ewc_lambda=0.0, max_grad_norm=0.5)
    pipe = TrainingPipeline(config)
    trained = _lora(modules=(Q, V))
    plain = _lora(modules=(Q, V))
    pipe.init_for_lora(trained)
    rng = np.random.default_rng(4)
    for task in (0, 1):
        if task:
            pipe.start_new_task(trained)
        x = seq.inputs(task, 200, rng)
        y = seq.target_delta(task, x)
        for i in range(200):
            r = pipe.train_step(trained, x[i], _target(y[i]))
            assert r.applied and r.ewc_penalty == 0.0
            assert plain.adapt(x[i], _target(y[i]))
            assert plain.apply_updates(0.05, max_norm=0.5)
    for got, want in zip(_weights(trained), _weights(plain), strict=True):
        assert np.array_equal(got, want)


def test_positive_lambda_departs_from_sgd_after_a_boundary_and_reduces_forgetting() -> None:
    seq = _seq()
    quality: dict[float, list[float]] = {}
    for lam in (0.0, 10.0):
        lora = _lora()
        pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=lam))
        _train(pipe, lora, seq, 0, 600, seed=5)
        learned = seq.adapter_quality(lora, 0, Q)
        pipe.start_new_task(lora)
        _train(pipe, lora, seq, 1, 600, seed=6)
        quality[lam] = [learned, seq.adapter_quality(lora, 0, Q), seq.adapter_quality(lora, 1, Q)]
    sgd, ewc = quality[0.0], quality[10.0]
    assert sgd[0] == ewc[0] > 0.95  # identical until the first boundary
    assert sgd[0] - sgd[1] > 0.05  # plain SGD forgets task 0
    assert ewc[0] - ewc[1] < 0.005  # EWC++ keeps it
    assert ewc[2] > 0.95  # and still learns task 1


def _rounding_floor(pipe: TrainingPipeline, lora: MicroLoRA, lam: float) -> float:
    """λ·Σⱼ cⱼ·‖4ε·|s·Bᵀᵀ|·|A|·|uⱼ|‖²: how far rounding each factor to float32 (and the
    anchor) can move the penalty's residuals ΔW·uⱼ − mⱼ, with ε float32's epsilon."""
    ewc = pipe._ewc
    assert ewc is not None
    a, bt = (np.abs(f.astype(np.float64)) for f in lora.factors(Q))
    mag = lora.scaling * bt.T @ (a @ np.abs(ewc.ut.astype(np.float64)).T)  # (out, k)
    eps = float(np.finfo(np.float32).eps)
    return lam * float(np.sum(ewc.c.astype(np.float64) * (4.0 * eps * mag) ** 2))


@pytest.mark.parametrize(("lam", "lr"), [(1e4, 0.5), (1e6, 0.5), (1e6, 0.05)])
@pytest.mark.parametrize("seed", range(8))
def test_huge_lambda_stays_finite_and_holds_old_task_exactly(
    lam: float, lr: float, seed: int
) -> None:
    """τ = 2·lr·λ from 1e4 to 1e6, with gradient steps as large as the weights (lr 0.5, clip
    10): whatever the seeds, every EWC++ step only lowers the penalty the gradient step left
    (checked on a clone that takes the gradient step alone), so the weights stay finite and
    task 0 is held. Proximal in exact arithmetic is not enough: steps whose r×r systems were
    built from float32 products raised the penalty up to 1e19-fold and forgot task 0.

    "Lowers" holds down to the penalty float32 weights can resolve: with ΔW near 1e3 the step
    brings the penalty to where rounding A and Bᵀ moves it by as much (:func:`_rounding_floor`),
    and from there a step can land a little above the gradient step's."""
    seq = _seq()
    lora = _lora(seed=100 + seed)
    pipe = TrainingPipeline(TrainingConfig(learning_rate=lr, ewc_lambda=lam, max_grad_norm=10.0))
    _train(pipe, lora, seq, 0, 300, seed=2 * seed)
    before = seq.adapter_quality(lora, 0, Q)
    pipe.start_new_task(lora)
    rng = np.random.default_rng(2 * seed + 1)
    x = seq.inputs(1, 300, rng)
    y = seq.target_delta(1, x)
    for i in range(300):
        alone = lora.clone()
        assert alone.adapt(x[i], _target(y[i]))
        assert alone.apply_updates(lr, max_norm=10.0)
        after_gradient = pipe.ewc_penalty(alone)
        res = pipe.train_step(lora, x[i], _target(y[i]))
        assert res.applied and not res.notes, (i, res.notes)
        assert np.isfinite(res.ewc_penalty)
        floor = max(_rounding_floor(pipe, alone, lam), _rounding_floor(pipe, lora, lam))
        assert res.ewc_penalty <= after_gradient * (1 + 1e-3) + floor, (i, after_gradient, floor)
    assert all(np.isfinite(w).all() for w in _weights(lora))
    assert pipe.ewc_penalty(lora) < 1e-2 * lam
    assert seq.adapter_quality(lora, 0, Q) == pytest.approx(before, abs=1e-3)


def test_a_step_after_a_boundary_is_a_gradient_step_then_a_proximal_step_of_2_lr_lambda() -> None:
    """τ = 2·η·λ (the proximal step of η·λ·‖(ΔW − ΔW*)·C^½‖²), and the reported penalty is λ
    times the raw one the step leaves: checked on a clone stepped by hand, with λ ≠ 1."""
    seq = _seq()
    lr, lam = 0.05, 3.0
    lora = _lora()
    config = TrainingConfig(learning_rate=lr, ewc_lambda=lam, boundary_detection=False)
    pipe = TrainingPipeline(config)
    _train(pipe, lora, seq, 0, 100, seed=1)
    pipe.start_new_task(lora)
    rng = np.random.default_rng(2)
    x = seq.inputs(1, 20, rng)
    y = seq.target_delta(1, x)
    for i in range(20):
        ref = lora.clone()
        assert ref.adapt(x[i], _target(y[i]))
        assert ref.apply_updates(lr, max_norm=config.max_grad_norm)
        raw = pipe.prox_step(ref, 2.0 * lr * lam)
        res = pipe.train_step(lora, x[i], _target(y[i]))
        assert res.applied and not res.notes
        for got, want in zip(_weights(lora), _weights(ref), strict=True):
            np.testing.assert_array_equal(got, want)
        assert raw > 0.0
        assert res.ewc_penalty == pytest.approx(lam * raw, rel=1e-6)
        assert pipe.ewc_penalty(lora) == pytest.approx(res.ewc_penalty, rel=1e-5)


def test_start_new_task_empties_the_window_so_a_task_is_folded_in_once() -> None:
    """The next task's importance comes from its own inputs: the ended task's inputs count
    once, decayed by gamma at each later boundary, not again at the next boundary."""
    rng = np.random.default_rng(1)
    config = TrainingConfig(online_ewc_gamma=0.5, boundary_detection=False, ewc_rank=8)
    lora = _lora()
    pipe = TrainingPipeline(config)
    pipe.init_for_lora(lora)
    first = np.zeros((50, 32), F32)
    first[:, :2] = rng.standard_normal((50, 2))
    second = np.zeros((20, 32), F32)  # fewer than fisher_samples: the window is not full
    second[:, 2:4] = rng.standard_normal((20, 2))
    for x in first:
        pipe.observe(x)
    pipe.start_new_task(lora)
    for x in second:
        pipe.observe(x)
    pipe.start_new_task(lora)
    _, arrays = pipe.state_dict()
    ut = arrays["ewc.ut"].astype(np.float64)
    cov = ut.T @ np.diag(arrays["ewc.c"]) @ ut
    old = np.linalg.eigvalsh(cov[:2, :2]).max()  # each task's importance is normalised to max 1
    new = np.linalg.eigvalsh(cov[2:4, 2:4]).max()
    assert new == pytest.approx(1.0, rel=1e-4)
    assert old == pytest.approx(0.5, rel=1e-4)  # the first task decayed by gamma once


# ---------------------------------------------------------------------- gating
@pytest.mark.parametrize("kind", ["target", "gradient"])
def test_quality_threshold_gates_target_and_gradient_feedback(kind: str) -> None:
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, quality_threshold=0.6))
    x = np.random.default_rng(0).standard_normal(32).astype(F32)
    vec = np.ones(32, F32)

    def fb(q: float) -> AdaptFeedback:
        base = AdaptFeedback.from_quality(q)
        return base.with_target(vec) if kind == "target" else base.with_gradient(vec)

    before = _weights(lora)
    low = pipe.train_step(lora, x, fb(0.59))
    assert not low.applied and "quality_threshold" in low.notes[0]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(lora), before, strict=True))
    assert lora.pending_updates == 0
    high = pipe.train_step(lora, x, fb(0.6))
    assert high.applied
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(lora), before, strict=True))


def test_rated_outputs_use_their_baseline_not_the_threshold_but_replay_is_gated() -> None:
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, quality_threshold=0.6))
    rng = np.random.default_rng(1)
    x = rng.standard_normal(32).astype(F32)
    out = rng.standard_normal(32).astype(F32)
    rated = AdaptFeedback.from_quality(0.2).with_output(out)
    assert pipe.train_step(lora, x, rated).applied  # below threshold, still learned from
    low = TrainingSample(x, out, 0.2)
    before = _weights(lora)
    (res,) = pipe.replay(lora, [low])
    assert not res.applied and "replayed" in res.notes[0]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(lora), before, strict=True))
    seen = pipe.samples_seen
    good = TrainingSample(x, out, 0.9)
    assert pipe.train_sample(lora, good, replay=True).applied
    assert pipe.samples_seen == seen  # replayed inputs are not new traffic


def test_declined_feedback_is_reported_and_changes_nothing() -> None:
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig())
    before = _weights(lora)
    res = pipe.train_step(lora, np.ones(32, F32), AdaptFeedback.from_quality(0.9))
    assert not res.applied and "declined" in res.notes[0]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(lora), before, strict=True))


def test_a_replayed_sample_at_exactly_the_threshold_is_learned_from() -> None:
    """Replay skips samples *below* quality_threshold, as train_step gates feedback below it."""
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, quality_threshold=0.6))
    rng = np.random.default_rng(2)
    x = rng.standard_normal(32).astype(F32)
    out = rng.standard_normal(32).astype(F32)
    target = AdaptFeedback.from_quality(0.6).with_target(out)
    before = _weights(lora)
    (res,) = pipe.replay(lora, [TrainingSample(x, out, 0.6).with_feedback(target)])
    assert res.applied, res.notes
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(lora), before, strict=True))


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_argument_and_changes_nothing() -> None:
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig())
    pipe.init_for_lora(lora)
    before = _weights(lora)
    state = pipe.state_dict()
    good = _target(np.ones(32, F32))
    with pytest.raises(InvalidInputError, match="input"):
        pipe.train_step(lora, np.ones(31, F32), good)
    with pytest.raises(InvalidInputError, match="input"):
        pipe.train_step(lora, np.full(32, np.nan, F32), good)
    with pytest.raises(TypeError, match="input"):
        pipe.train_step(lora, ["x"] * 32, good)
    with pytest.raises(InvalidInputError, match="target"):
        pipe.train_step(lora, np.ones(32, F32), _target(np.ones(5, F32)))
    with pytest.raises(TypeError, match="feedback"):
        pipe.train_step(lora, np.ones(32, F32), 0.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="module"):
        pipe.train_step(lora, np.ones(32, F32), good, module=V)
    with pytest.raises(InvalidInputError, match="module"):  # refused even when gated
        pipe.train_step(lora, np.ones(32, F32), _target(np.ones(32, F32), 0.1), module=V)
    with pytest.raises(TypeError, match="lora"):
        pipe.train_step(object(), np.ones(32, F32), good)  # type: ignore[arg-type]
    with pytest.raises(ConfigMismatchError):
        pipe.train_step(_lora(d=16), np.ones(16, F32), _target(np.ones(16, F32)))
    with pytest.raises(TypeError, match="config"):
        TrainingPipeline({"learning_rate": 0.1})  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(lora), before, strict=True))
    after = pipe.state_dict()
    assert after[0] == state[0]
    assert all(np.array_equal(after[1][k], v) for k, v in state[1].items())


def _state(pipe: TrainingPipeline, lora: MicroLoRA) -> tuple[object, ...]:
    meta, arrays = pipe.state_dict()
    named = sorted((k, v.tobytes()) for k, v in arrays.items())
    return pipe.initialized, meta, named, [w.tobytes() for w in _weights(lora)], lora.version


@pytest.mark.parametrize(
    "call",
    [
        lambda p, lora: p.train_step(lora, np.ones(31, F32), _target(np.ones(32, F32))),
        lambda p, lora: p.train_step(lora, np.full(32, np.nan, F32), _target(np.ones(32, F32))),
        lambda p, lora: p.train_step(lora, np.ones(32, F32), _target(np.ones(5, F32))),
        lambda p, lora: p.train_step(lora, np.ones(32, F32), None),
        lambda p, lora: p.train_step(lora, np.ones(32, F32), _target(np.ones(32, F32)), V),
        lambda p, lora: p.train_sample(
            lora, TrainingSample(np.ones(31, F32), np.ones(32, F32), 0.9), replay=True
        ),
        lambda p, lora: p.track(lora, np.ones(31, F32)),
        lambda p, lora: p.track_many(lora, np.full((2, 32), np.inf, F32)),
    ],
)
def test_bad_input_leaves_an_unused_pipeline_unset(call: object) -> None:
    """The pipeline sets itself up on first use; a first call that is refused must not."""
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig())
    before = _state(pipe, lora)
    with pytest.raises((InvalidInputError, TypeError)):
        call(pipe, lora)  # type: ignore[operator]
    assert not pipe.initialized
    assert _state(pipe, lora) == before


def test_a_gradient_the_adapter_refuses_is_not_counted_as_traffic() -> None:
    """``adapt`` raises for a finite gradient whose s·Bᵀg overflows float32; the input used
    to be fed to the importance window and the shift detector (and counted in samples_seen)
    before that, so a refused call changed the pipeline."""
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(fisher_samples=8))
    rng = np.random.default_rng(0)
    for _ in range(4):
        pipe.train_step(lora, rng.standard_normal(32).astype(F32), _target(np.ones(32, F32)))
    a, bt = lora.factors(Q)
    lora.set_factors(Q, a, np.full_like(bt, 1e10))
    before = _state(pipe, lora)
    huge = AdaptFeedback.from_quality(0.9).with_gradient(np.full(32, 3e38, F32))
    with pytest.raises(InvalidInputError, match="overflows"):
        pipe.train_step(lora, np.ones(32, F32), huge)
    assert _state(pipe, lora) == before
    assert pipe.samples_seen == 4 and lora.pending_updates == 0


def test_tracking_rows_one_by_one_or_as_a_batch_starts_the_same_tasks_at_the_same_samples() -> None:
    """track_many promises the boundaries and window of track called row by row: which inputs
    belong to the ended task (and so to its importance), and where each new task began."""
    seq = _seq()
    rng = np.random.default_rng(3)
    xs = np.concatenate([seq.inputs(0, 300, rng), seq.inputs(1, 300, rng)])
    config = TrainingConfig(fisher_samples=40)
    one, many = TrainingPipeline(config), TrainingPipeline(config)
    lora_one, lora_many = _lora(), _lora()
    one.init_for_lora(lora_one)
    many.init_for_lora(lora_many)
    fired_one = [i for i, x in enumerate(xs) if one.track(lora_one, x)]
    fired_many = many.track_many(lora_many, xs)
    assert fired_one == fired_many and len(fired_one) >= 1
    assert one.boundary_samples == many.boundary_samples
    assert one.samples_seen == many.samples_seen == len(xs)
    (meta_one, arr_one), (meta_many, arr_many) = one.state_dict(), many.state_dict()
    assert meta_one["window"] == meta_many["window"]
    np.testing.assert_array_equal(arr_one["window.inputs"], arr_many["window.inputs"])
    ut_one, ut_many = arr_one["ewc.ut"].astype(np.float64), arr_many["ewc.ut"].astype(np.float64)
    cov_one = ut_one.T @ np.diag(arr_one["ewc.c"]) @ ut_one
    cov_many = ut_many.T @ np.diag(arr_many["ewc.c"]) @ ut_many
    np.testing.assert_allclose(cov_one, cov_many, atol=1e-5)


# ---------------------------------------------------------------------- observe and checkpoints
def test_observe_counts_inputs_toward_the_next_importance() -> None:
    seq = _seq()
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=1.0))
    with pytest.raises(InvalidInputError, match="init_for_lora"):
        pipe.observe(np.ones(32, F32))
    pipe.init_for_lora(lora)
    trainer = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=0.0))
    _train(trainer, lora, seq, 0, 300, seed=1)  # learn task 0 elsewhere; pipe only observes
    for x in seq.inputs(0, 50, np.random.default_rng(2)):
        pipe.observe(x)
    pipe.start_new_task(lora)
    _train(pipe, lora, seq, 1, 20, seed=3)
    assert pipe.ewc_penalty(lora) > 0.0


def test_state_dict_round_trip_continues_identically() -> None:
    seq = _seq()
    config = TrainingConfig(learning_rate=0.05, ewc_lambda=5.0, fisher_samples=40)
    lora = _lora()
    pipe = TrainingPipeline(config)
    _train(pipe, lora, seq, 0, 200, seed=1)
    pipe.start_new_task(lora)
    _train(pipe, lora, seq, 1, 100, seed=2)
    meta, arrays = pipe.state_dict()
    meta = json.loads(json.dumps(meta))  # the metadata must survive JSON
    twin_lora = lora.clone()
    twin = TrainingPipeline(config)
    twin.load_state_dict(meta, arrays)
    assert twin.task_count == pipe.task_count == 1
    a = _train(pipe, lora, seq, 1, 100, seed=3)
    b = _train(twin, twin_lora, seq, 1, 100, seed=3)
    assert [r.ewc_penalty for r in a] == [r.ewc_penalty for r in b]
    for got, want in zip(_weights(twin_lora), _weights(lora), strict=True):
        assert np.array_equal(got, want)


def test_load_state_dict_refuses_mismatches_and_leaves_the_pipeline_unchanged() -> None:
    seq = _seq()
    lora = _lora()
    pipe = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=1.0))
    _train(pipe, lora, seq, 0, 150, seed=1)
    pipe.start_new_task(lora)
    meta, arrays = pipe.state_dict()
    other = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=2.0))
    with pytest.raises(ConfigMismatchError):
        other.load_state_dict(meta, arrays)
    twin = TrainingPipeline(TrainingConfig(learning_rate=0.05, ewc_lambda=1.0))
    broken = dict(arrays)
    broken["ewc.ut"] = np.full_like(arrays["ewc.ut"], np.nan)
    with pytest.raises(FormatError):
        twin.load_state_dict(meta, broken)
    assert not twin.initialized and twin.task_count == 0
    missing = {k: v for k, v in arrays.items() if not k.startswith("ewc.anchor")}
    with pytest.raises(FormatError):
        twin.load_state_dict(meta, missing)
    with pytest.raises(FormatError):
        twin.load_state_dict({**meta, "format": "other"}, arrays)
    twin.load_state_dict(meta, arrays)
    assert twin.ewc_penalty(lora) == pytest.approx(pipe.ewc_penalty(lora))
