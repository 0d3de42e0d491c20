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
    if durable:  # each submit waits for its log commit: many are cancelled after acceptance
        assert st.submitted_count > outcomes["returned"]
    # without the log only the few that found the Instant loop busy can be (0-3 of 1,500)
    assert outcomes["returned"] > 100


async def test_host_cancellation_releases_the_checkpoint_dir(tmp_path: Path) -> None:
    """A host's timeout around a durable runtime stops it: the directory lock and the log
    are released, so the same process can restore the directory and go on."""
    from sona.checkpoint_store import DirectoryLock

    directory = tmp_path / "state"
    samples = target_samples(DomainWorld(dim=32, domains=1, seed=2), 0, 10)
    rt = SonaRuntime(small_config(), seed=5, checkpoint_dir=directory)
    with anyio.CancelScope() as scope:
        async with rt:
            for sample in samples:
                await rt.submit(sample)
            scope.deadline = anyio.current_time() + 0.05  # the host's timeout expires
            await anyio.sleep(10)
    assert scope.cancelled_caught
    assert rt._durable.log is None and rt._durable._lock is None
    lock = DirectoryLock(directory)
    lock.acquire()
    lock.release()
    async with SonaRuntime.restore(directory) as again:
        await again.drain()
        assert again.stats().instant_count == len(samples)


async def test_cancellation_during_the_first_checkpoint_releases_the_checkpoint_dir(
    tmp_path: Path,
) -> None:
    from sona.checkpoint_store import DirectoryLock

    directory = tmp_path / "state"
    rt = SonaRuntime(small_config(), seed=5, checkpoint_dir=directory)
    durable = rt._durable
    real_capture = durable._capture
    scope = anyio.CancelScope()

    async def capture(seq: int) -> object:
        scope.cancel()  # the host gives up while start writes its first checkpoint
        return await real_capture(seq)

    durable._capture = capture  # type: ignore[method-assign]
    with scope:
        async with rt:
            pytest.fail("the runtime started inside a cancelled scope")
    assert scope.cancelled_caught
    assert durable.log is None and durable._lock is None
    lock = DirectoryLock(directory)
    lock.acquire()
    lock.release()
