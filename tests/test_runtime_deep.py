"""The Deep loop inside the runtime: what the Background loop does meanwhile (a consolidation,
a task boundary, a checkpoint) and a run that crashes, each while the run is held in its
worker thread."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from runtime_helpers import Q, hold_deep_runs, small_config, target_samples
from sona.actors import MessageFailed

import sona.runtime as runtime_module
from sona.deep import DeepJob, DeepOutcome
from sona.results import DeepResult
from sona.runtime import SonaRuntime
from sona.simulator import DomainWorld

pytestmark = pytest.mark.anyio

WORLD = DomainWorld(dim=32, domains=2, seed=5)


def _config() -> Any:
    return small_config(background_interval_ms=3_600_000, background_min_samples=5)


async def _started(rt: SonaRuntime) -> None:
    for s in target_samples(WORLD, 0, 60):
        await rt.submit(s)
    await rt.consolidate()


@contextlib.asynccontextmanager
async def deep_running(
    rt: SonaRuntime, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, DeepResult]]:
    """The body runs while an on-demand Deep run is held in its worker thread (its snapshot
    taken); on leaving, the run goes on and its result is in the yielded dict's "result"."""
    started, gate = hold_deep_runs(monkeypatch)
    out: dict[str, DeepResult] = {}

    async def run() -> None:
        out["result"] = await rt.deep_optimize()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            while not started.is_set():
                await anyio.sleep(0.005)
        try:
            yield out
        finally:
            gate.set()


async def test_a_consolidation_during_a_run_gets_the_change_re_applied_on_top(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with SonaRuntime(_config(), seed=2) as rt:
        await _started(rt)
        bg = rt._background
        async with deep_running(rt, monkeypatch) as out:
            version = bg.version
            for s in target_samples(WORLD, 1, 30):
                await rt.submit(s)
            await rt.consolidate()
            assert bg.version == version + 1
            moved = bg.published.base.delta_weight(Q)
        result = out["result"]
        assert result.installed is False
        assert any("moved" in n and "re-applied" in n for n in result.notes), result.notes
        assert bg.version == version + 2
        assert np.abs(bg.published.base.delta_weight(Q) - moved).max() > 1e-5
        assert rt.stats().deep_count == 1


async def test_a_task_boundary_during_a_run_moves_the_ended_tasks_anchor_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without it the new task began under an EWC++ penalty pulling the Deep change out."""
    async with SonaRuntime(_config(), seed=2) as rt:
        await _started(rt)
        bg = rt._background
        async with deep_running(rt, monkeypatch) as out:
            rt.start_new_task()
            with anyio.fail_after(10):
                while bg.task_count == 0:
                    await anyio.sleep(0.005)
        result = out["result"]
        assert any("task boundary" in n for n in result.notes), result.notes
        assert bg.pipeline.ewc_penalty(bg.published.base) < 1e-9


async def test_a_checkpoint_during_a_run_holds_the_state_before_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    held = WORLD.held_out(0)[:8]
    async with SonaRuntime(_config(), seed=2) as rt:
        await _started(rt)
        async with deep_running(rt, monkeypatch) as out:
            before = rt.forward(held, Q)
            path = await rt.checkpoint(tmp_path / "during.sona")
        assert out["result"].installed
        assert np.abs(rt.forward(held, Q) - before).max() > 1e-5
    restored = SonaRuntime.restore(path)
    async with restored:
        np.testing.assert_array_equal(restored.forward(held, Q), before)
        assert restored.stats().deep_count == 0


@pytest.mark.parametrize("failures", [1, 2])
async def test_a_crashing_run_is_retried_once_and_never_touches_the_published_state(
    monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    """Failing once, the retry (a fresh snapshot) installs; failing twice, the caller gets the
    failure and what forward serves is untouched, whatever the run did to its copies."""
    real = runtime_module.run_deep
    calls = 0

    def crashing(job: DeepJob) -> DeepOutcome:
        nonlocal calls
        calls += 1
        if calls <= failures:
            base = job.published.base  # a run failing half-way may have scribbled on its copy
            a, bt = base.factors(Q)
            base.set_factors(Q, a, np.full_like(bt, 1e3))
            raise RuntimeError("deep run failed")
        return real(job)

    held = WORLD.held_out(0)[:8]
    async with SonaRuntime(_config(), seed=2) as rt:
        await _started(rt)
        before = rt.forward(held, Q)
        version = rt._background.version
        monkeypatch.setattr(runtime_module, "run_deep", crashing)
        if failures == 2:
            with pytest.raises(MessageFailed):
                await rt.deep_optimize()
            assert rt._background.version == version
            np.testing.assert_array_equal(rt.forward(held, Q), before)
            assert rt.stats().deep_count == 0
        else:
            result = await rt.deep_optimize()
            assert result.installed and result.epochs > 0
            after = rt.forward(held, Q)
            assert np.isfinite(after).all() and np.abs(after).max() < 10.0
            assert rt.stats().deep_count == 1
        assert calls == 2 and rt.stats().restarts >= 1
