"""Hosts cancel requests: a submit cancelled while it waits loses nothing and counts right.

A host typically wraps each request in a timeout. A submit cancelled while it waits for room
(BLOCK backpressure) has not been accepted and must leave no trace; one cancelled after
acceptance, while it waits for the Instant loop or for the durable log, stays accepted and
must still be learned from. Either way the accounting identity holds after ``drain``.
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from runtime_helpers import identity_holds, small_config, stall_background, target_samples

from sona.runtime import SonaRuntime
from sona.simulator import DomainWorld

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("durable", [False, True])
async def test_cancelled_submits_lose_no_accepted_sample(durable: bool, tmp_path: Path) -> None:
    world = DomainWorld(dim=32, domains=1, seed=21)
    samples = target_samples(world, 0, 1500)
    cfg = small_config(max_pending_samples=60, background_interval_ms=5)
    rng = random.Random(4)
    outcomes = {"returned": 0, "cancelled": 0}
    async with SonaRuntime(
        cfg, seed=5, checkpoint_dir=tmp_path / "state" if durable else None
    ) as rt:
        gate = stall_background(rt)  # the bound fills: later submits wait for room

        async def host_request(i: int) -> None:
            with anyio.move_on_after(rng.choice([0.0, 0.0005, 0.005, 5.0])) as scope:
                result = await rt.submit(samples[i])
                assert result.applied
                outcomes["returned"] += 1
            if scope.cancelled_caught:
                outcomes["cancelled"] += 1

        async def unstall_later() -> None:
            await anyio.sleep(0.05)
            gate.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(unstall_later)
            for i in range(len(samples)):
                tg.start_soon(host_request, i)
                if i % 50 == 0:
                    await anyio.sleep(0.001)
        await rt.drain()
        st = rt.stats()
    assert outcomes["returned"] + outcomes["cancelled"] == len(samples)
    assert st.in_flight == 0
    assert identity_holds(st)
    # every accepted sample was learned from: nothing dropped, skipped or dead-lettered
    assert st.instant_count == st.submitted_count
    assert st.dropped_samples == st.skipped_count == st.dead_lettered == 0
    # accepted = returned + cancelled after acceptance; cancelled while waiting for room: none
    assert outcomes["returned"] <= st.submitted_count < len(samples)
    assert st.submitted_count > outcomes["returned"]  # some were cancelled after acceptance
    assert outcomes["returned"] > 100


async def test_identity_holds_at_every_moment_of_a_hand_over() -> None:
    """Between the Instant loop handing its samples over and the Background loop taking them,
    they are counted as pending: a reader polling ``stats()`` never sees them missing."""
    world = DomainWorld(dim=32, domains=1, seed=22)
    samples = target_samples(world, 0, 3000)
    cfg = small_config(max_pending_samples=40, background_interval_ms=1)
    broken = []
    reads = 0
    async with SonaRuntime(cfg, seed=6) as rt:
        done = False

        async def watch() -> None:
            nonlocal reads
            while not done:
                st = rt.stats()
                reads += 1
                if not identity_holds(st):
                    broken.append(st)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for s in samples:
                await rt.submit(s)
                await anyio.lowlevel.checkpoint()
            await rt.drain()
            done = True
        consolidations = rt.stats().background_count
    assert consolidations > 50
    assert reads > 1000
    assert not broken, broken[0]
