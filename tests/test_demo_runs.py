"""One demo run, driven directly: pacing, and what a run that stopped early reports."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from sona.demo import simulation
from sona.demo.simulation import DemoSettings, RunRecord, Snapshot, simulate
from sona.demo.world import DemoWorld, schedule


class _Quiet:
    """An observer that keeps the snapshots it is handed."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def started(self, label: str, title: str, total: int) -> None:
        pass

    def update(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)

    def finished(self, record: RunRecord) -> None:
        pass


class _Clock:
    """A perf_counter that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_pacing_starts_when_the_runtime_is_ready_not_before_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starting a runtime (loading, or on a fresh machine compiling, the kernels) takes from
    a fraction of a second to a minute. Pacing measured from before it would find itself that
    far behind and send the first requests as fast as they go: a burst in the first run only
    (the second finds the kernels loaded), so the two runs compared would not see the same
    traffic."""
    clock = _Clock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await anyio.sleep(0)

    monkeypatch.setattr(simulation, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(
        simulation, "anyio", SimpleNamespace(sleep=sleep, create_task_group=anyio.create_task_group)
    )

    class SlowStart(simulation.SonaRuntime):
        async def __aenter__(self) -> Any:
            clock.now += 30.0  # the runtime took 30 s to start
            return await super().__aenter__()

    monkeypatch.setattr(simulation, "SonaRuntime", SlowStart)
    settings = DemoSettings(steps=64, dim=16, domains=1, rate=100.0)
    world = DemoWorld(16, 1, seed=0)
    phases = schedule(1, 64)
    traffic = world.traffic(phases, seed=2)
    anyio.run(
        lambda: simulate(
            world, phases, traffic, settings, label="x", title="x", ewc=True, observer=_Quiet()
        )
    )
    # the clock stands still while requests are served: every batch is ahead of its schedule
    paced = [s for s in sleeps if s != 0.05]  # 0.05: the event watcher's last look
    assert paced == pytest.approx([0.16, 0.32, 0.48, 0.64])
