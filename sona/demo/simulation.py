"""One run of the demo: simulated traffic and users driving a :class:`SonaRuntime`.

Requests arrive in small batches; the application answers each with the frozen base plus the
runtime's current delta (``rt.forward``), the simulated users turn some answers into feedback
that arrives later, and every arrived piece goes to the runtime with ``await rt.adapt(...)``.
Requests arrive at a steady rate (``DemoSettings.rate``, or slower if the machine cannot keep
up): the Background loop runs on its own wall clock (``background_interval_ms``), so a steady
rate gives it about the same number of samples per consolidation on any machine. Held-out
quality per domain is measured with ``rt.forward`` on inputs the runtime never trains on. An
event subscription records crashes, restarts, drops, task boundaries and consolidations as
they happen.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np

from sona.actors import SupervisorGaveUp
from sona.config import Chaos, SonaLlmConfig, SupervisionConfig
from sona.demo import BATCH
from sona.demo.users import Feedback, FeedbackCounts, SimulatedUsers, UserModel
from sona.demo.world import MODULE, DemoWorld, Phase, Traffic
from sona.events import (
    BackgroundCompleted,
    DeadLettered,
    DeepCompleted,
    Lagged,
    LoopCrashed,
    LoopRestarted,
    SamplesDropped,
    SupervisorGaveUpEvent,
    TaskBoundary,
    UpdateRejected,
)
from sona.lora_config import MicroLoraConfig
from sona.results import LearningStats
from sona.runtime import SonaRuntime
from sona.training_config import TrainingConfig

WATCHED = (
    BackgroundCompleted,
    DeepCompleted,
    TaskBoundary,
    LoopCrashed,
    LoopRestarted,
    SamplesDropped,
    DeadLettered,
    UpdateRejected,
    SupervisorGaveUpEvent,
)
"""Every event but the per-sample ones (those would only make the subscriber lag)."""

MARKED = {
    "LoopRestarted": "restarts",
    "LoopCrashed": "crashes",
    "SamplesDropped": "drops",
    "DeadLettered": "dead_letters",
    "TaskBoundary": "task_boundaries",
    "DeepCompleted": "deep_runs",
}
"""Events whose request step is kept, to be drawn as markers: one per event, except drops,
one per dropped sample (a SamplesDropped event counts ``count`` of them), so the number of
markers is the number the plots give for each kind."""

UPDATE_EVERY_S = 0.1


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """What one demo invocation runs; the command-line options map onto these."""

    steps: int = 12000
    dim: int = 512
    domains: int = 3
    seed: int = 0
    chaos: float = 0.0
    batch: int = BATCH  # requests answered together (one forward call)
    evaluations: int = 90  # held-out measurements per run, plus one at every phase boundary
    instant_lr: float = 0.05
    rate: float = 2500.0  # requests per second at most (0: as fast as the runtime accepts)
    users: UserModel = field(default_factory=UserModel)


def runtime_config(settings: DemoSettings, phases: int, *, ewc: bool) -> SonaLlmConfig:
    """The runtime's configuration; the two runs differ only in ``ewc_lambda``.

    - ``instant_lr`` 0.05: a rank-2 adapter at width 512 learns a domain from rated groups and
      a few corrections within a phase (the library default 0.01 needs about five times more
      feedback than the demo has time for).
    - The Deep loop triggers about twice per phase (accumulated quality of half a phase's
      feedback) instead of every ~100 samples, so its replays stay a small share of the run.
    - Under chaos, the restart budget grows with the crashes to expect over the whole run, so
      the supervisor keeps restarting instead of giving up.
    """
    u = settings.users
    feedback_per_phase = settings.steps / phases * (1.0 - u.missing)
    deep_threshold = max(50.0, 0.5 * 0.85 * feedback_per_phase)
    restarts = 50 + math.ceil(4 * settings.chaos * settings.steps)
    return SonaLlmConfig(
        instant_lr=settings.instant_lr,
        deep_trigger_threshold=deep_threshold,
        micro_lora=MicroLoraConfig.for_hidden_dim(settings.dim, rank=2, target_modules=(MODULE,)),
        training=TrainingConfig() if ewc else TrainingConfig(ewc_lambda=0.0),
        supervision=SupervisionConfig(max_restarts=restarts),
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the live display shows at one moment of a run."""

    label: str
    title: str
    step: int
    total: int
    phase: Phase
    phases: int
    quality: list[float]  # latest held-out quality per domain
    best: list[float]
    base: list[float]
    stats: LearningStats
    latency_p50_us: float | None  # None until an update has been applied and timed
    latency_p99_us: float | None
    feedback: FeedbackCounts
    events: dict[str, int]
    elapsed_s: float


class Observer(Protocol):
    """Receives a run's progress: the rich live display, or log lines with ``--quiet``."""

    def started(self, label: str, title: str, total: int) -> None: ...

    def update(self, snapshot: Snapshot) -> None: ...

    def finished(self, record: RunRecord) -> None: ...


@dataclass(slots=True)
class RunRecord:
    """Everything measured in one run."""

    label: str
    title: str
    ewc_lambda: float
    eval_steps: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    quality: list[list[float]] = field(default_factory=list)  # [evaluation][domain]
    latencies_us: list[float] = field(default_factory=list)
    markers: dict[str, list[int]] = field(default_factory=dict)  # kind -> request steps
    event_counts: dict[str, int] = field(default_factory=dict)
    background_quality_deltas: list[float] = field(default_factory=list)
    deep_quality_deltas: list[float] = field(default_factory=list)
    stats: LearningStats = field(default_factory=LearningStats)
    supervisor: dict[str, dict[str, int]] = field(default_factory=dict)
    feedback: FeedbackCounts = field(default_factory=FeedbackCounts)
    seconds: float = 0.0
    stopped: str | None = None  # why the run ended early (the supervisor gave up)

    def quality_at(self, step: int) -> list[float]:
        """The last measurement taken at or before ``step``."""
        i = max(k for k, s in enumerate(self.eval_steps) if s <= step)
        return self.quality[i]


class _Run:
    """Mutable state of one run, shared by the feeding loop and the event watcher."""

    def __init__(
        self,
        world: DemoWorld,
        phases: list[Phase],
        settings: DemoSettings,
        record: RunRecord,
        observer: Observer,
    ) -> None:
        self.world = world
        self.phases = phases
        self.settings = settings
        self.record = record
        self.observer = observer
        self.step = 0
        self.phase = phases[0]
        self.t0 = time.perf_counter()
        self.serving_since = self.t0  # reset once the runtime has started (see pace)
        self.events: Counter[str] = Counter()
        self.best = [0.0] * world.domains
        self.last_update = 0.0
        self.shown_phase: Phase | None = None

    async def watch(self, events: Any) -> None:
        rec = self.record
        async for ev in events:
            kind = type(ev).__name__
            if isinstance(ev, Lagged):
                self.events["Lagged"] += ev.missed
                continue
            if isinstance(ev, SupervisorGaveUpEvent):
                kind = "SupervisorGaveUp"
            self.events[kind] += 1
            if kind in MARKED:
                times = ev.count if isinstance(ev, SamplesDropped) else 1
                rec.markers.setdefault(MARKED[kind], []).extend([self.step] * times)
            if isinstance(ev, BackgroundCompleted) and ev.quality_delta is not None:
                rec.background_quality_deltas.append(float(ev.quality_delta))
            if isinstance(ev, DeepCompleted) and ev.quality_delta is not None:
                rec.deep_quality_deltas.append(float(ev.quality_delta))

    def evaluate(self, rt: SonaRuntime) -> None:
        world = self.world
        q = [
            world.held_out_quality(d, lambda x: rt.forward(x, MODULE)) for d in range(world.domains)
        ]
        self.best = [max(b, v) for b, v in zip(self.best, q, strict=True)]
        rec = self.record
        rec.eval_steps.append(self.step)
        rec.eval_seconds.append(time.perf_counter() - self.t0)
        rec.quality.append(q)

    async def submit(self, rt: SonaRuntime, items: list[Feedback]) -> None:
        lat = self.record.latencies_us
        for item in items:
            result = await rt.adapt(item.x, item.feedback)
            if result.applied:
                lat.append(result.latency_us)

    def snapshot(self, rt: SonaRuntime, users: SimulatedUsers) -> Snapshot:
        lat = self.record.latencies_us
        p50, p99 = (
            (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if lat else (None, None)
        )
        rec = self.record
        return Snapshot(
            label=rec.label,
            title=rec.title,
            step=self.step,
            total=self.settings.steps,
            phase=self.phase,
            phases=len(self.phases),
            quality=list(rec.quality[-1]) if rec.quality else [],
            best=list(self.best),
            base=list(self.world.base_quality),
            stats=rt.stats(),
            latency_p50_us=p50,
            latency_p99_us=p99,
            feedback=FeedbackCounts(
                **{
                    k: getattr(users.counts, k)
                    for k in (
                        "requests",
                        "missing",
                        "groups",
                        "corrections",
                        "delivered",
                        "delay_sum",
                    )
                }
            ),
            events=dict(self.events),
            elapsed_s=time.perf_counter() - self.t0,
        )

    async def pace(self) -> None:
        """Hold the request rate at ``settings.rate``: the Background loop runs on the wall
        clock, so a steady rate gives it about the same number of samples per consolidation
        on any machine fast enough to keep up (a slower one just runs behind).

        The schedule starts when the runtime is ready (``serving_since``), not when the run
        began: starting it loads the kernels (on a fresh machine, compiles them for up to a
        minute), and a schedule that began before would let the first run's first requests, or
        all of them, arrive unpaced while the second run's were paced."""
        rate = self.settings.rate
        if rate <= 0:
            return
        ahead = self.serving_since + self.step / rate - time.perf_counter()
        if ahead > 0:
            await anyio.sleep(ahead)

    def maybe_update(self, rt: SonaRuntime, users: SimulatedUsers, *, force: bool = False) -> None:
        """Hand the observer a snapshot at most every ``UPDATE_EVERY_S``, and at every phase
        change: a short phase can pass between two updates, and the observer must see it."""
        now = time.perf_counter()
        if force or self.phase is not self.shown_phase or now - self.last_update >= UPDATE_EVERY_S:
            self.last_update = now
            self.shown_phase = self.phase
            self.observer.update(self.snapshot(rt, users))


def evaluation_steps(phases: list[Phase], total: int, evaluations: int) -> list[int]:
    """Evenly spaced request steps to measure at, plus every phase boundary (not the end)."""
    every = max(1, total // max(1, evaluations))
    points = set(range(0, total, every)) | {p.start for p in phases}
    return sorted(points)


async def simulate(
    world: DemoWorld,
    phases: list[Phase],
    traffic: Traffic,
    settings: DemoSettings,
    *,
    label: str,
    title: str,
    ewc: bool,
    observer: Observer,
) -> RunRecord:
    """Run the whole schedule through one SonaRuntime and record what happened."""
    config = runtime_config(settings, len(phases), ewc=ewc)
    chaos = Chaos(crash_probability=settings.chaos, seed=settings.seed) if settings.chaos else None
    record = RunRecord(label, title, config.training.ewc_lambda)
    users = SimulatedUsers(settings.users, seed=settings.seed + 1)
    state = _Run(world, phases, settings, record, observer)
    points = evaluation_steps(phases, settings.steps, settings.evaluations)
    next_point = 0
    observer.started(label, title, settings.steps)
    async with SonaRuntime(config, seed=settings.seed, chaos=chaos) as rt:
        state.serving_since = time.perf_counter()
        async with rt.subscribe(WATCHED, buffer=4096) as events, anyio.create_task_group() as tg:
            tg.start_soon(state.watch, events)
            try:
                for phase in phases:
                    state.phase = phase
                    for start in range(phase.start, phase.stop, settings.batch):
                        while next_point < len(points) and points[next_point] <= start:
                            state.evaluate(rt)
                            next_point += 1
                        n = min(settings.batch, phase.stop - start)
                        x = traffic.x[start : start + n]
                        users.serve(start, traffic, n, rt.forward(x, MODULE))
                        await state.submit(rt, users.due(start + n - 1))
                        state.step = start + n
                        state.maybe_update(rt, users)
                        await state.pace()
                await state.submit(rt, users.flush())
                await rt.drain()
            except SupervisorGaveUp as exc:
                # the last measurement stays at the request the run stopped at
                record.stopped = f"the supervisor gave up: {exc}"
            state.evaluate(rt)
            await anyio.sleep(0.05)  # let the watcher read the last events
            tg.cancel_scope.cancel()
        state.maybe_update(rt, users, force=True)
    record.stats = rt.stats()
    record.supervisor = rt.supervisor_stats()
    record.feedback = users.counts
    record.event_counts = dict(state.events)
    record.seconds = time.perf_counter() - state.t0
    observer.finished(record)
    return record
