"""Scripted runs: a reproducible stream of mixed calls, and the sequences of loop calls the
tests drive a runtime (or the synchronous engine) through. The loops run only when asked, so
runs given the same calls go through the same states and can be compared bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
from hypothesis import strategies as st
from runtime_helpers import FailsOnce

from sona.background import BackgroundLoop
from sona.config import ConsolidationStrategy, SonaLlmConfig
from sona.engine import SonaLlm
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.results import BackgroundResult, DeepResult
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.training_config import TrainingConfig

DIM = 12
_WORDS = ("merge", "cache", "straße", "naïve", "token", "rank", "drift", "query", "日本", "ok")
MODULES = (TargetModule.Q_PROJ, TargetModule.V_PROJ)


def config(strategy: ConsolidationStrategy = ConsolidationStrategy.EWC_MERGE, **kw: Any) -> Any:
    """Loops run only when asked (no timer-driven consolidation or deep run, and pending
    samples never reach the mark, three quarters of the bound, at which a consolidation starts
    on its own), so two runtimes given the same calls go through the same states."""
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM, dropout=0.1),
        consolidation_strategy=strategy,
        background_interval_ms=3_600_000,
        background_min_samples=4,
        deep_trigger_threshold=1e9,
        deep_epochs=2,
        pattern_clusters=3,
        max_pending_samples=2000,
        replay_capacity=300,
        training=TrainingConfig(ewc_lambda=0.5, fisher_samples=16),
        **kw,
    )


class Script:
    """A reproducible stream of mixed feedback: rated outputs with texts, targets, gradients,
    groups, rated text pairs the embedder turns into vectors, targets about one module only,
    and explored quality-only ratings."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.basis: np.ndarray | None = None

    def vec(self) -> np.ndarray:
        return self.rng.standard_normal(DIM).astype(np.float32)

    def domain(self, seed: int) -> Script:
        """From now on, inputs come from a 3-dimensional subspace of their own."""
        self.basis = np.random.default_rng(seed).standard_normal((3, DIM)).astype(np.float32)
        return self

    def x(self) -> np.ndarray:
        if self.basis is None:
            return self.vec()
        return (self.rng.standard_normal(3).astype(np.float32) @ self.basis).astype(np.float32)

    def steps(self, n: int, *, explore: bool = True) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for i in range(n):
            x = self.x()
            q = float(self.rng.uniform(0.55, 1.0))
            kind = i % 7 if explore else i % 6
            if kind == 0:
                s = (
                    TrainingSample(x, self.vec(), q)
                    .with_query(f"q{i}")
                    .with_response("r é ✓")
                    .with_session("s")
                    .with_tokens(i)
                    .with_latency(1.5)
                )
                out.append(("submit", s))
            elif kind == 1:
                out.append(("adapt", (x, AdaptFeedback.from_quality(q).with_target(self.vec()))))
            elif kind == 2:
                fb = AdaptFeedback.from_quality(q).with_gradient(0.1 * self.vec())
                out.append(("adapt", (x, fb)))
            elif kind == 3:
                outs = np.stack([self.vec() for _ in range(3)])
                qs = self.rng.uniform(0, 1, 3)
                out.append(("adapt", (x, AdaptFeedback.from_group(outs, qs))))
            elif kind == 4:  # text, embedded by the default embedder
                words = " ".join(self.rng.choice(_WORDS, 4))
                out.append(("instant", (f"how to {words}?", f"{words}, then ✓", q)))
            elif kind == 5:  # feedback about one module only
                fb = AdaptFeedback.from_quality(q).with_target(self.vec())
                out.append(("adapt", (x, fb, TargetModule.V_PROJ)))
            else:
                out.append(("explore", (x, AdaptFeedback.from_quality(q))))
        return out


async def play(rt: SonaRuntime, steps: list[tuple[str, Any]]) -> None:
    for kind, arg in steps:
        if kind == "submit":
            await rt.submit(arg)
        elif kind == "adapt":
            await rt.adapt(*arg)
        elif kind == "instant":
            await rt.instant_adapt(*arg)
        else:
            x, fb = arg
            rt.forward(x, TargetModule.Q_PROJ, explore=True)
            await rt.adapt(x, fb, TargetModule.Q_PROJ)
    await rt.drain()


def play_engine(engine: SonaLlm, steps: list[tuple[str, Any]]) -> None:
    """:func:`play` on the synchronous engine."""
    for kind, arg in steps:
        if kind == "submit":
            engine.submit(arg)
        elif kind == "adapt":
            engine.adapt(*arg)
        elif kind == "instant":
            engine.instant_adapt(*arg)
        else:
            x, fb = arg
            engine.forward(x, TargetModule.Q_PROJ, explore=True)
            engine.adapt(x, fb, TargetModule.Q_PROJ)


PROBE = np.random.default_rng(99).standard_normal((7, DIM)).astype(np.float32)


def outputs(rt: SonaRuntime | SonaLlm) -> list[np.ndarray]:
    return [rt.forward(PROBE, m) for m in MODULES] + [rt.forward(PROBE[0], MODULES[0])]


def same_outputs(a: SonaRuntime | SonaLlm, b: SonaRuntime | SonaLlm) -> bool:
    return all(x.tobytes() == y.tobytes() for x, y in zip(outputs(a), outputs(b), strict=True))


def learning(stats: Any) -> dict[str, Any]:
    """Statistics that do not depend on wall time."""
    d = {k: getattr(stats, k) for k in stats.__struct_fields__}
    d.pop("instant_avg_latency_us")
    return d


_LOOP_OPS = ["consolidate", "deep", "new_task", "boundary"]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("play"), st.integers(1, 40)),
        st.tuples(st.sampled_from(_LOOP_OPS), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)
# and consolidations that raise once after folding, then are retried
OPS_FAILING = st.lists(
    st.one_of(
        st.tuples(st.just("play"), st.integers(1, 40)),
        st.tuples(st.sampled_from([*_LOOP_OPS, "failing"]), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


async def apply(rt: SonaRuntime, script: Script, op: tuple[str, int]) -> object:
    """Run one of ``OPS`` on ``rt``; what it reported, wall times left out."""
    kind, n = op
    res: BackgroundResult | DeepResult | None = None
    if kind == "play":
        await play(rt, script.steps(n))
    elif kind == "consolidate":
        res = await rt.consolidate()
    elif kind == "failing":  # the restarted Background loop retries it
        with _failing_fold(rt._background):
            res = await rt.consolidate()
    elif kind == "deep":
        res = await rt.deep_optimize()
    elif kind == "new_task":
        rt.start_new_task()
        await rt.consolidate()  # queued behind the new task: returns once it has begun
    else:  # as after a detected shift: the live adapter restarts at the next hand-over
        rt._instant.new_task()
    return _reported(res)


def apply_engine(engine: SonaLlm, script: Script, op: tuple[str, int]) -> object:
    """:func:`apply` on the synchronous engine: the same calls, the same reports."""
    kind, n = op
    res: BackgroundResult | DeepResult | None = None
    if kind == "play":
        play_engine(engine, script.steps(n))
    elif kind == "consolidate":
        res = engine.run_background() if engine.pending_samples() else None
    elif kind == "failing":  # the next consolidation retries it
        with _failing_fold(engine.background):
            try:
                res = engine.run_background() if engine.pending_samples() else None
            except RuntimeError:
                res = engine.run_background()
    elif kind == "deep":
        res = engine.deep_optimize()
    elif kind == "new_task":
        engine.start_new_task()
    else:
        engine.instant.new_task()
    return _reported(res)


@contextlib.contextmanager
def _failing_fold(bg: BackgroundLoop) -> Iterator[None]:
    """The next consolidation raises after its inputs were tracked and its fold computed."""
    bg._fold = FailsOnce(bg._fold, RuntimeError("failed after folding"), after=True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del bg._fold


def _reported(res: BackgroundResult | DeepResult | None) -> object:
    return None if res is None else msgspec.structs.replace(res, latency_ms=0.0)
