"""The durable sample log: exact records, durable rows, acknowledgement only after commit."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from runtime_helpers import FailsOnce, directory_state

from sona.checkpoint_store import in_use, list_checkpoints
from sona.config import SonaLlmConfig
from sona.errors import FormatError
from sona.feedback import AdaptFeedback
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.sample_codec import (
    _Record,
    decode_sample,
    encode_sample,
    pack_samples,
    unpack_samples,
)
from sona.sample_log import (
    LOG_FILE,
    LogWriter,
    SampleLog,
    SampleLogError,
    log_summary,
    record_crc,
)

DIM_IN, DIM_OUT = 5, 4


def rng_vec(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def every_kind(seed: int = 0) -> list[tuple[TrainingSample, TargetModule | None]]:
    rng = np.random.default_rng(seed)
    x = rng_vec(rng, DIM_IN)
    y = rng_vec(rng, DIM_OUT)
    plain = TrainingSample(x, y, 0.25)
    full = (
        plain.with_query("ünïcode ✓")
        .with_response("")
        .with_session("s-1")
        .with_tokens(7)
        .with_latency(12.5)
    )
    group = AdaptFeedback.from_group(np.stack([y, -y, 2 * y]), [0.1, 0.9, 0.5])
    return [
        (plain, None),
        (full, TargetModule.V_PROJ),
        (plain.with_feedback(AdaptFeedback.from_quality(0.7)), TargetModule.Q_PROJ),
        (plain.with_feedback(AdaptFeedback.from_quality(0.6).with_target(y)), None),
        (plain.with_feedback(AdaptFeedback.from_quality(1.0).with_gradient(-y)), None),
        (plain.with_feedback(AdaptFeedback.from_quality(0.0).with_output(y)), None),
        (plain.with_feedback(group), None),
    ]


def same_sample(a: TrainingSample, b: TrainingSample) -> bool:
    arrays = (
        a.input_embedding.tobytes() == b.input_embedding.tobytes()
        and a.output_embedding.tobytes() == b.output_embedding.tobytes()
    )
    fields = ("quality", "query", "response", "latency_ms", "token_count", "session_id")
    return (
        arrays
        and all(getattr(a, f) == getattr(b, f) for f in fields)
        and (a.feedback == b.feedback)
    )


def test_records_round_trip_exactly() -> None:
    for sample, module in every_kind():
        got, got_module = decode_sample(
            encode_sample(sample, module), in_features=DIM_IN, out_features=DIM_OUT
        )
        assert same_sample(sample, got) and got_module is module
        assert not got.input_embedding.flags.writeable  # as immutable as a submitted sample
    items = [(i + 1, s, m) for i, (s, m) in enumerate(every_kind(1))]
    back = unpack_samples(pack_samples(items), in_features=DIM_IN, out_features=DIM_OUT, what="x")
    assert [i for i, _, _ in back] == [1, 2, 3, 4, 5, 6, 7]
    assert all(same_sample(a[1], b[1]) for a, b in zip(items, back, strict=True))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a sample record"),
        (b"\x93\x01\x02\x03", "not a sample record"),
        (b"\xff" * 40, "not a sample record"),
    ],
)
def test_bad_records_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        decode_sample(data, in_features=DIM_IN, out_features=DIM_OUT, what="row 3")
    with pytest.raises(TypeError, match="bytes"):
        decode_sample("text", in_features=DIM_IN, out_features=DIM_OUT)  # type: ignore[arg-type]


def test_records_of_other_widths_or_with_bad_values_are_refused() -> None:
    sample, _ = every_kind()[0]
    data = encode_sample(sample)
    with pytest.raises(FormatError, match="row 9: invalid sample: input_embedding"):
        decode_sample(data, in_features=DIM_IN + 1, out_features=DIM_OUT, what="row 9")
    nan = np.full(DIM_IN, np.nan, np.float32).tobytes()
    bad = data.replace(sample.input_embedding.tobytes(), nan)
    with pytest.raises(FormatError, match="NaN"):
        decode_sample(bad, in_features=DIM_IN, out_features=DIM_OUT)


def _edited(sample: TrainingSample, **changes: Any) -> bytes:
    """``sample``'s record with fields replaced, as only a damaged or forged log holds it."""
    fields = list(msgspec.msgpack.decode(encode_sample(sample)))
    names = list(_Record.__struct_fields__)
    for name, value in changes.items():
        fields[names.index(name)] = value
    return msgspec.msgpack.encode(fields)


def _forged_records() -> dict[str, tuple[bytes, str]]:
    kinds = every_kind()
    plain, quality_only, target, group = (kinds[i][0] for i in (0, 2, 3, 6))
    y = target.output_embedding.tobytes()
    pair = np.array([0.2, 0.9]).tobytes()
    return {
        "a newer version": (_edited(plain, version=2), "record version 2"),
        "a longer input": (_edited(plain, x=plain.input_embedding.tobytes() + b"\0" * 4), "holds"),
        "feedback arrays without a kind": (_edited(plain, fb_vector=y), "without a feedback kind"),
        "quality-only feedback with a vector": (
            _edited(quality_only, fb_vector=y),
            "carries no vector",
        ),
        "a group of one": (_edited(group, group=np.array([0.5]).tobytes()), "at least two"),
        "a group quality above 1": (
            _edited(group, group=np.array([0.2, 1.5]).tobytes()),
            "in [0, 1]",
        ),
        "a group pulling towards NaN": (
            _edited(group, group=pair, fb_vector=np.full(DIM_OUT, np.nan, np.float32).tobytes()),
            "NaN",
        ),
    }


@pytest.mark.parametrize("case", list(_forged_records()))
def test_a_record_no_encoder_writes_is_refused(case: str) -> None:
    data, problem = _forged_records()[case]
    with pytest.raises(FormatError, match=rf"^row 4: .*{re.escape(problem)}"):
        decode_sample(data, in_features=DIM_IN, out_features=DIM_OUT, what="row 4")


def test_a_sample_aimed_at_a_module_keeps_it_through_its_record() -> None:
    sample = every_kind()[0][0].with_module(TargetModule.V_PROJ)
    got, module = decode_sample(encode_sample(sample), in_features=DIM_IN, out_features=DIM_OUT)
    assert module is TargetModule.V_PROJ and got.module is TargetModule.V_PROJ


def test_log_rows_survive_reopening_and_truncation_is_exact(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILE
    log = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)
    items = [(i, s, m) for i, (s, m) in enumerate(every_kind(), start=10)]
    log.append_samples(items[:4])
    log.append_samples(items[4:])
    log.append_samples(items[:1])  # logged again: kept as it was
    assert (log.count(), log.last_id()) == (7, 16)
    assert log.get_meta("format") == "sona.sample_log/1"
    log.close()
    again = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    got = again.samples_after(12, modules=(TargetModule.Q_PROJ, TargetModule.V_PROJ))
    assert [i for i, _, _ in got] == [13, 14, 15, 16]
    assert all(same_sample(a[1], b[1]) for a, b in zip(items[3:], got, strict=True))
    assert again.truncated_through() == 0
    assert again.truncate_through(13) == 4
    assert [i for i, _ in again.records_after(0)] == [14, 15, 16]
    assert log_summary(path, 14) == (3, 14, 16, 2)
    again.truncate_through(9)  # nothing left below: the record never goes back
    assert again.truncated_through() == 13
    assert again.truncate_through(100, chunk=1) == 3
    assert again.truncated_through() == 16  # through the last row deleted
    again.close()


def test_outcomes_commit_with_the_rows_and_are_truncated_with_them(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILE
    log = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)
    log.append_samples([(i, s, m) for i, (s, m) in enumerate(every_kind(), start=1)])
    assert log.outcomes_after(0) == {}
    assert tables(path)[0] == ["meta", "samples"]  # the table comes with its first outcome
    log.append([], [(3, "dropped"), (9, "dead_lettered")])
    log.append([], [(3, "dead_lettered")])  # the first outcome recorded stays
    assert log.outcomes_after(0) == {3: "dropped", 9: "dead_lettered"}
    assert log.outcomes_after(3) == {9: "dead_lettered"}
    assert log_summary(path, 0) == (7, 1, 7, 6)  # ids 1..7, one of them not to replay
    assert log.truncate_through(5) == 5
    assert log.outcomes_after(0) == {9: "dead_lettered"}
    log.close()


def test_a_foreign_or_mismatched_log_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a database, not even close" * 100)
    with pytest.raises(FormatError, match="junk"):
        SampleLog(junk, in_features=DIM_IN, out_features=DIM_OUT)
    SampleLog(tmp_path / "a", in_features=DIM_IN, out_features=DIM_OUT).close()
    with pytest.raises(FormatError, match="widths"):
        SampleLog(tmp_path / "a", in_features=DIM_IN, out_features=DIM_OUT + 1)
    other = sqlite3.connect(tmp_path / "b")
    other.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    other.execute("INSERT INTO meta VALUES ('format', 'something else')")
    other.commit()
    other.close()
    with pytest.raises(FormatError, match="not a sona sample log"):
        SampleLog(tmp_path / "b", in_features=DIM_IN, out_features=DIM_OUT)


def test_a_bad_row_is_named_on_restore(tmp_path: Path) -> None:
    log = SampleLog(tmp_path / LOG_FILE, in_features=DIM_IN, out_features=DIM_OUT)
    log.append([(5, b"\x00garbage")])
    with pytest.raises(FormatError, match=r"sample 5"):
        log.samples_after(0, modules=(TargetModule.Q_PROJ,))
    log.close()


# ---------------------------------------------------------------------- with the runtime
def config(**kw: Any) -> SonaLlmConfig:
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig(in_features=DIM_IN, out_features=DIM_OUT),
        background_interval_ms=3_600_000,
        background_min_samples=2,
        deep_trigger_threshold=1e9,
        checkpoint_interval_s=3600.0,
        **kw,
    )


def samples(n: int) -> list[TrainingSample]:
    rng = np.random.default_rng(3)
    return [TrainingSample(rng_vec(rng, DIM_IN), rng_vec(rng, DIM_OUT), 0.9) for _ in range(n)]


@pytest.mark.anyio
async def test_submit_returns_only_once_the_sample_is_committed(tmp_path: Path) -> None:
    d = tmp_path / "d"
    async with SonaRuntime(config(), seed=1, checkpoint_dir=d) as rt:
        for s in samples(5):
            res = await rt.submit(s)
            # another connection sees the committed row the moment submit returns
            rows, _, last, _ = log_summary(d / LOG_FILE)
            assert last == res.sample_id and res.applied
        assert rows == 5


@pytest.mark.anyio
async def test_concurrent_submits_share_transactions(tmp_path: Path) -> None:
    async with SonaRuntime(config(), seed=1, checkpoint_dir=tmp_path / "d") as rt:
        batch = samples(200)
        async with anyio.create_task_group() as tg:
            for s in batch:
                tg.start_soon(rt.submit, s)
        writer = rt._durable.writer
        assert writer is not None and writer.done_total == 200
        assert writer.batches < 100  # group commit: far fewer transactions than samples
        assert rt.stats().instant_count == 200


@pytest.mark.anyio
async def test_outcomes_of_a_failed_transaction_go_with_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction that failed took the outcomes recorded for it down with it: the next one
    must commit them, or a restore replays a sample whose caller was told it was dropped."""
    log = SampleLog(tmp_path / LOG_FILE, in_features=DIM_IN, out_features=DIM_OUT)
    (plain, _), *_ = every_kind()
    logged: list[list[str]] = []
    failed: list[list[str]] = []
    writer: LogWriter[str] = LogWriter(log, logged.append, lambda t, _exc: failed.append(t))
    monkeypatch.setattr(
        log, "append", FailsOnce(log.append, SampleLogError("database or disk is full"))
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        writer.put(8, plain, None, "eight")
        writer.record(7, "dropped")
        await writer.flush()
        assert failed == [["eight"]] and log.outcomes_after(0) == {}
        writer.put(9, plain, None, "nine")
        await writer.flush()
        tg.cancel_scope.cancel()
    assert logged == [["nine"]]
    assert log.outcomes_after(0) == {7: "dropped"}
    assert [sid for sid, _ in log.records_after(0)] == [9]
    log.close()


@pytest.mark.anyio
async def test_a_failing_log_refuses_the_sample_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SonaRuntime(config(), seed=1, checkpoint_dir=tmp_path / "d") as rt:
        first, second = samples(2)
        await rt.submit(first)
        probe = np.ones(DIM_IN, np.float32)
        before = rt.forward(probe, TargetModule.Q_PROJ)
        stats = rt.stats()

        def disk_full(self: SampleLog, *rows: Any) -> None:
            raise SampleLogError("database or disk is full")

        monkeypatch.setattr(SampleLog, "append", disk_full)
        with pytest.raises(SampleLogError, match="disk is full"):
            await rt.submit(second)
        after = rt.stats()
        assert rt.forward(probe, TargetModule.Q_PROJ).tobytes() == before.tobytes()
        assert after.instant_count == stats.instant_count
        assert after.dropped_samples == stats.dropped_samples + 1
        assert after.submitted_count == (
            after.instant_count
            + after.skipped_count
            + after.dropped_samples
            + after.dead_lettered
            + after.in_flight
        )
        monkeypatch.undo()
        assert (await rt.submit(second)).applied


def restorable(directory: Path) -> list[int]:
    """A checkpoint_dir whose newest checkpoint is gone, as after losing it to a crash: restore
    falls back to the one before and replays the samples logged after it. Their ids."""

    async def run() -> list[int]:
        async with SonaRuntime(config(), seed=1, checkpoint_dir=directory) as rt:
            for s in samples(4):
                await rt.submit(s)
            await rt.checkpoint()
            return [(await rt.submit(s)).sample_id for s in samples(3)]

    ids = anyio.run(run)
    list_checkpoints(directory)[0][1].unlink()
    info = SonaRuntime.restore(directory).restored
    assert info is not None and info.replayed == tuple(ids)
    return ids


def tables(path: Path) -> tuple[list[str], str]:
    """The tables of a SQLite file and its journal mode."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        names = [name for (name,) in rows]
        return names, db.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        db.close()


def test_a_log_that_lost_a_table_is_refused_as_it_is(tmp_path: Path) -> None:
    d = tmp_path / "d"
    restorable(d)
    db = sqlite3.connect(d / LOG_FILE)
    db.execute("DROP TABLE samples")
    db.commit()
    db.close()
    with pytest.raises(FormatError, match=rf"{LOG_FILE}: .*no samples table"):
        SonaRuntime.restore(d)
    with pytest.raises(FormatError, match="no samples table"):
        SampleLog(d / LOG_FILE, in_features=DIM_IN, out_features=DIM_OUT)
    assert tables(d / LOG_FILE) == (["meta"], "wal")  # not recreated empty
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.commit()
    db.close()
    with pytest.raises(FormatError, match="no meta and samples table"):
        SampleLog(other, in_features=DIM_IN, out_features=DIM_OUT)
    assert tables(other) == (["notes"], "delete")  # not even switched to WAL
    # an empty file, and the empty tables an interrupted creation left, are new logs
    (tmp_path / "empty").write_bytes(b"")
    blank = tmp_path / "blank"
    db = sqlite3.connect(blank)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY, record BLOB NOT NULL)")
    db.commit()
    db.close()
    for path in (tmp_path / "empty", blank):
        log = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)
        assert log.get_meta("format") == "sona.sample_log/1" and log.count() == 0
        log.close()


@pytest.mark.parametrize("value", ["'a record'", "CAST(x'ff93' AS TEXT)", "12", "1.5"])
def test_a_record_not_stored_as_a_blob_is_named_on_restore(tmp_path: Path, value: str) -> None:
    d = tmp_path / "d"
    ids = restorable(d)
    db = sqlite3.connect(d / LOG_FILE)
    db.execute(f"UPDATE samples SET record = {value} WHERE id = ?", (ids[1],))
    db.commit()
    db.close()
    with pytest.raises(FormatError, match=rf"{LOG_FILE} \(sample {ids[1]}\): .* stored as SQLite"):
        SonaRuntime.restore(d)


@pytest.mark.parametrize("sid", [0, -3])
def test_a_row_id_below_1_is_refused_on_restore(tmp_path: Path, sid: int) -> None:
    """Sample ids start at 1: such a row was never acknowledged, so the log was altered."""
    d = tmp_path / "d"
    ids = restorable(d)
    db = sqlite3.connect(d / LOG_FILE)
    db.execute(
        "INSERT INTO samples (id, record) SELECT ?, record FROM samples WHERE id = ?", (sid, ids[0])
    )
    db.commit()
    db.close()
    with pytest.raises(FormatError, match=rf"{LOG_FILE} \(sample {sid}\): not a sample id"):
        SonaRuntime.restore(d)
    log = SampleLog(d / LOG_FILE, in_features=DIM_IN, out_features=DIM_OUT)
    with pytest.raises(FormatError, match="not a sample id"):
        log.records_after(ids[-1])
    log.close()


def test_a_logged_sample_for_a_module_not_targeted_is_refused_on_restore(tmp_path: Path) -> None:
    """As in a checkpoint's queued samples: the runtime refuses such a module at the call."""
    d = tmp_path / "d"
    ids = restorable(d)
    sample, _ = every_kind()[0]
    record = encode_sample(sample, TargetModule.K_PROJ)
    db = sqlite3.connect(d / LOG_FILE)
    db.execute(
        "UPDATE samples SET record = ?, crc = ? WHERE id = ?",
        (record, record_crc(ids[2], record), ids[2]),
    )
    db.commit()
    db.close()
    with pytest.raises(
        FormatError, match=rf"{LOG_FILE} \(sample {ids[2]}\): names module k_proj, not targeted"
    ):
        SonaRuntime.restore(d)


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_bit_flipped_in_a_stored_row_is_named_on_restore(tmp_path: Path, where: str) -> None:
    """SQLite checks its write-ahead log's frames, not the rows of its database file: a flipped
    bit there decoded as a different sample (a float of its input changed) or as none."""
    d = tmp_path / "d"
    ids = restorable(d)
    db = sqlite3.connect(d / LOG_FILE)
    (record,) = db.execute("SELECT record FROM samples WHERE id = ?", (ids[1],)).fetchone()
    flipped = bytearray(record)
    flipped[len(flipped) // 2 if where == "first" else -1] ^= 0x04
    db.execute("UPDATE samples SET record = ? WHERE id = ?", (bytes(flipped), ids[1]))
    db.commit()
    db.close()
    before = directory_state(d)
    with pytest.raises(FormatError, match=rf"{LOG_FILE} \(sample {ids[1]}\): .*CRC"):
        SonaRuntime.restore(d)
    assert directory_state(d) == before


def test_a_log_older_versions_wrote_is_read_and_gains_crcs(tmp_path: Path) -> None:
    """Rows without a CRC (NULL) are read unchecked; opening the log to write adds the column,
    and the rows written from then on are checked."""
    path = tmp_path / LOG_FILE
    (old, _), (new, _) = every_kind()[:2]
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY, record BLOB NOT NULL)")
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [
            ("format", "sona.sample_log/1"),
            ("in_features", str(DIM_IN)),
            ("out_features", str(DIM_OUT)),
        ],
    )
    db.execute("INSERT INTO samples VALUES (1, ?)", (encode_sample(old),))
    db.commit()
    db.close()
    with SampleLog.reading(path, in_features=DIM_IN, out_features=DIM_OUT) as reader:
        assert [sid for sid, _ in reader.records_after(0)] == [1]
    assert "crc" not in [c[1] for c in sqlite3.connect(path).execute("PRAGMA table_info(samples)")]
    log = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)
    log.append([(2, encode_sample(new))])
    assert [sid for sid, _ in log.records_after(0)] == [1, 2]
    log.close()
    db = sqlite3.connect(path)
    stored = dict(db.execute("SELECT id, crc FROM samples").fetchall())
    assert stored == {1: None, 2: record_crc(2, encode_sample(new))}
    db.execute("UPDATE samples SET crc = crc + 1 WHERE id = 2")
    db.commit()
    db.close()
    log = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)
    with pytest.raises(FormatError, match=r"\(sample 2\): .*CRC"):
        log.records_after(0)
    log.close()


def test_an_unknown_outcome_is_named_on_restore(tmp_path: Path) -> None:
    d = tmp_path / "d"
    ids = restorable(d)
    db = sqlite3.connect(d / LOG_FILE)
    db.execute("CREATE TABLE outcomes (id INTEGER PRIMARY KEY, outcome TEXT NOT NULL)")
    db.execute("INSERT INTO outcomes VALUES (?, 'forgotten')", (ids[1],))
    db.commit()
    db.close()
    with pytest.raises(FormatError, match=rf"{LOG_FILE} \(sample {ids[1]}\): unknown outcome"):
        SonaRuntime.restore(d)


# ---------------------------------------------------------------------- reading without writing
def killed(tmp_path: Path) -> tuple[Path, list[int]]:
    """A checkpoint_dir as a runtime killed now would leave it (copied while the runtime runs,
    between two of its writes): the samples logged after its checkpoint only in the log's
    ``-wal``, with the ``-shm`` index beside it. The directory and those samples' ids."""
    live, d = tmp_path / "live", tmp_path / "killed"

    async def run() -> list[int]:
        async with SonaRuntime(config(), seed=1, checkpoint_dir=live) as rt:
            ids = [(await rt.submit(s)).sample_id for s in samples(5)]
            shutil.copytree(live, d)
        return ids

    ids = anyio.run(run)
    assert {f"{LOG_FILE}-wal", f"{LOG_FILE}-shm"} <= {p.name for p in d.iterdir()}
    return d, ids


async def handled(rt: SonaRuntime) -> int:
    async with rt:
        await rt.drain()
        return rt.stats().instant_count


def test_restoring_leaves_the_source_directory_byte_for_byte_as_it_was(tmp_path: Path) -> None:
    """A restore only reads its source: not even SQLite's -wal and -shm files change. Only a
    runtime started in that directory writes there (and then continues its log)."""
    d, ids = killed(tmp_path)
    before = directory_state(d)
    elsewhere = SonaRuntime.restore(d, checkpoint_dir=tmp_path / "elsewhere")
    assert elsewhere.restored is not None and elsewhere.restored.replayed == tuple(ids)
    assert directory_state(d) == before
    assert anyio.run(handled, elsewhere) == len(ids)
    assert directory_state(d) == before
    here = SonaRuntime.restore(d)  # continues d once started; until then it is only read
    assert here.restored is not None and here.restored.replayed == tuple(ids)
    assert directory_state(d) == before
    assert anyio.run(handled, here) == len(ids)
    again = SonaRuntime.restore(d)
    assert again.restored is not None and again.restored.replayed == ()
    assert again.stats().instant_count == len(ids)


@pytest.mark.anyio
async def test_a_directory_a_runtime_is_running_in_is_read_with_what_it_logged(
    tmp_path: Path,
) -> None:
    """Read through SQLite's index, like any reader's, while a runtime may be writing."""
    d = tmp_path / "d"
    async with SonaRuntime(config(), seed=1, checkpoint_dir=d) as rt:
        ids = [(await rt.submit(s)).sample_id for s in samples(4)]
        assert in_use(d)
        copy = SonaRuntime.restore(d, checkpoint_dir=tmp_path / "copy")
        assert copy.restored is not None and copy.restored.replayed == tuple(ids)
        assert log_summary(d / LOG_FILE)[:3] == (4, ids[0], ids[-1])
    assert not in_use(d)


def test_a_log_written_to_while_it_is_copied_is_read_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of a log with a -wal is read only if neither file changed while it was made:
    otherwise it may hold an older state, or a mix of two, and the log is read through
    SQLite's index instead."""
    path = tmp_path / LOG_FILE
    log = SampleLog(path, in_features=DIM_IN, out_features=DIM_OUT)  # a writer no lock announces
    record = encode_sample(samples(1)[0])
    log.append([(1, record)])
    real = shutil.copyfile
    calls = 0

    def copy_then_write(src: Any, dst: Any) -> Any:
        nonlocal calls
        out = real(src, dst)
        calls += 1
        if calls == 2:  # both files copied: the copy holds row 1 only
            log.append([(2, record)])
        return out

    monkeypatch.setattr(shutil, "copyfile", copy_then_write)
    assert log_summary(path) == (2, 1, 2, 2)
    assert calls == 2
    log.close()
