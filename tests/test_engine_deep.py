"""The Deep loop through the engine: its trigger, what it replays and reports, and installing
a result when the Background loop has moved on meanwhile."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lora_reference import near_float32_max

from sona.config import ConsolidationStrategy as CS
from sona.config import SonaLlmConfig
from sona.deep import DeepJob, run_deep
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.objective import measurable
from sona.sample import TrainingSample
from sona.training_config import TrainingConfig

D = 32
Q = TargetModule.Q_PROJ
V = TargetModule.V_PROJ
F32_MAX = float(np.finfo(np.float32).max)


def _config(**changes: object) -> SonaLlmConfig:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q, V)),
        background_min_samples=5,
        deep_trigger_threshold=5.0,
        deep_epochs=2,
        instant_lr=0.05,
    )
    return cfg.replace(**changes)


class Stream:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.w = (self.rng.standard_normal((D, D)) / math.sqrt(D)).astype(np.float32)

    def feed(self, engine: SonaLlm, n: int, q: float = 0.9) -> None:
        for _ in range(n):
            x = self.rng.standard_normal(D).astype(np.float32)
            x /= np.linalg.norm(x)
            engine.adapt(x, AdaptFeedback.from_quality(q).with_target(self.w @ x))

    def samples(self, n: int) -> list[TrainingSample]:
        """``n`` target samples (unnormalised inputs, quality 0.9), for explicit replays."""
        out = []
        for _ in range(n):
            x = self.rng.standard_normal(D).astype(np.float32)
            fb = AdaptFeedback.from_quality(0.9).with_target(self.w @ x)
            out.append(TrainingSample(x, self.w @ x, 0.9).with_feedback(fb))
        return out


PROBE = np.random.default_rng(77).standard_normal((8, D)).astype(np.float32)


def _published(engine: SonaLlm) -> np.ndarray:
    pub = engine.background.published
    return np.stack([pub.predict(PROBE, m) for m in (Q, V)])


# ---------------------------------------------------------------------- trigger
def test_fires_when_accumulated_quality_passes_the_threshold_and_resets_after_a_run() -> None:
    engine = SonaLlm(_config(deep_trigger_threshold=3.0), seed=0, clock=lambda: 0.0)
    stream = Stream(0)
    assert not engine.should_trigger_deep()
    stream.feed(engine, 3, q=0.9)  # 2.7
    assert not engine.should_trigger_deep()
    stream.feed(engine, 2, q=0.3)  # below quality_threshold: skipped, not accumulated
    assert engine.stats().skipped_count == 2
    assert not engine.should_trigger_deep()
    stream.feed(engine, 1, q=0.9)  # 3.6
    assert engine.stats().accumulated_quality == pytest.approx(3.6)
    assert not engine.should_trigger_deep()  # nothing consolidated yet: nothing to replay
    engine.run_background()  # consolidation does not reset the Deep trigger
    assert engine.should_trigger_deep()
    engine.deep_optimize()
    assert not engine.should_trigger_deep()
    assert engine.stats().accumulated_quality == 0.0
    stream.feed(engine, 4, q=0.9)
    assert engine.should_trigger_deep()


def test_fires_once_accumulated_quality_reaches_the_threshold_exactly() -> None:
    engine = SonaLlm(_config(deep_trigger_threshold=1.5), seed=0, clock=lambda: 0.0)
    stream = Stream(0)
    stream.feed(engine, 3, q=0.5)  # 1.5 exactly: halves add up without rounding
    engine.run_background()
    assert engine.stats().accumulated_quality == 1.5
    assert engine.should_trigger_deep()


# ---------------------------------------------------------------------- what it does
def _held_out(samples: list[TrainingSample]) -> list[TrainingSample]:
    """The newest 10 % (at least one) measurable samples, never the oldest one."""
    want = max(1, int(0.1 * len(samples)))
    idx = [i for i in range(len(samples) - 1, 0, -1) if measurable(samples[i])][:want]
    return [samples[i] for i in sorted(idx)]


def _objective(engine: SonaLlm, rows: list[TrainingSample], module: TargetModule) -> float:
    pub = engine.background.published
    x = np.stack([s.input_embedding for s in rows])
    pred = pub.predict(x, module).astype(np.float64)
    total = 0.0
    for s, p in zip(rows, pred, strict=True):
        fb = s.to_feedback()
        assert fb.vector is not None
        err = p - fb.vector
        total += 0.5 * fb.quality * float(err @ err)
    return total / len(rows)


def test_replays_the_kept_samples_and_reports_a_measured_quality_delta() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    stream = Stream(1)
    for _ in range(3):
        stream.feed(engine, 20)
        engine.run_background()
    kept = list(engine.background.replay)
    assert len(kept) == engine.stats().replay_size > 40
    held = _held_out(kept)
    before = {m: _objective(engine, held, m) for m in (Q, V)}
    published_before = _published(engine)
    live_before = engine.instant.live.export_weights()
    version = engine.background.version
    result = engine.deep_optimize()
    assert result.installed and not any("moved" in n for n in result.notes)
    assert result.epochs == 2
    assert result.evaluated_on == len(held)
    assert result.samples_used == len(kept) - len(held)
    assert engine.stats().deep_count == 1
    assert engine.background.version == version + 1
    assert np.abs(_published(engine) - published_before).max() > 1e-4  # it changed weights
    assert engine.instant.live.export_weights() == live_before  # and left the live adapter
    after = {m: _objective(engine, held, m) for m in (Q, V)}
    expected = float(np.mean([(before[m] - after[m]) / before[m] for m in (Q, V)]))
    assert result.quality_delta == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_more_epochs_move_the_weights_further() -> None:
    moved = []
    for epochs in (1, 4):
        engine = SonaLlm(_config(deep_epochs=epochs), seed=1, clock=lambda: 0.0)
        Stream(2).feed(engine, 40)
        engine.run_background()
        before = _published(engine)
        assert engine.deep_optimize().epochs == epochs
        moved.append(float(np.abs(_published(engine) - before).max()))
    assert moved[1] > moved[0] > 0.0


def test_replays_explicit_samples_when_given() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    Stream(3).feed(engine, 20)
    engine.run_background()
    samples = Stream(4).samples(30)
    result = engine.deep_optimize(samples)
    assert result.samples_used == 30 - 3
    assert result.evaluated_on == 3
    assert engine.stats().replay_size == 18  # the kept samples themselves are left alone


def test_samples_below_the_quality_threshold_are_not_replayed() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    other = Stream(5)
    samples = []
    for i in range(20):
        x = other.rng.standard_normal(D).astype(np.float32)
        q = 0.9 if i % 2 else 0.2
        fb = AdaptFeedback.from_quality(q).with_target(other.w @ x)
        samples.append(TrainingSample(x, other.w @ x, q).with_feedback(fb))
    result = engine.deep_optimize(samples)
    assert result.samples_used == 9  # 18 trained on, half of them too poor
    assert any("below quality_threshold" in n for n in result.notes), result.notes


def test_samples_at_exactly_the_quality_threshold_are_replayed() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    threshold = engine.config.training.quality_threshold
    other = Stream(5)
    samples = []
    for i in range(20):
        x = other.rng.standard_normal(D).astype(np.float32)
        q = threshold if i % 2 else 0.2
        fb = AdaptFeedback.from_quality(q).with_target(other.w @ x)
        samples.append(TrainingSample(x, other.w @ x, q).with_feedback(fb))
    result = engine.deep_optimize(samples)
    assert result.samples_used == 9  # 18 trained on, the 9 rated 0.2 left out


def test_a_run_over_more_samples_than_it_replays_draws_them_from_all_the_older_ones() -> None:
    """At most MAX_REPLAY samples are trained on, drawn at random from every sample not held
    out (kept in their order), not the oldest MAX_REPLAY: newer traffic takes part too."""
    from sona import deep

    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    samples = Stream(6).samples(deep.MAX_REPLAY + 400)
    position = {s.input_embedding.tobytes(): i for i, s in enumerate(samples)}
    job = engine.deep_job(samples)
    assert len(job.train) == deep.MAX_REPLAY
    train = [position[s.input_embedding.tobytes()] for s in job.train]
    held = [position[s.input_embedding.tobytes()] for s in job.held]
    assert train == sorted(train) and not set(train) & set(held)
    assert min(held) > max(train)  # the newest are held out
    assert max(train) >= deep.MAX_REPLAY  # drawn beyond the oldest MAX_REPLAY
    assert train != list(range(deep.MAX_REPLAY))


def test_nothing_kept_means_nothing_replayed_measured_installed_or_counted() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    before = _published(engine)
    version = engine.background.version
    result = engine.deep_optimize()
    assert (result.samples_used, result.epochs, result.installed) == (0, 0, False)
    assert result.quality_delta is None
    assert any("nothing to replay" in n for n in result.notes), result.notes
    assert engine.stats().deep_count == 0
    assert engine.background.version == version
    np.testing.assert_array_equal(_published(engine), before)


@pytest.mark.parametrize("samples", [None, [], ()])
def test_a_call_with_no_sample_to_look_at_keeps_the_accumulated_quality(
    samples: list[TrainingSample] | None,
) -> None:
    """deep_optimize() before the first consolidation, or on an empty list, runs nothing and
    is not counted; it used to reset the accumulated quality all the same, so the automatic
    trigger lost what it had counted toward the first real run."""
    engine = SonaLlm(_config(deep_trigger_threshold=3.0), seed=0, clock=lambda: 0.0)
    Stream(0).feed(engine, 4, q=0.9)
    result = engine.deep_optimize(samples)
    assert (result.epochs, result.installed) == (0, False)
    s = engine.stats()
    assert s.deep_count == 0 and s.accumulated_quality == pytest.approx(3.6)
    engine.run_background()
    assert engine.should_trigger_deep()
    assert engine.deep_optimize().epochs == engine.config.deep_epochs
    assert engine.stats().accumulated_quality == 0.0


@pytest.mark.parametrize("samples", ["abc", b"abc", 5, object()])
def test_samples_that_are_not_an_iterable_of_samples_are_refused_changing_nothing(
    samples: object,
) -> None:
    engine = SonaLlm(_config(deep_trigger_threshold=3.0), seed=0, clock=lambda: 0.0)
    Stream(0).feed(engine, 4, q=0.9)
    before = engine.stats()
    with pytest.raises(TypeError, match="samples"):
        engine.deep_optimize(samples)  # type: ignore[arg-type]
    assert engine.stats() == before


def test_a_single_sample_instead_of_a_list_is_refused_naming_samples() -> None:
    """It used to raise "'TrainingSample' object is not iterable", naming no argument."""
    engine = SonaLlm(_config(), seed=0, clock=lambda: 0.0)
    one = TrainingSample(np.ones(D, np.float32), np.ones(D, np.float32), 0.9)
    with pytest.raises(TypeError, match="samples must be an iterable"):
        engine.deep_optimize(one)  # type: ignore[arg-type]


def test_gradient_only_replay_has_no_measurable_quality_delta() -> None:
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    rng = np.random.default_rng(6)
    for _ in range(20):
        x = rng.standard_normal(D).astype(np.float32)
        engine.adapt(x, AdaptFeedback.from_quality(0.9).with_gradient(rng.standard_normal(D)))
    engine.run_background()
    result = engine.deep_optimize()
    assert result.samples_used == 20
    assert result.quality_delta is None and result.evaluated_on == 0
    assert any("measurable" in n for n in result.notes)


def test_samples_too_large_for_float32_are_skipped_with_a_note() -> None:
    """Finite but huge outputs (3e38) would overflow every step and prediction: the run skips
    them, says so, and keeps everything finite. (Such inputs are refused by TrainingSample.)"""
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    stream = Stream(3)
    stream.feed(engine, 20)
    engine.run_background()
    huge = np.full(D, 3e38, np.float32)
    x = np.ones(D, np.float32) / math.sqrt(D)
    fb = AdaptFeedback.from_quality(0.9).with_target(stream.w @ x)
    normal = TrainingSample(x, stream.w @ x, 0.9).with_feedback(fb)
    other = TrainingSample(-x, stream.w @ -x, 0.9).with_feedback(
        AdaptFeedback.from_quality(0.9).with_target(stream.w @ -x)
    )
    samples = [TrainingSample(x, huge, 0.9), normal, TrainingSample(1e18 * x, -huge, 0.8)]
    samples += [TrainingSample(-x, huge, 0.9), other, TrainingSample(-1e18 * x, -huge, 0.8)]
    result = engine.deep_optimize(samples)
    assert any("4 samples too large" in n for n in result.notes), result.notes
    assert result.samples_used + result.evaluated_on == 2
    assert np.isfinite(_published(engine)).all()
    bank = engine.background.bank
    assert np.isfinite(bank.centroids[: len(bank)]).all()


def test_deep_is_deterministic_given_the_seed() -> None:
    outs = []
    for _ in range(2):
        engine = SonaLlm(_config(), seed=9, clock=lambda: 0.0)
        Stream(7).feed(engine, 30)
        engine.run_background()
        engine.deep_optimize()
        outs.append(_published(engine))
    np.testing.assert_array_equal(outs[0], outs[1])


# ---------------------------------------------------------------------- installing
def test_installing_after_background_moved_re_applies_the_change_on_top() -> None:
    cfg = _config(consolidated_rank=D)  # room for every rank: the re-application is exact
    engine = SonaLlm(cfg, seed=2, clock=lambda: 0.0)
    stream = Stream(8)
    stream.feed(engine, 30)
    engine.run_background()
    job = engine.deep_job()
    assert isinstance(job, DeepJob)
    start = {m: engine.background.published.base.delta_weight(m) for m in (Q, V)}
    outcome = run_deep(job)
    deep_change = {m: outcome.published.base.delta_weight(m) - start[m] for m in (Q, V)}
    assert max(np.abs(c).max() for c in deep_change.values()) > 1e-4
    # meanwhile the Background loop consolidates new learning
    stream.feed(engine, 20)
    engine.run_background()
    current = {m: engine.background.published.base.delta_weight(m) for m in (Q, V)}
    live = engine.instant.live.export_weights()
    version = engine.background.version
    result = engine.install_deep(outcome)
    assert result.installed is False
    assert any("moved" in n and "re-applied" in n for n in result.notes), result.notes
    assert engine.background.version == version + 1
    assert engine.stats().deep_count == 1
    for m in (Q, V):
        got = engine.background.published.base.delta_weight(m)
        want = current[m] + deep_change[m]
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert engine.instant.live.export_weights() == live


def test_installing_when_nothing_moved_replaces_the_state() -> None:
    engine = SonaLlm(_config(), seed=2, clock=lambda: 0.0)
    Stream(9).feed(engine, 30)
    engine.run_background()
    outcome = run_deep(engine.deep_job())
    Stream(10).feed(engine, 3)  # instant learning alone does not move the consolidated state
    result = engine.install_deep(outcome)
    assert result.installed is True
    assert engine.background.published is outcome.published
    assert engine.background.bank is outcome.bank


def test_the_truncated_re_application_is_no_worse_than_the_best_rank_approximation() -> None:
    engine = SonaLlm(_config(consolidated_rank=2), seed=3, clock=lambda: 0.0)
    stream = Stream(11)
    stream.feed(engine, 30)
    engine.run_background()
    job = engine.deep_job()
    outcome = run_deep(job)
    stream.w = -stream.w  # new directions so the sum exceeds rank 2
    stream.feed(engine, 30)
    engine.run_background()
    exact = (
        engine.background.published.base.delta_weight(Q).astype(np.float64)
        + outcome.published.base.delta_weight(Q)
        - outcome.start.delta_weight(Q)
    )
    assert engine.install_deep(outcome).installed is False
    got = engine.background.published.base.delta_weight(Q)
    s = np.linalg.svd(exact, compute_uv=False)
    tail = float(np.sqrt(np.sum(s[2:] ** 2)))
    assert float(np.linalg.norm(got - exact)) <= tail * (1 + 1e-3) + 1e-6


def test_ensemble_deep_run_keeps_routing_to_trained_cluster_adapters() -> None:
    engine = SonaLlm(_config(consolidation_strategy=CS.ENSEMBLE, pattern_clusters=3), seed=4)
    stream = Stream(12)
    for _ in range(2):
        stream.feed(engine, 30)
        engine.run_background()
    result = engine.deep_optimize()
    assert result.installed
    pub = engine.background.published
    assert pub.ensemble and pub.centroids is not None
    assert len(pub.centroids) == len(engine.background.bank)
    labels = set(pub.route(np.stack([s.input_embedding for s in engine.background.replay])))
    assert labels <= set(pub.ensemble)
    out = engine.forward(PROBE, Q)
    assert np.isfinite(out).all() and out.any()


def test_ewc_lambda_zero_is_plain_replay() -> None:
    """With lambda 0 the EWC++ steps are skipped exactly: a task boundary changes nothing."""
    outs = []
    for boundary in (False, True):
        engine = SonaLlm(
            _config(training=TrainingConfig(ewc_lambda=0.0)), seed=5, clock=lambda: 0.0
        )
        Stream(13).feed(engine, 30)
        engine.run_background()
        if boundary:
            engine.start_new_task()
        else:  # the same closing consolidation (held-back samples in), without the boundary
            engine._consolidate(hold_back=False)
        engine.deep_optimize()
        outs.append(_published(engine))
    np.testing.assert_array_equal(outs[0], outs[1])


def _second_task_consolidated(ewc_lambda: float, samples: int) -> SonaLlm:
    """An engine past a task boundary: 30 samples of one task consolidated and protected,
    then ``samples`` of another consolidated."""
    engine = SonaLlm(
        _config(training=TrainingConfig(ewc_lambda=ewc_lambda)), seed=5, clock=lambda: 0.0
    )
    Stream(13).feed(engine, 30)
    engine.run_background()
    engine.start_new_task()
    Stream(14).feed(engine, samples)
    engine.run_background()
    return engine


def test_replay_after_a_boundary_runs_under_ewc() -> None:
    """Deep replays the kept samples of the ended task and the new one under EWC++: with a
    large λ its result moves ΔW back toward the ended task's anchor on the directions that
    task used, rather than replaying freely over it."""
    engine = _second_task_consolidated(ewc_lambda=1e4, samples=30)
    pipeline = engine.background.pipeline
    before = pipeline.ewc_penalty(engine.background.published.base)
    assert before > 0.0
    result = engine.deep_optimize()
    assert result.installed, result.notes
    assert pipeline.ewc_penalty(engine.background.published.base) < 0.1 * before


def test_the_sample_by_sample_replay_takes_the_same_ewc_steps_as_the_one_call_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the replay kernel cannot take an epoch, Deep steps sample by sample with an EWC++
    proximal step of strength 2·lr·λ per applied step every EWC_EVERY steps, as the kernel
    does: the two paths give the same adapter."""
    from sona.lora import MicroLoRA

    engine = _second_task_consolidated(ewc_lambda=10.0, samples=40)
    job = engine.deep_job()
    one_call = run_deep(job).published.base
    monkeypatch.setattr(MicroLoRA, "replay", lambda *a, **k: False)
    per_sample = run_deep(job).published.base
    for m in (Q, V):
        np.testing.assert_allclose(
            per_sample.delta_weight(m), one_call.delta_weight(m), rtol=1e-5, atol=1e-7
        )


def test_an_outcome_is_installed_at_most_once() -> None:
    """Installing the same outcome again (a retried message, a host's double call) would
    apply the Deep run's change twice; it is refused and nothing changes."""
    engine = SonaLlm(_config(), seed=2, clock=lambda: 0.0)
    Stream(14).feed(engine, 30)
    engine.run_background()
    outcome = run_deep(engine.deep_job())
    assert engine.install_deep(outcome).installed
    before = _published(engine)
    version = engine.background.version
    with pytest.raises(ValueError, match="already installed"):
        engine.install_deep(outcome)
    np.testing.assert_array_equal(_published(engine), before)
    assert engine.background.version == version
    assert engine.stats().deep_count == 1
    # a stale outcome too: re-applied once, then refused
    stale = run_deep(engine.deep_job())
    Stream(15).feed(engine, 10)
    engine.run_background()
    assert engine.install_deep(stale).installed is False
    with pytest.raises(ValueError, match="already installed"):
        engine.install_deep(stale)
    assert engine.stats().deep_count == 2


def test_a_job_keeps_only_the_samples_its_run_uses_and_reruns_identically() -> None:
    from sona import deep

    engine = SonaLlm(_config(replay_capacity=6000), seed=4, clock=lambda: 0.0)
    stream = Stream(12)
    stream.feed(engine, 40)
    engine.run_background()
    rng = np.random.default_rng(5)
    samples = []
    for i in range(5000):
        x = rng.standard_normal(D).astype(np.float32)
        fb = AdaptFeedback.from_quality(0.9)
        if i % 3:  # quality-only feedback is not measurable: never held out
            fb = fb.with_target(stream.w @ x)
        samples.append(TrainingSample(x, stream.w @ x, 0.9).with_feedback(fb))
    job = engine.deep_job(samples)
    assert len(job.train) == deep.MAX_REPLAY and len(job.held) == deep.MAX_EVAL
    held = [s for s in samples[1:] if measurable(s)][-deep.MAX_EVAL :]
    assert all(a is b for a, b in zip(job.held, held, strict=True))
    position = {id(s): i for i, s in enumerate(samples)}
    train_at = [position[id(s)] for s in job.train]
    assert train_at == sorted(set(train_at))  # distinct, oldest first
    assert not {id(s) for s in job.train} & {id(s) for s in held}
    first, second = run_deep(job), run_deep(job)
    for m in (Q, V):
        np.testing.assert_array_equal(
            first.published.base.delta_weight(m), second.published.base.delta_weight(m)
        )
    assert first.quality_delta == second.quality_delta


def test_a_re_application_that_would_overflow_float32_changes_nothing() -> None:
    """Background moved during the run to a delta near float32's max, and the Deep run's
    change points the same way: current + change is 1.8 times the max. The result is discarded
    with a note (and consumed) instead of installing an adapter beyond float32."""
    engine = SonaLlm(_config(), seed=2, clock=lambda: 0.0)
    stream = Stream(14)
    stream.feed(engine, 30)
    engine.run_background()
    outcome = run_deep(engine.deep_job())
    stream.feed(engine, 20)
    engine.run_background()
    near_float32_max(engine.background.published.base, Q, 0.9)
    near_float32_max(outcome.published.base, Q, 0.9)
    before = engine.background.published
    kept = before.base.export_weights()
    version = engine.background.version
    result = engine.install_deep(outcome)
    assert result.installed is False
    assert any("discarded" in n and "overflow" in n for n in result.notes), result.notes
    assert engine.background.published is before and engine.background.version == version
    assert before.base.export_weights() == kept
    with pytest.raises(ValueError, match="already installed"):
        engine.install_deep(outcome)


def test_a_result_that_made_the_held_out_objective_worse_changes_nothing() -> None:
    engine = SonaLlm(_config(), seed=2, clock=lambda: 0.0)
    Stream(13).feed(engine, 30)
    engine.run_background()
    outcome = run_deep(engine.deep_job())
    outcome.quality_delta = -0.25  # as measured for a replayed mix of conflicting tasks
    before = engine.background.published
    version, bank = engine.background.version, engine.background.bank
    result = engine.install_deep(outcome)
    assert result.installed is False
    assert any("discarded" in n and "-0.2500" in n for n in result.notes), result.notes
    assert engine.background.published is before and engine.background.version == version
    assert engine.background.bank is bank
    with pytest.raises(ValueError, match="already installed"):
        engine.install_deep(outcome)


def _same_sample(a: TrainingSample, b: TrainingSample) -> bool:
    fa, fb = a.to_feedback(), b.to_feedback()
    return (
        np.array_equal(a.input_embedding, b.input_embedding)
        and fa.kind is fb.kind
        and fa.quality == fb.quality
        and (fa.vector is None) == (fb.vector is None)
        and (fa.vector is None or np.array_equal(fa.vector, fb.vector))
        and a.module is b.module
    )


@pytest.mark.parametrize("copy", [False, True])
def test_held_out_samples_are_not_also_trained_on_when_the_samples_repeat(copy: bool) -> None:
    """quality_delta is measured on samples the run did not train on. A sample submitted twice
    (the same object, or an equal one) used to be held out as the newest and replayed as an
    older one as well, so the reported delta was partly a training loss."""
    engine = SonaLlm(_config(), seed=1, clock=lambda: 0.0)
    samples = Stream(16).samples(20)
    again = [TrainingSample(s.input_embedding.copy(), s.output_embedding.copy(), 0.9)
             .with_feedback(s.to_feedback()) for s in samples] if copy else samples  # fmt: skip
    job = engine.deep_job(samples + again)
    assert len(job.held) == 4
    assert len([t for t in job.train for h in job.held if _same_sample(t, h)]) == 4
    result = run_deep(job)  # the run, in its own thread, leaves the 4 copies out
    assert result.samples_used == 40 - 4 - 4
    assert any("4 training copies of held-out samples left out" in n for n in result.notes)


def test_merged_clusters_adapters_are_weighted_by_their_counts() -> None:
    """Two near-duplicate clusters are merged: a well-trained one (1000 inputs) and one seeded
    by 2 inputs whose adapter learned nothing yet. Their merged adapter must keep serving the
    big cluster's inputs as before (weights by count, as documented); an equal-share mean
    halved the correction every input of the big cluster got."""
    from sona.deep import snapshot
    from sona.lora import MicroLoRA
    from sona.pattern_bank import PatternBank
    from sona.published import Published
    from sona.training import TrainingPipeline

    cfg = _config(consolidation_strategy=CS.ENSEMBLE, pattern_clusters=3)
    lcfg = cfg.consolidated_lora
    base = MicroLoRA(lcfg, seed=1)
    rng = np.random.default_rng(3)
    trained = MicroLoRA(lcfg, seed=2)
    for m, a, bt in trained.iter_factors():
        trained.set_factors(m, a, (0.3 * rng.standard_normal(bt.shape)).astype(np.float32))
    for q in (0.3, 0.9, 0.6):  # the big cluster's ratings, which its merged adapter keeps
        trained.baseline.update(q)
    eye = np.eye(D, dtype=np.float32)
    centroids = np.zeros((3, D), np.float32)
    centroids[0], centroids[1], centroids[2] = eye[0], eye[0] + 0.05 * eye[3], eye[1]
    ensemble = {0: trained, 1: MicroLoRA(lcfg, seed=3), 2: MicroLoRA(lcfg, seed=4)}
    bank = PatternBank(3, D)
    meta = {"k": 3, "dim": D, "size": 3}
    bank.load(meta, {"centroids": centroids, "counts": np.array([1000, 2, 100], np.int64)})
    pipeline = TrainingPipeline(cfg.training)
    pipeline.init_for_lora(base)
    samples = []  # all about cluster 2: the adapters of clusters 0 and 1 are not replayed
    for _ in range(20):
        x = eye[1] + 0.01 * rng.standard_normal(D).astype(np.float32)
        y = rng.standard_normal(D).astype(np.float32)
        fb = AdaptFeedback.from_quality(0.9).with_target(y)
        samples.append(TrainingSample(x, y, 0.9).with_feedback(fb))
    published = Published(base, ensemble, centroids.copy())
    outcome = run_deep(snapshot(cfg, published, samples, pipeline, bank, 0, seed=5))
    assert len(outcome.bank) == 2
    assert any("merged 1" in n for n in outcome.notes), outcome.notes
    merged = outcome.published.ensemble[0]
    for m in (Q, V):
        want = trained.delta_weight(m) * (1000 / 1002)
        np.testing.assert_allclose(merged.delta_weight(m), want, rtol=1e-4, atol=1e-6)
    assert merged.baseline.state() == trained.baseline.state()


def test_a_task_boundary_during_a_run_anchors_the_ended_task_on_what_deep_installs() -> None:
    """The Deep run replays the ended task's samples; its change belongs to that task. A
    boundary passed while it ran anchored EWC++ on the state before it, so the installed change
    started the new task with a penalty (0.003 here, against ~0 when the run ends first) and
    every later step pulled the Deep run's improvement back out."""
    penalties = []
    for race in ("none", "moved", "unmoved"):
        engine = SonaLlm(_config(consolidated_rank=D), seed=2, clock=lambda: 0.0)
        Stream(8).feed(engine, 30)
        engine.run_background()
        if race == "unmoved":  # the boundary below finds nothing left to consolidate
            engine._consolidate(hold_back=False)
        if race == "none":
            engine.deep_optimize()
            engine.start_new_task()
        else:
            outcome = run_deep(engine.deep_job())
            engine.start_new_task()
            result = engine.install_deep(outcome)
            assert result.installed is (race == "unmoved")
            assert any("task boundary" in n and "anchor" in n for n in result.notes), result.notes
        assert engine.background.task_count == 1
        pub = engine.background.published.base
        penalties.append(engine.background.pipeline.ewc_penalty(pub))
    assert max(penalties) < 1e-9, penalties


def test_each_epoch_steps_at_the_initial_rate_times_0_95_to_the_epoch() -> None:
    """The run against its definition, sample by sample: each of the members replays the kept
    samples in its own shuffled order per epoch at instant_lr·0.95^epoch, and the members are
    merged (their mean at the adapter's rank)."""
    from sona import deep
    from sona.lora import MicroLoRA

    epochs = 3
    cfg = _config(deep_epochs=epochs, training=TrainingConfig(ewc_lambda=0.0))
    engine = SonaLlm(cfg, seed=2, clock=lambda: 0.0)
    Stream(8).feed(engine, 40)
    engine.run_background()
    job = engine.deep_job()
    outcome = run_deep(job)

    def reference(decay: float) -> MicroLoRA:
        rng = np.random.default_rng()
        rng.bit_generator.state = job.rng_state
        members = []
        for _ in range(deep.MEMBERS):
            member = job.published.base.clone()
            for epoch in range(epochs):
                lr = cfg.instant_lr * decay**epoch
                for i in rng.permutation(len(job.train)).tolist():
                    s = job.train[i]
                    member.step(s.input_embedding, s.to_feedback(), lr, max_norm=1.0)
            members.append(member)
        share = 1.0 / len(members)
        return MicroLoRA.merge_adapters([(m, share) for m in members], rank=2)

    want, flat = reference(0.95), reference(1.0)
    for m in (Q, V):
        got = outcome.published.base.delta_weight(m)
        np.testing.assert_allclose(got, want.delta_weight(m), rtol=1e-4, atol=1e-6)
        assert np.abs(got - flat.delta_weight(m)).max() > 1e-4  # the decay is visible


@pytest.mark.parametrize("strategy", [CS.AVERAGE, CS.EWC_MERGE])
@pytest.mark.parametrize("moved", [False, True])
def test_the_consolidated_rating_baseline_survives_a_deep_run(strategy: CS, moved: bool) -> None:
    """Rated outputs are weighted by their advantage over the consolidated adapter's running
    baseline. A Deep result is a merge of its members, built blank, and installing it (or
    re-applying its change) reset that baseline to no rating seen: the next re-learned rated
    output pulled with weight 1 whatever its rating."""
    engine = SonaLlm(_config(consolidation_strategy=strategy), seed=2, clock=lambda: 0.0)
    rng = np.random.default_rng(0)

    def feed(n: int) -> None:
        for _ in range(n):
            x = rng.standard_normal(D).astype(np.float32)
            x /= np.linalg.norm(x)
            engine.instant_adapt(x, 0.5 * x, float(rng.uniform(0.5, 1.0)))

    feed(40)
    engine.run_background()
    outcome = run_deep(engine.deep_job())
    if moved:
        feed(20)
        engine.run_background()
    before = engine.background.published.base.baseline.state()
    assert before["count"] > 0
    result = engine.install_deep(outcome)
    assert result.installed is not moved
    assert engine.background.published.base.baseline.state() == before
