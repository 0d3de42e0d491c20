"""Shared builders for the SonaRuntime tests: small configs and sample streams."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from sona.config import SonaLlmConfig, SupervisionConfig
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.results import LearningStats
from sona.sample import TrainingSample
from sona.simulator import DomainWorld

Q = TargetModule.Q_PROJ
DIM = 32


def small_config(**overrides: object) -> SonaLlmConfig:
    base: dict[str, object] = {
        "micro_lora": MicroLoraConfig.for_hidden_dim(DIM, target_modules=(Q,)),
        "background_interval_ms": 20,
        "deep_trigger_threshold": 1e9,
        "supervision": SupervisionConfig(backoff_min_s=0.0, backoff_max_s=0.001),
    }
    base.update(overrides)
    return SonaLlmConfig(**base)  # type: ignore[arg-type]


def target_samples(
    world: DomainWorld, domain: int, n: int, quality: float = 1.0
) -> list[TrainingSample]:
    xs = world.inputs(domain, n)
    ys = world.target_delta(domain, xs)
    return [
        TrainingSample(x, y, quality).with_feedback(
            AdaptFeedback.from_quality(quality).with_target(y)
        )
        for x, y in zip(xs, ys, strict=True)
    ]


def rated_samples(n: int, seed: int = 0) -> list[TrainingSample]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [TrainingSample(x[i], 0.5 * x[i], 0.8) for i in range(n)]


def identity_holds(s: LearningStats) -> bool:
    first = s.submitted_count == (
        s.instant_count + s.skipped_count + s.dropped_samples + s.dead_lettered + s.in_flight
    )
    second = s.instant_count == s.consolidated_count + s.evicted_samples + s.pending_samples
    return first and second


async def flush_sample_log(rt: Any) -> None:
    """Wait until everything the runtime has logged is committed: what a kill leaves now."""
    writer = rt._durable.writer
    assert writer is not None
    await writer.flush()


def stall_background(rt: Any) -> threading.Event:
    """Make the runtime's Background loop hang in its worker thread until the event is set."""
    gate = threading.Event()
    bg = rt._background
    real = bg.prepare

    def stalled(hand: Any, *rest: Any) -> Any:
        gate.wait(30)
        return real(hand, *rest)

    bg.prepare = stalled
    return gate


def hold_deep_runs(monkeypatch: Any) -> tuple[threading.Event, threading.Event]:
    """Make every Deep run wait in its worker thread, its snapshot taken, until the second
    event is set; the first is set once a run has got there. Once released, runs go through."""
    import sona.runtime as runtime_module

    started, release = threading.Event(), threading.Event()
    real = runtime_module.run_deep

    def held(job: Any) -> Any:
        started.set()
        release.wait(30)
        return real(job)

    monkeypatch.setattr(runtime_module, "run_deep", held)
    return started, release


@contextlib.asynccontextmanager
async def consolidating(rt: Any) -> AsyncIterator[None]:
    """The body runs while a consolidation is handed over and held in its worker thread; the
    consolidation commits when the body ends."""
    gate = stall_background(rt)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.consolidate)
            while rt._instant.unfinished is None:
                await anyio.sleep(0.001)
            try:
                yield
            finally:
                gate.set()


class FailsOnce:
    """Stands in for ``fn``: the first call (the first ``times``) raises ``error``, after ``fn``
    has run and done its work when ``after``; every later one is ``fn``'s. ``calls`` counts
    them all."""

    def __init__(
        self, fn: Callable[..., Any], error: BaseException, *, after: bool = False, times: int = 1
    ) -> None:
        self.fn = fn
        self.error = error
        self.after = after
        self.times = times
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.times:
            if self.after:
                self.fn(*args, **kwargs)
            raise self.error
        return self.fn(*args, **kwargs)


def crash_instant_once(rt: Any) -> None:
    """Make the Instant loop raise on the next sample it handles (the retry then succeeds)."""
    inst = rt._instant
    inst.process = FailsOnce(inst.process, RuntimeError("instant loop crashed on purpose"))


def directory_state(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``directory`` with its bytes and modification time: equal before and
    after an operation when it created, changed and removed nothing there."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}
