"""The accounting identities hold at every moment, not only after ``drain``.

A reader polls ``stats()`` between every two steps of the event loop while producers submit,
consolidations hand samples over, Deep runs, loops crash and restart, or DROP_OLDEST evicts.
Each of those moves samples from one count to another; none may leave them uncounted, even for
one turn of the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from runtime_helpers import identity_holds, small_config, target_samples
from sona.actors import OverflowPolicy

from sona.config import Chaos, SupervisionConfig
from sona.runtime import SonaRuntime
from sona.simulator import DomainWorld

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ["plain", "chaos", "drop_oldest", "durable", "deep"])
async def test_identities_hold_at_every_moment(mode: str, tmp_path: Path) -> None:
    world = DomainWorld(dim=32, domains=1, seed=22)
    samples = target_samples(world, 0, 3000)
    overrides: dict[str, Any] = {
        "max_pending_samples": 40,
        "background_interval_ms": 1,
        "supervision": SupervisionConfig(
            max_restarts=100_000, within_s=10.0, backoff_min_s=0.0, backoff_max_s=0.0005
        ),
    }
    if mode == "drop_oldest":
        overrides["overflow"] = OverflowPolicy.DROP_OLDEST
    if mode in ("chaos", "deep"):
        overrides["deep_trigger_threshold"] = 200.0
    chaos = Chaos(crash_probability=0.03, seed=1) if mode == "chaos" else None
    directory = tmp_path / "state" if mode == "durable" else None
    broken = []
    reads = 0
    async with SonaRuntime(
        small_config(**overrides), seed=6, chaos=chaos, checkpoint_dir=directory
    ) as rt:
        done = False

        async def watch() -> None:
            nonlocal reads
            while not done:
                st = rt.stats()
                reads += 1
                if not identity_holds(st):
                    broken.append(st)
                await anyio.lowlevel.checkpoint()

        async def producer(k: int) -> None:
            for s in samples[k::4]:
                await rt.submit(s)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as producers:
                for k in range(4):
                    producers.start_soon(producer, k)
            await rt.drain()
            done = True
        st = rt.stats()
    assert not broken, (len(broken), broken[0])
    assert identity_holds(st)
    assert reads > 200
    if mode != "drop_oldest":  # these producers never wait there (see the README)
        assert st.background_count > 20
    if mode in ("chaos", "deep"):
        assert st.deep_count > 0
    if mode == "chaos":
        assert st.restarts > 0
    if mode == "drop_oldest":
        assert st.dropped_samples + st.evicted_samples > 0
