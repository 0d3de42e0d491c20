"""Task boundaries through the engine: explicit ``start_new_task`` and detection of a domain
switch from the inputs the Background loop consolidates."""

from __future__ import annotations

import numpy as np
import pytest

from sona.config import ConsolidationStrategy as CS
from sona.config import SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.simulator import DomainWorld
from sona.training_config import TrainingConfig

D = 32
Q = TargetModule.Q_PROJ
BLOCK = 50


def _config(**changes: object) -> SonaLlmConfig:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(D, rank=2, target_modules=(Q,)),
        background_min_samples=BLOCK,
        instant_lr=0.05,
    )
    return cfg.replace(**changes)


def _feed(engine: SonaLlm, world: DomainWorld, domain: int, n: int) -> None:
    x = world.inputs(domain, n)
    y = world.target_delta(domain, x)
    for xi, yi in zip(x, y, strict=True):
        assert engine.adapt(xi, AdaptFeedback.from_quality(0.9).with_target(yi)).applied


def _run(engine: SonaLlm, world: DomainWorld, domains: list[int]) -> list[bool]:
    fired = []
    for d in domains:
        _feed(engine, world, d, BLOCK)
        result = engine.run_background()
        fired.append(result.task_boundary)
        if result.task_boundary:
            assert any("task boundary" in n for n in result.notes), result.notes
    return fired


# ---------------------------------------------------------------------- explicit
def test_start_new_task_counts_tasks() -> None:
    engine = SonaLlm(_config(), seed=0, clock=lambda: 0.0)
    assert engine.stats().task_count == 0
    engine.start_new_task()
    assert engine.stats().task_count == 1
    engine.start_new_task()
    engine.start_new_task()
    assert engine.stats().task_count == 3


def test_start_new_task_consolidates_what_is_pending_into_the_old_task_first() -> None:
    world = DomainWorld(dim=D, domains=2, seed=1)
    engine = SonaLlm(_config(), seed=0, clock=lambda: 0.0)
    _feed(engine, world, 0, 20)
    engine.start_new_task()
    s = engine.stats()
    assert s.task_count == 1 and s.background_count == 1
    assert not engine.instant.pending
    assert s.consolidated_count + s.pending_samples == 20
    engine.start_new_task()  # nothing new pending: no extra consolidation
    assert engine.stats().background_count == 1


def test_start_new_task_anchors_ewc_on_the_consolidated_state() -> None:
    """After the boundary, EWC++ pulls the consolidated adapter back toward the old task's
    state on the old task's inputs: with a large lambda, learning a conflicting domain moves
    the old domain's outputs less than with lambda 0."""
    world = DomainWorld(dim=D, domains=2, shared=4, seed=2)
    moved = {}
    for lam in (0.0, 50.0):
        engine = SonaLlm(
            _config(training=TrainingConfig(ewc_lambda=lam, boundary_detection=False)),
            seed=0,
            clock=lambda: 0.0,
        )
        for _ in range(3):
            _feed(engine, world, 0, BLOCK)
            engine.run_background()
        old = world.held_out(0)[:64]
        before = engine.forward(old, Q)
        engine.start_new_task()
        for _ in range(3):
            _feed(engine, world, 1, BLOCK)
            engine.run_background()
        engine.run_background()  # fold the live adapter too
        moved[lam] = float(np.linalg.norm(engine.forward(old, Q) - before))
        assert engine.background.pipeline.ewc_penalty(engine.background.base) >= 0.0
    assert moved[50.0] < moved[0.0]


# ---------------------------------------------------------------------- detected
@pytest.mark.parametrize("seed", [0, 1])
def test_a_domain_switch_is_detected_once_soon_after_it_happens(seed: int) -> None:
    world = DomainWorld(dim=D, domains=2, seed=seed + 10)
    engine = SonaLlm(_config(), seed=seed, clock=lambda: 0.0)
    fired = _run(engine, world, [0] * 5 + [1] * 4)
    assert not any(fired[:5]), fired  # nothing while the stream is stationary
    assert any(fired[5:7]), fired  # within two batches (100 samples) of the switch
    assert sum(fired) == 1, fired
    assert engine.stats().task_count == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_a_stationary_stream_never_fires(seed: int) -> None:
    world = DomainWorld(dim=D, domains=2, seed=seed + 10)
    engine = SonaLlm(_config(), seed=seed, clock=lambda: 0.0)
    fired = _run(engine, world, [1] * 9)
    assert not any(fired), fired
    assert engine.stats().task_count == 0


@pytest.mark.parametrize("strategy", [CS.AVERAGE, CS.ENSEMBLE])
def test_detection_does_not_depend_on_the_strategy(strategy: CS) -> None:
    world = DomainWorld(dim=D, domains=2, seed=10)
    engine = SonaLlm(_config(consolidation_strategy=strategy), seed=0, clock=lambda: 0.0)
    fired = _run(engine, world, [0] * 5 + [1] * 3)
    assert not any(fired[:5]) and sum(fired) == 1


def test_detection_can_be_switched_off() -> None:
    world = DomainWorld(dim=D, domains=2, seed=10)
    cfg = _config(training=TrainingConfig(boundary_detection=False))
    engine = SonaLlm(cfg, seed=0, clock=lambda: 0.0)
    assert not any(_run(engine, world, [0] * 5 + [1] * 3))
    assert engine.stats().task_count == 0


def test_switching_back_and_forth_is_detected_each_time() -> None:
    world = DomainWorld(dim=D, domains=2, seed=10)
    engine = SonaLlm(_config(), seed=0, clock=lambda: 0.0)
    fired = _run(engine, world, [0] * 5 + [1] * 5 + [0] * 5)
    assert sum(fired[:5]) == 0 and sum(fired[5:10]) == 1 and sum(fired[10:]) == 1, fired
    assert engine.stats().task_count == 2
