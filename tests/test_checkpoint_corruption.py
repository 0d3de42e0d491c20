"""A damaged checkpoint is always detected, named, and never half-loaded."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from container_edits import set_at
from runtime_helpers import directory_state

from sona import checkpoint as ckpt
from sona import container
from sona.checkpoint_store import list_checkpoints
from sona.config import SonaLlmConfig
from sona.errors import CheckpointDirError, FormatError
from sona.lora_config import MicroLoraConfig, TargetModule
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.sample_codec import decode_sample, encode_sample
from sona.sample_log import LOG_FILE

DIM = 6


def small_config(**kw: Any) -> SonaLlmConfig:
    return SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM),
        background_interval_ms=3_600_000,
        background_min_samples=3,
        deep_trigger_threshold=1e9,
        pattern_clusters=2,
        replay_capacity=20,
        **kw,
    )


def samples(n: int, seed: int = 0) -> list[TrainingSample]:
    rng = np.random.default_rng(seed)
    return [
        TrainingSample(rng.standard_normal(DIM), rng.standard_normal(DIM), 0.8).with_query("q")
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("c") / "c.sona"

    async def make() -> None:
        async with SonaRuntime(small_config(), seed=1) as rt:
            for s in samples(8):
                await rt.submit(s)
            await rt.consolidate()
            for s in samples(3, 1):
                await rt.submit(s)
            await rt.checkpoint(path)

    anyio.run(make)
    return path.read_bytes()


def test_every_flipped_byte_is_detected_and_names_the_file(checkpoint_bytes: bytes) -> None:
    data = checkpoint_bytes
    assert ckpt.decode(data, what="c.sona").next_sample_id == 12
    rng = np.random.default_rng(0)
    masks = rng.integers(1, 256, size=len(data))
    for i in range(len(data)):  # every position, each with some non-zero change
        bad = bytearray(data)
        bad[i] ^= int(masks[i])
        with pytest.raises(FormatError) as info:
            ckpt.decode(bytes(bad), what="c.sona")
        assert str(info.value).startswith("c.sona:")


def test_a_flipped_byte_in_a_file_is_named(tmp_path: Path, checkpoint_bytes: bytes) -> None:
    for pos in (0, 9, 30, len(checkpoint_bytes) // 2, len(checkpoint_bytes) - 1):
        bad = bytearray(checkpoint_bytes)
        bad[pos] ^= 0x10
        path = tmp_path / f"flip{pos}.sona"
        path.write_bytes(bytes(bad))
        with pytest.raises(FormatError, match=re.escape(str(path))):
            ckpt.read(path)
        with pytest.raises(FormatError, match=re.escape(str(path))):
            SonaRuntime.restore(path)


def test_every_truncation_is_detected(checkpoint_bytes: bytes) -> None:
    n = len(checkpoint_bytes)
    for cut in sorted({*range(0, 64), *range(64, n, max(1, n // 300)), n - 1}):
        with pytest.raises(FormatError, match=r"c\.sona"):
            ckpt.decode(checkpoint_bytes[:cut], what="c.sona")
    with pytest.raises(FormatError, match=r"c\.sona"):
        ckpt.decode(checkpoint_bytes + b"\0", what="c.sona")


def body_with(header: dict[str, Any] | bytes, payload: bytes = b"", **prefix: int) -> bytes:
    """A container with a correct checksum around whatever header and payload we like."""
    raw = header if isinstance(header, bytes) else msgspec.json.encode(header)
    fields = {"version": 1, "header_len": len(raw), "payload_len": len(payload), **prefix}
    head = struct.pack(
        "<8sHHIQ", ckpt.MAGIC, fields["version"], 0, fields["header_len"], fields["payload_len"]
    )
    body = head + raw + payload
    return body + hashlib.blake2b(body, digest_size=32).digest()


@pytest.mark.parametrize(
    "prefix",
    [
        {"header_len": 2**32 - 1},
        {"payload_len": 2**63},
        {"payload_len": 2**40, "header_len": 2**20},
        {"version": 65535},
    ],
)
def test_absurd_sizes_are_refused_before_any_allocation(prefix: dict[str, int]) -> None:
    data = body_with({"kind": ckpt.KIND, "arrays": [], "meta": {}}, **prefix)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            ckpt.decode(data, what="absurd")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_absurd_array_shapes_with_a_valid_checksum_are_refused() -> None:
    for shape in ([2**40, 2**40], [10**18] * 4, [-1], [1, 2, 3, 4, 5]):
        header = {"kind": ckpt.KIND, "arrays": [{"name": "a", "dtype": "f4", "shape": shape}]}
        data = body_with({**header, "meta": {}}, b"\0" * 16)
        tracemalloc.start()
        try:
            with pytest.raises(FormatError):
                ckpt.decode(data, what="shape")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024


def _with_header_number(data: bytes, field: str, value: int) -> bytes:
    """The checkpoint with one header number replaced and the checksum made valid again, as
    anyone editing the file can do."""
    meta, arrays = container.decode(data, ckpt.MAGIC, ckpt.KIND)
    node = meta
    *path, last = field.split(".")
    for key in path:
        node = node[key]
    assert last in node
    node[last] = value
    return container.encode(ckpt.MAGIC, ckpt.KIND, meta, dict(arrays))


COUNTS = (
    "seed",
    "next_sample_id",
    "counters.submitted",
    "instant.applied",
    "background.runs",
    "pipeline.samples_seen",
    "pipeline.ewc.folded",
    "pipeline.detector.cal_n",
    "pipeline.detector.up_start",
    "pipeline.detector.down_start",
    "pipeline.detector.seen",
)
BEYOND = {"-1": -1, "2**70": 2**70, "1e400": 10**400}


@pytest.mark.parametrize(
    ("field", "value"),
    [pytest.param(f, v, id=f"{f}={label}") for f in COUNTS for label, v in BEYOND.items()]
    + [pytest.param("seed", 2**62, id="seed=2**62")]
    + [pytest.param("created_unix", t, id=f"created_unix={t:g}") for t in (-1.0, 1e20)]
    + [pytest.param("pipeline.detector.seen", 2**63 - 1, id="seen=2**63-1")]
    + [
        pytest.param(f, -(10**400), id=f"{f}=-1e400")
        for f in ("pipeline.detector.cal_mean", "pipeline.detector.up")
    ],
)
def test_header_numbers_no_run_could_write_are_refused(
    checkpoint_bytes: bytes, field: str, value: int
) -> None:
    """Counts beyond 2**53 (or past the int64 a kernel takes them in) and numbers beyond
    float range were taken as they were and raised OverflowError later, at restore or on the
    Background loop's every message."""
    with pytest.raises(FormatError, match=r"^forged"):
        ckpt.decode(_with_header_number(checkpoint_bytes, field, value), what="forged")


def test_pattern_bank_counts_no_run_could_write_are_refused(checkpoint_bytes: bytes) -> None:
    meta, arrays = container.decode(checkpoint_bytes, ckpt.MAGIC, ckpt.KIND)
    for bad in (-1, 2**53 + 1, 2**63 - 1):  # the last wrapped round to negative counts
        counts = np.array(arrays["bank.counts"])
        counts[0] = bad
        data = container.encode(ckpt.MAGIC, ckpt.KIND, meta, {**arrays, "bank.counts": counts})
        with pytest.raises(FormatError, match="pattern bank counts"):
            ckpt.decode(data, what="forged")


def test_an_adapter_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    from sona.lora import MicroLoRA

    MicroLoRA(MicroLoraConfig.for_hidden_dim(DIM), seed=0).save(tmp_path / "a.sona")
    with pytest.raises(FormatError, match="not a sona_checkpoint"):
        ckpt.read(tmp_path / "a.sona")


def test_restore_skips_an_unreadable_newest_checkpoint_and_loses_nothing(tmp_path: Path) -> None:
    d = tmp_path / "d"

    async def run() -> tuple[Any, list[int]]:
        cfg = small_config(checkpoint_interval_s=3600.0)
        acked = []
        async with SonaRuntime(cfg, seed=2, checkpoint_dir=d) as rt:
            for i, s in enumerate(samples(30, 3)):
                acked.append((await rt.submit(s)).sample_id)
                if i in (9, 19):
                    await rt.checkpoint()
            stats = rt.stats()
        return stats, acked

    stats, acked = anyio.run(run)
    files = list_checkpoints(d)
    assert len(files) == 2
    newest, older = files[0][1], files[1][1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0x01
    newest.write_bytes(bytes(data))
    rt = SonaRuntime.restore(d)
    info = rt.restored
    assert info is not None and info.checkpoint == older
    assert len(info.skipped) == 1 and str(newest) in info.skipped[0]
    assert all(i <= info.log_sequence or i in info.replayed for i in acked)

    async def finish() -> Any:
        async with rt:
            await rt.drain()
            return rt.stats()

    after = anyio.run(finish)
    assert after.submitted_count == stats.submitted_count == 30
    assert after.instant_count == stats.instant_count
    # the next checkpoints replace the damaged one
    assert all(ckpt.read(p) for _, p in list_checkpoints(d))


def test_a_temporary_file_a_kill_left_mid_write_is_removed_at_start(tmp_path: Path) -> None:
    """A process killed between writing a checkpoint's temporary file and renaming it leaves
    that file behind; the next runtime in the directory deletes it, and only it."""
    d = tmp_path / "d"

    async def run(rt: SonaRuntime) -> None:
        async with rt:
            for s in samples(3):
                await rt.submit(s)

    anyio.run(run, SonaRuntime(small_config(), seed=1, checkpoint_dir=d))
    stray = d / ".checkpoint-000000000009.sona.4f2a.tmp"
    stray.write_bytes(b"SONACKPT half of a checkpoint")
    other = d / "notes.tmp"
    other.write_bytes(b"the host's")
    anyio.run(run, SonaRuntime.restore(d))
    assert not stray.exists() and other.exists()


def test_no_readable_checkpoint_is_an_error_naming_each_file(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "checkpoint-000000000001.sona").write_bytes(b"SONACKPT garbage")
    (d / "checkpoint-000000000002.sona").write_bytes(b"")
    with pytest.raises(FormatError, match="no readable checkpoint") as info:
        SonaRuntime.restore(d)
    assert "checkpoint-000000000001.sona" in str(info.value)
    assert "checkpoint-000000000002.sona" in str(info.value)


def test_a_checkpoint_dir_that_lost_its_sample_log_is_refused_and_left_as_it_is(
    tmp_path: Path,
) -> None:
    """The samples acknowledged after the newest checkpoint were only in the log, and nothing
    records how many: restoring without it would lose them uncounted. The restore is refused,
    naming the file, before anything is written; the checkpoint file itself still restores,
    when the caller chooses to give those samples up."""
    d, crashed = tmp_path / "d", tmp_path / "crashed"

    async def run() -> list[int]:
        async with SonaRuntime(
            small_config(checkpoint_interval_s=3600.0), seed=2, checkpoint_dir=d
        ) as rt:
            for s in samples(4):
                await rt.submit(s)
            await rt.checkpoint()
            after = [(await rt.submit(s)).sample_id for s in samples(3, 1)]
            shutil.copytree(d, crashed)  # what a kill now would leave
        return after

    after = anyio.run(run)
    restored = SonaRuntime.restore(crashed)  # restored before the log goes
    assert restored.restored is not None and restored.restored.replayed == tuple(after)
    for suffix in ("", "-wal", "-shm"):
        (crashed / f"{LOG_FILE}{suffix}").unlink()
    newest = list_checkpoints(crashed)[0][1]
    before = directory_state(crashed)
    with pytest.raises(CheckpointDirError, match=f"{LOG_FILE} is missing") as info:
        SonaRuntime.restore(crashed)
    assert str(newest) in str(info.value)
    assert directory_state(crashed) == before

    async def start(rt: SonaRuntime) -> None:
        async with rt:
            pass

    # started now, it would log its replay into a new, empty log: a kill would lose it
    with pytest.raises(CheckpointDirError, match=f"{LOG_FILE} is missing"):
        anyio.run(start, restored)
    assert directory_state(crashed) == before
    chosen = SonaRuntime.restore(newest, checkpoint_dir=tmp_path / "fresh")
    assert chosen.restored is not None and chosen.restored.replayed == ()
    assert chosen.stats().submitted_count == 4
    anyio.run(start, chosen)
    assert SonaRuntime.restore(tmp_path / "fresh").stats().submitted_count == 4


def test_a_checkpoint_older_than_the_log_truncation_is_refused(tmp_path: Path) -> None:
    """A copy of a running directory (a backup) can hold an old checkpoint and a log already
    truncated past it, when the newer checkpoints were pruned before the copy reached them.
    Restoring that checkpoint would replay the rows after the truncation only, and lose the
    samples in between without a count: refused, naming both files and the way out."""
    d = tmp_path / "d"

    async def run() -> Path:
        async with SonaRuntime(
            small_config(checkpoint_interval_s=3600.0), seed=2, checkpoint_dir=d
        ) as rt:
            for s in samples(3):
                await rt.submit(s)
            old = await rt.checkpoint()
            shutil.copy(old, tmp_path / old.name)
            for k in range(3):  # the log is truncated past ``old``
                for s in samples(3, k + 1):
                    await rt.submit(s)
                await rt.checkpoint()
        return old

    old = anyio.run(run)
    for _, path in list_checkpoints(d):
        path.unlink()
    shutil.copy(tmp_path / old.name, old)
    before = directory_state(d)
    with pytest.raises(CheckpointDirError, match="truncated") as info:
        SonaRuntime.restore(d)
    assert str(old) in str(info.value) and LOG_FILE in str(info.value)
    assert directory_state(d) == before
    chosen = SonaRuntime.restore(old, checkpoint_dir=tmp_path / "fresh")  # giving them up
    assert chosen.stats().submitted_count == 3


def test_a_checkpoint_written_before_the_first_start_has_its_log_beside_it(
    tmp_path: Path,
) -> None:
    """So that a restore can tell a log that was lost from one that was never written: such a
    directory restores, and one whose log then goes missing is refused like any other."""
    d = tmp_path / "d"

    async def before_start() -> None:
        await SonaRuntime(small_config(), seed=2, checkpoint_dir=d).checkpoint()

    anyio.run(before_start)
    assert (d / LOG_FILE).is_file()
    restored = SonaRuntime.restore(d)
    assert restored.restored is not None and restored.restored.replayed == ()
    (d / LOG_FILE).unlink()
    with pytest.raises(CheckpointDirError, match=f"{LOG_FILE} is missing"):
        SonaRuntime.restore(d)


def test_a_failed_write_leaves_every_checkpoint_readable(tmp_path: Path, monkeypatch: Any) -> None:
    d = tmp_path / "d"

    async def run() -> None:
        async with SonaRuntime(small_config(), seed=2, checkpoint_dir=d) as rt:
            for s in samples(5):
                await rt.submit(s)
            real = container.os.replace

            def crash(*_: Any) -> None:
                raise OSError("simulated crash before rename")

            monkeypatch.setattr(container.os, "replace", crash)
            with pytest.raises(OSError, match="simulated"):
                await rt.checkpoint()
            monkeypatch.setattr(container.os, "replace", real)

    anyio.run(run)
    for _, path in list_checkpoints(d):
        ckpt.read(path)
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_the_streamed_file_is_the_encoded_bytes_and_bad_state_is_never_written(
    tmp_path: Path,
) -> None:
    async def capture() -> Any:
        async with SonaRuntime(small_config(), seed=4) as rt:
            for s in samples(6):
                await rt.submit(s)
            return rt._durable.capture_now()

    captured = anyio.run(capture)
    size = ckpt.write(captured, tmp_path / "c.sona")
    data = (tmp_path / "c.sona").read_bytes()
    assert data == ckpt.encode(captured) and size == len(data)
    captured.meta["log_sequence"] = captured.meta["next_sample_id"]  # a state that cannot be
    with pytest.raises(FormatError, match="log_sequence"):
        ckpt.write(captured, tmp_path / "bad.sona")
    assert not (tmp_path / "bad.sona").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.sona"]  # no temporary file left either


# ---------------------------------------------------------------------- forged states
def _sample_list(arrays: dict[str, np.ndarray], name: str) -> tuple[list[int], list[bytes]]:
    ids = [int(i) for i in arrays[f"samples.{name}.ids"]]
    blob = arrays[f"samples.{name}.records"].tobytes()
    records, offset = [], 0
    for n in map(int, arrays[f"samples.{name}.lengths"]):
        records.append(blob[offset : offset + n])
        offset += n
    return ids, records


def _set_sample_list(
    arrays: dict[str, np.ndarray], name: str, ids: list[int], records: list[bytes]
) -> None:
    arrays[f"samples.{name}.ids"] = np.array(ids, np.int64)
    arrays[f"samples.{name}.lengths"] = np.array([len(r) for r in records], np.int64)
    arrays[f"samples.{name}.records"] = np.frombuffer(b"".join(records), np.uint8)


def _pending_to_queued(keep: int, skip: int = 0) -> Any:
    """The newest pending samples moved to the queued list (the ``keep`` oldest stay pending,
    the next ``skip`` are left out) and the log sequence set just past the pending ones."""

    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        ids, records = _sample_list(arrays, "pending")
        _set_sample_list(arrays, "pending", ids[:keep], records[:keep])
        _set_sample_list(arrays, "queued", ids[keep + skip :], records[keep + skip :])
        meta["log_sequence"] = ids[keep] - 1
        # nor had the Instant loop copied its live adapter after the moved samples
        copies = meta["instant"]["copies"]
        kept = [at for at in copies if at <= keep]
        for i in range(len(kept), len(copies)):
            del arrays[f"adapter.copy.{i}"]
        meta["instant"]["copies"] = kept

    return edit


def _forged(checkpoint_bytes: bytes, edit: Any) -> bytes:
    """The checkpoint with ``edit`` applied to its header and arrays and the checksum made
    valid again, as anyone editing the file can do."""
    meta, arrays = container.decode(checkpoint_bytes, ckpt.MAGIC, ckpt.KIND)
    meta = copy.deepcopy(meta)
    arrays = {name: np.array(arr) for name, arr in arrays.items()}
    edit(meta, arrays)
    return container.encode(ckpt.MAGIC, ckpt.KIND, meta, arrays)


def _add_array(name: str, value: np.ndarray) -> Any:
    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = value

    return edit


def _both(*edits: Any) -> Any:
    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        for e in edits:
            e(meta, arrays)

    return edit


def _module_not_targeted(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    ids, records = _sample_list(arrays, "pending")
    sample, _ = decode_sample(records[0], in_features=DIM, out_features=DIM)
    records[0] = encode_sample(sample, TargetModule.K_PROJ)  # the adapter targets q and v
    _set_sample_list(arrays, "pending", ids, records)


def _nan_in(name: str) -> Any:
    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays[name].flat[0] = np.nan

    return edit


FORGED = {
    "a repeated ensemble label": (set_at("background.ensemble", [0, 0]), "duplicate ensemble"),
    "an ensemble label past the clusters": (
        set_at("background.ensemble", [2]),
        "exceeds pattern_clusters",
    ),
    "more centroids than clusters": (
        _both(
            set_at("background.centroids", True),
            _add_array("published.centroids", np.zeros((3, DIM), np.float32)),
        ),
        "more published centroids",
    ),
    "centroids not announced": (
        _add_array("published.centroids", np.zeros((1, DIM), np.float32)),
        "not announced",
    ),
    "an unknown loop flag": (set_at("instant.loop_state._someday", 1), "unknown Instant loop"),
    "an exploration of a module past the adapter's": (
        _both(
            set_at("instant.explored", 1),
            _add_array("live.explored.keys", np.array([[2, 7]], np.uint64)),
            _add_array("live.explored.sigma", np.array([0.1])),
        ),
        "exploration entries are out of range",
    ),
    "an array nothing reads": (_add_array("extra", np.zeros(2, np.float32)), "unexpected arrays"),
    "a log sequence at the next id": (set_at("log_sequence", 12), "log_sequence must be below"),
    "a pending sample above the log sequence": (set_at("log_sequence", 8), "contradicts"),
    "a gap before the queued samples": (_pending_to_queued(1, skip=1), "must follow"),
    "numbered replay samples": (
        lambda meta, arrays: arrays["samples.replay.ids"].__setitem__(0, 5),
        "replay samples carry no ids",
    ),
    "more replay samples than the capacity": (
        set_at("config.replay_capacity", 6),
        "more replay samples than replay_capacity",
    ),
    "fewer submitted than queued": (
        _both(_pending_to_queued(0), set_at("counters.submitted", 2)),
        "fewer samples submitted",
    ),
    "a sample for a module not targeted": (_module_not_targeted, "names module k_proj"),
    "NaN in an array": (_nan_in("pipeline.ewc.c"), "NaN or inf"),
    "a copy of the live adapter past the pending samples": (
        set_at("instant.copies", [1, 2, 4]),
        "past the pending samples",
    ),
    "copies of the live adapter out of order": (
        set_at("instant.copies", [2, 1, 3]),
        "out of order",
    ),
    "a copy of the live adapter not stored": (
        lambda meta, arrays: arrays.pop("adapter.copy.2"),
        "missing array adapter.copy.2",
    ),
    "a copy of the live adapter not announced": (
        set_at("instant.copies", [1, 2]),
        "unexpected arrays ['adapter.copy.2']",
    ),
    "an unfinished hand-over not announced": (
        lambda meta, arrays: arrays.__setitem__("adapter.unfinished", arrays["adapter.live"]),
        "unfinished hand-over present but not announced",
    ),
}


def test_a_forged_state_the_checks_pass_is_restorable(checkpoint_bytes: bytes) -> None:
    """The edits below are refused for what they change, not for being edits: moving the
    pending samples to the queued list, as a checkpoint taken before they were handled holds
    them, makes a checkpoint that decodes."""
    state = ckpt.decode(_forged(checkpoint_bytes, _pending_to_queued(0)), what="forged")
    assert [sid for sid, _, _ in state.queued] == [9, 10, 11]
    assert state.samples["pending"] == [] and state.log_sequence == 8


@pytest.mark.parametrize(("edit", "problem"), list(FORGED.values()), ids=list(FORGED))
def test_a_state_no_run_could_write_is_refused_though_its_checksum_is_valid(
    checkpoint_bytes: bytes, edit: Any, problem: str
) -> None:
    with pytest.raises(FormatError, match=rf"^forged: .*{re.escape(problem)}"):
        ckpt.decode(_forged(checkpoint_bytes, edit), what="forged")
