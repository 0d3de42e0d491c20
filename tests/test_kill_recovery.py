"""Crash recovery under SIGKILL: no acknowledged sample is ever lost.

A child process runs a SonaRuntime with a checkpoint_dir (durable sample log, checkpoints
every 0.25 s) and prints the id of every sample whose ``submit`` returned. The parent kills it
with SIGKILL at random moments, 20 times; after each kill it checks that every checkpoint file
in the directory reads back intact and that every id ever acknowledged is either included in
the newest checkpoint (at or below its log sequence) or replayed from the log by restore. The
next child continues from the same directory. At the end the parent restores once more, runs
the replay and checks that ids 1..N were each applied exactly once.

A second test kills a child whose callers were mostly told their samples were dropped
(``DROP_OLDEST`` with a one-sample bound): restore must replay none of those.

Run as ``python tests/test_kill_recovery.py child DIR SEED`` (or ``dropping DIR``) to be the
child.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

DIM = 16
WORKERS = 4
KILLS = 20


def _config() -> object:
    from sona.config import SonaLlmConfig
    from sona.lora_config import MicroLoraConfig

    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM),
        background_interval_ms=20,
        background_min_samples=8,
        max_pending_samples=200,
        replay_capacity=500,
        pattern_clusters=4,
        checkpoint_interval_s=0.25,
        deep_trigger_threshold=150.0,
    )


def _child(directory: str, seed: int) -> None:
    from sona.checkpoint_store import list_checkpoints
    from sona.runtime import SonaRuntime
    from sona.sample import TrainingSample

    async def main() -> None:
        d = Path(directory)
        if d.exists() and list_checkpoints(d):
            rt = SonaRuntime.restore(d)
        else:
            rt = SonaRuntime(_config(), seed=seed, checkpoint_dir=d)  # type: ignore[arg-type]
        out = sys.stdout
        async with rt:
            out.write("ready\n")
            out.flush()

            async def worker(k: int) -> None:
                rng = np.random.default_rng([seed, k])
                while True:
                    x = rng.standard_normal(DIM).astype(np.float32)
                    y = rng.standard_normal(DIM).astype(np.float32)
                    res = await rt.submit(TrainingSample(x, y, float(rng.uniform(0.2, 1.0))))
                    out.write(f"ack {res.sample_id}\n")
                    out.flush()

            async with anyio.create_task_group() as tg:
                for k in range(WORKERS):
                    tg.start_soon(worker, k)

    anyio.run(main)


def _dropping_child(directory: str, policy: str) -> None:
    """Three producers against a one-sample bound under ``policy`` (DROP_OLDEST or DROP_NEWEST);
    prints every answer, waits until the log holds everything it was told, then dies by SIGKILL
    (no final checkpoint)."""
    from sona.actors import OverflowPolicy

    from sona.config import SonaLlmConfig
    from sona.lora_config import MicroLoraConfig
    from sona.runtime import SonaRuntime
    from sona.sample import TrainingSample

    config = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM),
        background_interval_ms=1000,
        background_min_samples=1,
        max_pending_samples=1,
        overflow=OverflowPolicy[policy],
        checkpoint_interval_s=3600.0,
        deep_trigger_threshold=1e9,
    )

    async def main() -> None:
        rng = np.random.default_rng(5)
        samples = [
            TrainingSample(
                rng.standard_normal(DIM).astype(np.float32),
                rng.standard_normal(DIM).astype(np.float32),
                0.9,
            )
            for _ in range(300)
        ]
        async with SonaRuntime(config, seed=1, checkpoint_dir=directory) as rt:

            async def producer(k: int) -> None:
                for sample in samples[k::3]:
                    res = await rt.submit(sample)
                    print("applied" if res.applied else "dropped", res.sample_id, flush=True)

            async with anyio.create_task_group() as tg:
                for k in range(3):
                    tg.start_soon(producer, k)
            await rt.drain()
            writer = rt._durable.writer
            assert writer is not None
            await writer.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    anyio.run(main)


class _Reader(threading.Thread):
    """Collects the child's complete output lines until it dies."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.acked: list[int] = []
        self.ready = threading.Event()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # a line cut by the kill was never acknowledged in full
            if line.startswith("ack "):
                self.acked.append(int(line[4:]))
            elif line == "ready\n":
                self.ready.set()


def _run_child(directory: Path, seed: int, delay: float, before_ready: bool) -> list[int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "child", str(directory), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = _Reader(proc)
    reader.start()
    try:
        if not before_ready:
            assert reader.ready.wait(60), "the child did not start"
        time.sleep(delay)
        assert proc.poll() is None, f"the child died by itself: {proc.stderr.read()}"  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return reader.acked


def _check_every_checkpoint_reads(directory: Path) -> int:
    from sona.checkpoint import read
    from sona.checkpoint_store import list_checkpoints

    files = list_checkpoints(directory)
    for _, path in files:
        read(path)  # raises FormatError if any checkpoint were unreadable
    return len(files)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_sample(tmp_path: Path) -> None:
    from sona.runtime import SonaRuntime

    directory = tmp_path / "state"
    rng = random.Random(7)
    acked: set[int] = set()
    replayed_total = 0
    rounds: list[str] = []
    for round_ in range(KILLS):
        before_ready = round_ % 5 == 4  # some kills land during restore and start-up
        delay = rng.uniform(0.0, 0.6) if before_ready else rng.uniform(0.05, 1.0)
        got = _run_child(directory, seed=round_, delay=delay, before_ready=before_ready)
        assert len(got) == len(set(got)), "an id was acknowledged twice"
        assert not acked & set(got), "an id was reused for a new acknowledged sample"
        acked |= set(got)
        if not directory.exists():
            continue  # killed before the runtime created its directory
        assert _check_every_checkpoint_reads(directory) >= 1 or not acked
        if not acked:
            continue
        rt = SonaRuntime.restore(directory)
        info = rt.restored
        assert info is not None
        replayed = set(info.replayed)
        lost = {i for i in acked if i > info.log_sequence and i not in replayed}
        assert not lost, f"round {round_}: acknowledged ids lost: {sorted(lost)[:10]}"
        replayed_total += len(replayed)
        rounds.append(
            f"kill {round_ + 1}: {len(got)} acked, checkpoint lsn {info.log_sequence}, "
            f"{len(replayed)} replayed"
        )
    print("\n".join(rounds))
    assert len(acked) > 500 and replayed_total > 0

    async def finish() -> tuple[object, int]:
        rt = SonaRuntime.restore(directory)
        async with rt:
            await rt.drain()
            stats = rt.stats()
            next_id = rt._ids.value
        return stats, next_id

    stats, next_id = anyio.run(finish)
    n = next_id - 1  # type: ignore[operator]
    assert max(acked) <= n
    # every id from 1 to n went through the Instant loop exactly once: none lost, none twice
    assert stats.submitted_count == n  # type: ignore[attr-defined]
    assert stats.instant_count + stats.skipped_count == n  # type: ignore[attr-defined]
    assert stats.dropped_samples == 0 and stats.dead_lettered == 0  # type: ignore[attr-defined]
    assert _check_every_checkpoint_reads(directory) >= 1
    print(f"{KILLS} kills, {len(acked)} acknowledged, ids 1..{n} applied exactly once")


@pytest.mark.parametrize("policy", ["DROP_OLDEST", "DROP_NEWEST"])
def test_samples_told_dropped_are_not_replayed_after_sigkill(policy: str, tmp_path: Path) -> None:
    """DROP_OLDEST drops accepted samples (already logged); DROP_NEWEST drops at ingress
    (never logged), which a restore must still count."""
    from sona.runtime import SonaRuntime

    directory = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, __file__, "dropping", str(directory), policy],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    told = {"applied": set(), "dropped": set()}
    for line in proc.stdout.splitlines():
        word, sid = line.split()
        told[word].add(int(sid))
    applied, dropped = told["applied"], told["dropped"]
    assert len(applied) + len(dropped) == 300 and len(dropped) > 100

    rt = SonaRuntime.restore(directory)
    info = rt.restored
    assert info is not None
    assert not set(info.replayed) & dropped
    assert set(info.replayed) | set(range(1, info.log_sequence + 1)) >= applied

    async def finish() -> object:
        async with rt:
            await rt.drain()
            return rt.stats()

    stats = anyio.run(finish)
    # as the callers were told: each applied once, the dropped ones counted as dropped
    assert stats.instant_count + stats.skipped_count == len(applied)  # type: ignore[attr-defined]
    assert stats.dropped_samples == len(dropped)  # type: ignore[attr-defined]
    assert stats.submitted_count == 300  # type: ignore[attr-defined]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    _child(sys.argv[2], int(sys.argv[3]))
elif __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "dropping":
    _dropping_child(sys.argv[2], sys.argv[3])
