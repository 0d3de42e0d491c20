"""restore(checkpoint(x)) continues exactly: bit-identical outputs, identical statistics, and the
same future under the same inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import DIM, OPS, PROBE, Script, apply, config, learning, play, same_outputs

from sona import container
from sona.checkpoint import STATE_FIELDS, config_from_dict, config_to_dict, read
from sona.config import ConsolidationStrategy, SonaLlmConfig, SupervisionConfig
from sona.errors import CheckpointDirError, ConfigMismatchError, FormatError, InvalidInputError
from sona.events import CheckpointWritten
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.training_config import TrainingConfig

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "strategy",
    [
        ConsolidationStrategy.EWC_MERGE,
        ConsolidationStrategy.ENSEMBLE,
        ConsolidationStrategy.QUALITY_WEIGHTED,
    ],
)
async def test_restore_continues_exactly(tmp_path: Path, strategy: ConsolidationStrategy) -> None:
    script = Script(1).domain(1)
    first, second = script.steps(60), script.steps(23)
    later = script.domain(2).steps(80)  # a new input domain: the shift is detected
    async with SonaRuntime(config(strategy), seed=5) as a:
        await play(a, first)
        assert await a.consolidate() is not None
        await a.deep_optimize()
        a.start_new_task()
        await a.consolidate()
        await play(a, second)  # left pending: not consolidated yet
        await a.consolidate()  # holds some back for evaluation (carried into the next run)
        await play(a, script.steps(3))
        # as after a detected boundary: the live adapter restarts at the next hand-over
        a._instant.new_task()
        await a.consolidate()
        a._instant.new_task()
        await play(a, script.steps(4))
        path = await a.checkpoint(tmp_path / "c.sona")
        before = a.stats()
        assert before.pending_samples > 0 and before.replay_size > 0
        assert before.deep_count == 1 and before.task_count >= 1

        b = SonaRuntime.restore(path)
        assert b.stats() == before  # identical, latency average included
        assert same_outputs(a, b)  # bit-identical
        async with b:
            assert b.stats() == before and same_outputs(a, b)
            for rt in (a, b):
                await play(rt, later)
                await rt.consolidate()
                await rt.deep_optimize()
                rt.start_new_task()
                await rt.consolidate()  # queued behind the new task: it has begun
                await play(rt, later[:10])
                await rt.consolidate()
                await play(rt, later[10:15])
            assert same_outputs(a, b)
            assert learning(a.stats()) == learning(b.stats())
            # exploration continues from the same position: the same noise on both
            x = PROBE[3]
            na = a.forward(x, TargetModule.Q_PROJ, explore=True)
            nb = b.forward(x, TargetModule.Q_PROJ, explore=True)
            assert na.tobytes() == nb.tobytes()


@pytest.mark.parametrize("strategy", list(ConsolidationStrategy))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=OPS,
    after=st.lists(st.one_of(OPS, st.just("restore again")), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_restore_continues_exactly_after_any_calls(
    before: list[tuple[str, int]],
    after: list[list[tuple[str, int]] | str],
    strategy: ConsolidationStrategy,
    seed: int,
) -> None:
    """Whatever the calls before a checkpoint (samples pending or not, copies of the live
    adapter at any point of their schedule, held-back samples, a task just begun), the
    restored runtime and the original go on identically under the same calls, and so does a
    restore of the restored one's own checkpoint."""

    async def main(tmp: Path) -> None:
        script = Script(seed).domain(seed)
        async with SonaRuntime(config(strategy), seed=seed) as a:
            for op in before:
                await apply(a, script, op)
            b = SonaRuntime.restore(await a.checkpoint(tmp / "a.sona"))
            assert b.stats() == a.stats() and same_outputs(a, b)
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(b)
                for i, ops in enumerate(after):
                    if ops == "restore again":
                        await stack.aclose()
                        b = SonaRuntime.restore(await b.checkpoint(tmp / f"b{i}.sona"))
                        await stack.enter_async_context(b)
                        assert learning(b.stats()) == learning(a.stats())
                        continue
                    for op in ops:
                        state = script.rng.bit_generator.state
                        reported = []
                        for rt in (a, b):
                            script.rng.bit_generator.state = state
                            reported.append(await apply(rt, script, op))
                        assert reported[0] == reported[1], op
                        assert same_outputs(a, b), op
                        assert learning(a.stats()) == learning(b.stats()), op

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp))


async def test_explorations_waiting_for_their_rating_survive(tmp_path: Path) -> None:
    x = Script(2).vec()
    async with SonaRuntime(config(), seed=1) as a:
        a.forward(x, TargetModule.Q_PROJ, explore=True)
        path = await a.checkpoint(tmp_path / "c.sona")
    b = SonaRuntime.restore(path)
    async with b:
        await b.submit(TrainingSample(x, x, 0.5))  # seeds the rating baseline
        res = await b.adapt(x, AdaptFeedback.from_quality(0.9), TargetModule.Q_PROJ)
        assert res.applied, res.notes


async def test_checkpoint_before_start_and_after_stop(tmp_path: Path) -> None:
    rt = SonaRuntime(config(), seed=3)
    fresh = await rt.checkpoint(tmp_path / "fresh.sona")
    assert read(fresh).next_sample_id == 1
    async with rt:
        await play(rt, Script(3).steps(20))
    stopped = await rt.checkpoint(tmp_path / "stopped.sona")
    again = SonaRuntime.restore(stopped)
    assert again.stats() == rt.stats() and same_outputs(rt, again)
    assert read(stopped).next_sample_id == 21


async def test_config_may_change_except_what_shapes_the_state(tmp_path: Path) -> None:
    async with SonaRuntime(config(), seed=3) as rt:
        await play(rt, Script(4).steps(10))
        path = await rt.checkpoint(tmp_path / "c.sona")
    relaxed = config(checkpoint_interval_s=5.0).replace(
        max_pending_samples=50, supervision=SupervisionConfig(max_restarts=7)
    )
    b = SonaRuntime.restore(path, config=relaxed)
    assert b.config is relaxed and same_outputs(rt, b)
    for name in STATE_FIELDS:
        other = {
            "micro_lora": MicroLoraConfig.for_hidden_dim(DIM),
            "training": TrainingConfig(ewc_lambda=0.1),
            "pattern_clusters": 4,
            "consolidated_rank": 3,
            "consolidation_strategy": ConsolidationStrategy.AVERAGE,
        }[name]
        with pytest.raises(ConfigMismatchError, match=name) as info:
            SonaRuntime.restore(path, config=config().replace(**{name: other}))
        assert str(path) in str(info.value)
    with pytest.raises(TypeError, match="config"):
        SonaRuntime.restore(path, config={"instant_lr": 1.0})  # type: ignore[arg-type]


def test_config_round_trip() -> None:
    for cfg in (config(), SonaLlmConfig.high_quality(32), SonaLlmConfig.minimal_memory(8)):
        assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(FormatError, match="unknown fields"):
        config_from_dict({**config_to_dict(config()), "future": 1})
    with pytest.raises(FormatError, match="instant_lr"):
        config_from_dict({"instant_lr": -1.0})
    with pytest.raises(FormatError, match="instant_lr"):
        config_from_dict({"instant_lr": 10**400})
    micro = config_to_dict(config())["micro_lora"]
    assert isinstance(micro, dict)
    with pytest.raises(FormatError, match="gradient_checkpointing"):
        config_from_dict({"micro_lora": {**micro, "gradient_checkpointing": 0.0}})


async def test_bad_arguments_change_nothing(tmp_path: Path) -> None:
    async with SonaRuntime(config(), seed=3) as rt:
        await play(rt, Script(5).steps(5))
        before = rt.stats()
        with pytest.raises(TypeError, match="path"):
            await rt.checkpoint(3)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="directory"):
            await rt.checkpoint(tmp_path)
        with pytest.raises(InvalidInputError, match="checkpoint_dir"):
            await rt.checkpoint()
        assert rt.stats() == before and list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="path"):
        SonaRuntime.restore(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="no such"):
        SonaRuntime.restore(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"not a checkpoint at all, clearly")
    with pytest.raises(FormatError, match="junk"):
        SonaRuntime.restore(tmp_path / "junk")
    with pytest.raises(TypeError, match="checkpoint_dir"):
        SonaRuntime(config(), checkpoint_dir=3.5)
    with pytest.raises(FormatError, match="no readable checkpoint"):
        SonaRuntime.restore(tmp_path)


# ---------------------------------------------------------------------- checkpoint_dir
def cfg_dir(**kw: Any) -> Any:
    return config(**{"checkpoint_interval_s": 3600.0, **kw})


async def test_graceful_stop_writes_a_final_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "d"
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as rt:
        await play(rt, Script(6).steps(30))
        await rt.consolidate()
        await play(rt, Script(7).steps(7))
    b = SonaRuntime.restore(d)
    assert b.restored is not None and b.restored.replayed == ()
    assert b.stats() == rt.stats() and same_outputs(rt, b)
    assert b.checkpoint_dir == d
    async with b:
        await play(b, Script(8).steps(5))
    assert SonaRuntime.restore(d).stats() == b.stats()


async def test_periodic_checkpoints_prune_and_truncate_the_log(tmp_path: Path) -> None:
    from sona.checkpoint_store import list_checkpoints
    from sona.sample_log import LOG_FILE, log_summary

    d = tmp_path / "d"
    seen: list[CheckpointWritten] = []
    async with SonaRuntime(cfg_dir(checkpoint_interval_s=0.05), seed=8, checkpoint_dir=d) as rt:
        async with rt.subscribe([CheckpointWritten]) as events:
            script = Script(9)
            for _ in range(5):
                await play(rt, script.steps(10))
                with anyio.fail_after(10):
                    async for ev in events:
                        seen.append(ev)
                        break
        files = list_checkpoints(d)
        assert len(files) == 2  # the two newest are kept
        older = read(files[1][1])
        rows, first, _, _ = log_summary(d / LOG_FILE)
        assert rows == 0 or first > older.log_sequence  # truncated only below the older one
    assert [e.log_sequence for e in seen] == sorted(e.log_sequence for e in seen)
    assert all(Path(e.path).parent == d and e.bytes > 0 for e in seen)


async def test_a_periodic_checkpoint_that_fails_is_announced_and_the_runtime_serves_on(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Periodic checkpoints fail with nobody to raise to (disk full, permission denied): the
    host must hear of it on the bus, as it hears of every written one, and the runtime goes
    on accepting samples, which the log keeps until a checkpoint succeeds again."""
    from sona.events import CheckpointFailed

    d = tmp_path / "d"
    real = container.os.replace

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    steps = Script(15).steps(20, explore=False)
    async with SonaRuntime(cfg_dir(checkpoint_interval_s=0.02), seed=5, checkpoint_dir=d) as rt:
        async with rt.subscribe([CheckpointFailed, CheckpointWritten]) as events:
            monkeypatch.setattr(container.os, "replace", disk_full)
            with anyio.fail_after(10):
                async for ev in events:
                    if isinstance(ev, CheckpointFailed):
                        break
            assert "No space left on device" in ev.error and Path(ev.path).parent == d
            await play(rt, steps[:10])  # still serving
            monkeypatch.setattr(container.os, "replace", real)
            with anyio.fail_after(10):
                async for ev in events:
                    if isinstance(ev, CheckpointWritten):
                        break
        await play(rt, steps[10:])
    assert SonaRuntime.restore(d).stats() == rt.stats()


QUICK_STOP = SupervisionConfig(shutdown_timeout_s=0.5)  # the final checkpoint gets 1 s


async def _events_of_a_stop(
    rt: SonaRuntime, steps: list[tuple[str, Any]], checkpoints: int = 0
) -> list[Any]:
    """The checkpoint events published while ``rt`` runs ``steps``, writes ``checkpoints``
    more checkpoints and stops."""
    from sona.events import CheckpointFailed

    async with rt:
        subscription = rt.subscribe([CheckpointFailed, CheckpointWritten])
        events = await subscription.__aenter__()
        await play(rt, steps)
        for _ in range(checkpoints):
            await rt.checkpoint()
    seen = [ev async for ev in events]  # the bus is closed: what it buffered, then the end
    await subscription.__aexit__(None, None, None)
    return seen


async def test_a_final_checkpoint_that_times_out_is_announced(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The stop bounds the final checkpoint by a timeout; one that expires before anything is
    written leaves the previous checkpoint and the log, and the host hears of it."""
    from sona import durability
    from sona.events import CheckpointFailed

    d = tmp_path / "d"
    rt = SonaRuntime(cfg_dir(supervision=QUICK_STOP), seed=5, checkpoint_dir=d)
    stuck = anyio.Event()

    async def capture_forever(self: Any, seq: int) -> Any:
        if not rt._stopped:
            return self.capture_now(seq)
        await stuck.wait()  # the stop's checkpoint never gets its state

    monkeypatch.setattr(durability.Durability, "_capture", capture_forever)
    steps = Script(16).steps(12, explore=False)
    seen = await _events_of_a_stop(rt, steps)
    failed = [ev for ev in seen if isinstance(ev, CheckpointFailed)]
    assert len(failed) == 1 and "did not finish within 1 s" in failed[0].error
    assert Path(failed[0].path) == d and not any(isinstance(ev, CheckpointWritten) for ev in seen)
    monkeypatch.undo()
    restored = SonaRuntime.restore(d).restored  # from the first checkpoint and the log
    assert restored is not None and restored.replayed == tuple(range(1, 13))


async def test_a_final_checkpoint_written_past_its_timeout_is_still_pruned_and_announced(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A write in progress is not interrupted by the stop's timeout; the checkpoint it wrote
    is then pruned behind (older ones removed, the log truncated) and announced, not left as
    though it had failed."""
    import time

    from sona import durability
    from sona.checkpoint_store import list_checkpoints
    from sona.events import CheckpointFailed

    d = tmp_path / "d"
    rt = SonaRuntime(cfg_dir(supervision=QUICK_STOP), seed=6, checkpoint_dir=d)
    real = durability._write_verified

    def slow_write(*args: Any) -> int:
        if rt._stopped:  # the stop's checkpoint: outlasts the 1 s timeout
            time.sleep(1.5)
        return real(*args)

    monkeypatch.setattr(durability, "_write_verified", slow_write)
    steps = Script(17).steps(12, explore=False)
    seen = await _events_of_a_stop(rt, steps, checkpoints=2)  # three on disk before the stop
    assert not any(isinstance(ev, CheckpointFailed) for ev in seen)
    written = [ev for ev in seen if isinstance(ev, CheckpointWritten)]
    files = list_checkpoints(d)
    assert written and Path(written[-1].path) == files[0][1]  # the newest, announced
    assert len(files) == 2  # pruned behind it
    assert SonaRuntime.restore(d).stats() == rt.stats()


async def test_a_directory_holding_another_run_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    async with SonaRuntime(cfg_dir(), seed=1, checkpoint_dir=d) as rt:
        await play(rt, Script(1).steps(3))
        second = SonaRuntime(cfg_dir(), seed=2, checkpoint_dir=d)
        with pytest.raises(CheckpointDirError, match="in use"):
            async with second:
                pass
    fresh = SonaRuntime(cfg_dir(), seed=2, checkpoint_dir=d)
    with pytest.raises(CheckpointDirError, match="restore"):
        async with fresh:
            pass
    async with SonaRuntime.restore(d) as again:  # continuing it is fine
        assert again.stats().submitted_count == 3


async def test_checkpoint_into_a_directory_another_runtime_took_over_is_refused(
    tmp_path: Path,
) -> None:
    """After stop a runtime no longer holds checkpoint_dir: checkpoint() into it refuses while
    another runtime holds the directory, and once one has continued it (its pruning would
    delete the newer runtime's checkpoints, and a restore would go back to the older state)."""
    from sona.checkpoint_store import list_checkpoints

    d = tmp_path / "d"
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as a:
        await play(a, Script(6).steps(10))
    b = SonaRuntime.restore(d)
    async with b:
        await play(b, Script(7).steps(5))
        await b.checkpoint()
        files = list_checkpoints(d)
        with pytest.raises(CheckpointDirError, match="in use"):
            await a.checkpoint()
        assert list_checkpoints(d) == files
    files = list_checkpoints(d)
    with pytest.raises(CheckpointDirError, match="another runtime continued"):
        await a.checkpoint()
    with pytest.raises(CheckpointDirError, match="earlier run"):
        await SonaRuntime(cfg_dir(), seed=2, checkpoint_dir=d).checkpoint()
    assert list_checkpoints(d) == files
    assert SonaRuntime.restore(d).stats() == b.stats()
    assert await a.checkpoint(tmp_path / "a.sona") == tmp_path / "a.sona"  # a file: allowed


async def test_a_directory_named_like_the_next_checkpoint_is_stepped_over(tmp_path: Path) -> None:
    """Restore passes over what is not a checkpoint file; the runtime it gives then numbers
    its checkpoints past it instead of failing to write onto it."""
    from sona.checkpoint_store import checkpoint_name, list_checkpoints

    d = tmp_path / "d"
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as a:
        await play(a, Script(6).steps(5))
        await a.checkpoint()
        await play(a, Script(7).steps(5))
    newest = list_checkpoints(d)[0][0]
    (d / checkpoint_name(newest)).unlink()
    (d / checkpoint_name(newest)).mkdir()
    b = SonaRuntime.restore(d)
    async with b:
        await play(b, Script(8).steps(5))
    assert (d / checkpoint_name(newest)).is_dir()
    assert list_checkpoints(d)[0][0] > newest
    assert SonaRuntime.restore(d).stats() == b.stats()


async def test_a_restore_the_directory_moved_on_from_is_refused_at_start(tmp_path: Path) -> None:
    """A runtime restored from a directory that another runtime restored and continued
    before this one started would go on from the older state and prune the newer one."""
    d = tmp_path / "d"
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as a:
        await play(a, Script(6).steps(5))
    stale = SonaRuntime.restore(d)
    async with SonaRuntime.restore(d) as b:
        await play(b, Script(7).steps(5))
    with pytest.raises(CheckpointDirError, match="another runtime continued"):
        async with stale:
            pass
    assert SonaRuntime.restore(d).stats() == b.stats()


async def test_a_restore_whose_log_another_runtime_wrote_to_is_refused_at_start(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Two runtimes restored from one directory: the first logs samples and dies without a
    checkpoint (disk full at stop, or a kill). The second, started afterwards, would number
    its samples from the same id: their rows are ignored as already logged, its checkpoints
    then cover those ids, and the first runtime's acknowledged samples are lost for good."""
    d = tmp_path / "d"
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as a:
        await play(a, Script(6).steps(5, explore=False))
    first, stale = SonaRuntime.restore(d), SonaRuntime.restore(d)
    real = container.os.replace

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    acked = []
    with pytest.raises(OSError, match="No space"):
        async with first:
            for _, sample in Script(7).steps(4, explore=False)[::4]:
                acked.append((await first.submit(sample)).sample_id)
            monkeypatch.setattr(container.os, "replace", disk_full)
    monkeypatch.setattr(container.os, "replace", real)
    assert acked == [6]
    with pytest.raises(CheckpointDirError, match="another runtime continued"):
        async with stale:
            pass
    rt = SonaRuntime.restore(d)
    assert rt.restored is not None and rt.restored.replayed == (6,)


async def test_checkpoint_into_the_directory_before_start_and_after_stop(tmp_path: Path) -> None:
    """Outside start..stop, checkpoint() into checkpoint_dir takes the directory's lock for
    the write; the runtime then starts (or is restored) from the directory as usual."""
    from sona.checkpoint_store import list_checkpoints

    d = tmp_path / "d"
    a = SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d)
    assert (await a.checkpoint()).parent == d  # before start: claims the empty directory
    async with a:
        await play(a, Script(6).steps(10))
    after = await a.checkpoint()  # after stop, nobody else used the directory
    assert after == list_checkpoints(d)[0][1] and read(after).next_sample_id == 11
    b = SonaRuntime.restore(d)
    assert b.restored is not None and b.restored.checkpoint == after
    assert b.stats() == a.stats() and same_outputs(a, b)
    await b.checkpoint()  # restored, not started: continues the directory
    async with b:
        await play(b, Script(7).steps(5))
    assert SonaRuntime.restore(d).stats() == b.stats()


async def test_a_checkpoint_dir_that_is_empty_or_a_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where "" would have put the checkpoints and the log
    with pytest.raises(InvalidInputError, match="checkpoint_dir must name a directory"):
        SonaRuntime(cfg_dir(), checkpoint_dir="")
    with pytest.raises(InvalidInputError, match="path must name a checkpoint"):
        SonaRuntime.restore("")
    file = tmp_path / "file"
    file.write_text("not a directory")
    with pytest.raises(CheckpointDirError, match=f"checkpoint_dir {file} is not a directory"):
        SonaRuntime(cfg_dir(), checkpoint_dir=file)
    later = tmp_path / "later"
    for directory in (file / "sub", later):  # found only at start
        rt = SonaRuntime(cfg_dir(), checkpoint_dir=directory)
        if directory == later:
            later.write_text("became a file")
        with pytest.raises(CheckpointDirError, match=f"checkpoint_dir {directory} is not a"):
            async with rt:
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "later"]
    assert file.read_text() == "not a directory"


async def test_restore_from_a_file_into_a_new_directory(tmp_path: Path) -> None:
    async with SonaRuntime(config(), seed=4) as rt:
        await play(rt, Script(2).steps(12))
        path = await rt.checkpoint(tmp_path / "c.sona")
    b = SonaRuntime.restore(path, checkpoint_dir=tmp_path / "new")
    async with b:
        await play(b, Script(3).steps(4))
    c = SonaRuntime.restore(tmp_path / "new")
    assert c.stats() == b.stats() and same_outputs(b, c)


async def test_a_restore_into_a_new_directory_that_failed_to_start_can_be_retried(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A start that fails at its first checkpoint (disk full, or a kill there) must leave the
    new directory so that the same restore can be tried again, or restored from if that
    checkpoint made it to disk: never holding logged samples without a checkpoint, which
    refuses both (it reads as an earlier run, and as one without a readable checkpoint)."""
    d = tmp_path / "d"
    script = Script(13)
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as a:
        await play(a, script.steps(6, explore=False))
        await a.checkpoint()
        await play(a, script.steps(5, explore=False))  # logged, in no checkpoint
        shutil.copytree(d, tmp_path / "crash")
        expected = learning(a.stats())
    new = tmp_path / "new"
    b = SonaRuntime.restore(tmp_path / "crash", checkpoint_dir=new)
    assert b.restored is not None and len(b.restored.replayed) == 5
    real = container.os.replace

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(container.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        async with b:
            pass
    monkeypatch.setattr(container.os, "replace", real)
    c = SonaRuntime.restore(tmp_path / "crash", checkpoint_dir=new)
    async with c:
        await c.drain()
        assert learning(c.stats()) == expected


async def test_a_checkpoint_taken_during_a_deep_run_runs_it_again_after_restore(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The Deep run takes the accumulated quality that triggered it when it starts and
    counts its run when its result is installed. A checkpoint taken in between holds neither:
    restored from it (after a crash), the runtime forgot the run was due and waited for
    another threshold's worth of quality."""
    from runtime_helpers import hold_deep_runs

    from sona.events import DeepCompleted

    started, release = hold_deep_runs(monkeypatch)
    steps = Script(14).steps(40, explore=False)
    cfg = dataclasses.replace(config(), deep_trigger_threshold=10.0)
    async with SonaRuntime(cfg, seed=3) as rt:
        await play(rt, steps[:30])
        await rt.consolidate()  # something kept to replay: a run is due
        await play(rt, steps[30:31])
        await anyio.to_thread.run_sync(started.wait, 30)
        path = await rt.checkpoint(tmp_path / "mid-deep.sona")
        release.set()  # the restored runtime's run goes through
    b = SonaRuntime.restore(path)
    assert b.stats().deep_count == 0 and b.stats().accumulated_quality >= 10.0
    async with b, b.subscribe(DeepCompleted) as events:
        await play(b, steps[31:32])
        with anyio.fail_after(30):
            done = await events.__anext__()
        assert done.epochs > 0 and b.stats().deep_count == 1


async def test_crash_copy_replays_the_logged_samples(tmp_path: Path) -> None:
    """A copy of the directory taken while the runtime runs is what a crash leaves behind:
    restoring it replays the samples logged after the newest checkpoint, with their ids.

    (Explored quality-only ratings are left out: the exploration itself is not logged, so such
    a rating replayed after a crash is declined; see sona.durability.)"""
    d = tmp_path / "d"
    script = Script(11)
    async with SonaRuntime(cfg_dir(), seed=8, checkpoint_dir=d) as a:
        await play(a, script.steps(25, explore=False))
        await a.consolidate()
        await a.checkpoint()
        await play(a, script.steps(17, explore=False))  # logged, in no checkpoint
        shutil.copytree(d, tmp_path / "crash")
        b = SonaRuntime.restore(tmp_path / "crash")
        info = b.restored
        assert info is not None and len(info.replayed) == 17
        assert info.replayed == tuple(range(info.log_sequence + 1, info.log_sequence + 18))
        # a checkpoint of the restored, not yet started runtime keeps the samples to replay
        kept = SonaRuntime.restore(await b.checkpoint(tmp_path / "pending.sona"))
        assert kept.restored is not None and kept.restored.replayed == info.replayed
        async with b:
            await b.drain()
            assert same_outputs(a, b)
            assert learning(a.stats()) == learning(b.stats())
        async with kept:
            await kept.drain()
            assert same_outputs(a, kept)


async def test_replayed_samples_are_handled_before_new_ones_can_drop_them(tmp_path: Path) -> None:
    """Samples logged after the newest checkpoint were acknowledged as applied before the
    crash. Under DROP_OLDEST, a new sample arriving when the restored runtime is full must
    not drop one of them as "the oldest not yet handled": the caller was told it was
    applied, and the restored runtime would never apply it."""
    from sona.actors import OverflowPolicy

    from sona.events import InstantApplied

    cfg = dataclasses.replace(  # no consolidation before the bound: every sample stays pending
        cfg_dir(),
        max_pending_samples=8,
        background_min_samples=8,
        overflow=OverflowPolicy.DROP_OLDEST,
    )
    script = Script(16)
    samples = [TrainingSample(script.vec(), script.vec(), 0.9) for _ in range(9)]
    d = tmp_path / "d"
    async with SonaRuntime(cfg, seed=8, checkpoint_dir=d) as a:
        for sample in samples[:3]:
            await a.submit(sample)
        await a.checkpoint()
        acked = [(await a.submit(sample)).sample_id for sample in samples[3:7]]
        assert a.stats().instant_count == a.stats().pending_samples == 7
        shutil.copytree(d, tmp_path / "crash")
    b = SonaRuntime.restore(tmp_path / "crash")
    assert b.restored is not None and list(b.restored.replayed) == acked
    async with b.subscribe(InstantApplied, buffer=64) as events:
        async with b:
            for sample in samples[7:]:  # the second finds the pending buffer full
                b.submit_nowait(sample)
            await b.drain()
        applied = {event.sample_id async for event in events}  # ends with the runtime
    assert set(acked) <= applied


async def test_samples_accepted_when_the_host_fails_are_kept(tmp_path: Path) -> None:
    """No drain when the host's block raises: what was accepted but not yet handled (or not
    yet logged) goes into the final checkpoint and is replayed by restore."""
    d = tmp_path / "d"
    steps = Script(12).steps(40, explore=False)
    with pytest.raises(RuntimeError, match="host failed"):
        async with SonaRuntime(cfg_dir(), seed=1, checkpoint_dir=d) as rt:
            for _, arg in steps:
                sample = arg if isinstance(arg, TrainingSample) else None
                if sample is not None:
                    rt.submit_nowait(sample)
            accepted = rt.stats().submitted_count
            raise RuntimeError("host failed")
    b = SonaRuntime.restore(d)
    info = b.restored
    assert info is not None
    assert info.log_sequence + len(info.replayed) == accepted
    async with b:
        await b.drain()
        assert b.stats().instant_count + b.stats().skipped_count == accepted


def test_restoring_from_something_that_is_neither_file_nor_directory_says_so(fifo: Path) -> None:
    with pytest.raises(InvalidInputError, match="neither a checkpoint file nor a directory"):
        SonaRuntime.restore(fifo)
