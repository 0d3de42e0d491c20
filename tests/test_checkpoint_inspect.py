"""``sona inspect`` on checkpoint files and checkpoint directories."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest
from runtime_helpers import directory_state

from sona import checkpoint
from sona import inspect as sona_inspect
from sona.checkpoint_store import list_checkpoints
from sona.config import SonaLlmConfig
from sona.lora_config import MicroLoraConfig
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample
from sona.sample_codec import encode_sample
from sona.sample_log import LOG_FILE, SampleLog

DIM = 8


def run(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = sona_inspect.run(str(path), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def fields(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines()[1:]:
        if not line:
            break  # the table of adapters follows
        if line.startswith("  ") and "  " in line.strip():
            key, _, value = line.strip().partition("  ")
            found[key] = value.strip()
    return found


def make(directory: Path, file: Path) -> None:
    cfg = SonaLlmConfig(
        micro_lora=MicroLoraConfig.for_hidden_dim(DIM),
        background_interval_ms=3_600_000,
        background_min_samples=3,
        deep_trigger_threshold=1e9,
        checkpoint_interval_s=3600.0,
        pattern_clusters=2,
    )
    rng = np.random.default_rng(0)

    async def go() -> None:
        async with SonaRuntime(cfg, seed=7, checkpoint_dir=directory) as rt:
            for i in range(12):
                await rt.submit(
                    TrainingSample(rng.standard_normal(DIM), rng.standard_normal(DIM), 0.9)
                )
                if i == 7:
                    await rt.consolidate()
            await rt.checkpoint(file)
            await rt.checkpoint()
            for _ in range(3):  # logged after the newest checkpoint
                await rt.submit(
                    TrainingSample(rng.standard_normal(DIM), rng.standard_normal(DIM), 0.9)
                )

    anyio.run(go)


def test_a_checkpoint_file_is_described(tmp_path: Path) -> None:
    make(tmp_path / "d", tmp_path / "c.sona")
    code, out, _ = run(tmp_path / "c.sona")
    assert code == 0 and out.startswith(f"sona checkpoint: {tmp_path / 'c.sona'}")
    info = fields(out)
    assert info["seed"] == "7" and info["next sample id"] == "13"
    assert info["log sequence"].startswith("12 ")
    assert "submitted 12, applied 12" in info["samples"]
    assert info["adapter"].startswith(f"in={DIM} out={DIM} rank=2")
    assert "live" in out and "consolidated" in out


def test_a_checkpoint_dir_is_described_with_its_log(tmp_path: Path) -> None:
    make(tmp_path / "d", tmp_path / "c.sona")
    code, out, _ = run(tmp_path / "d")
    assert code == 0 and out.startswith("sona checkpoint_dir:")
    info = fields(out)
    newest = list_checkpoints(tmp_path / "d")[0][1]
    assert info["newest readable"] == newest.name
    assert "samples" in info["sample log"]


def test_an_unreadable_newest_checkpoint_is_reported(tmp_path: Path) -> None:
    make(tmp_path / "d", tmp_path / "c.sona")
    newest = list_checkpoints(tmp_path / "d")[0][1]
    data = bytearray(newest.read_bytes())
    data[100] ^= 0xFF
    newest.write_bytes(bytes(data))
    code, out, _ = run(tmp_path / "d")
    assert code == 0 and "passed over" in out and newest.name in out
    assert fields(out)["newest readable"] != newest.name
    bad = tmp_path / "bad.sona"
    bad.write_bytes(bytes(data))
    code, out, err = run(bad)
    assert code == 2 and out == "" and str(bad) in err and "checksum" in err


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_inspecting_a_checkpoint_dir_creates_no_file(tmp_path: Path) -> None:
    """Not even the -wal and -shm files a read-only SQLite connection would leave behind."""
    d = tmp_path / "d"
    make(d, tmp_path / "c.sona")
    listing = names(d)
    assert f"{LOG_FILE}-wal" not in listing  # the runtime stopped: all in the main file
    code, out, _ = run(d)
    assert code == 0 and "samples, ids" in fields(out)["sample log"]
    assert names(d) == listing
    # a runtime holding the log open: rows only in the write-ahead log are counted too
    log = SampleLog(d / LOG_FILE, in_features=DIM, out_features=DIM)
    sample = TrainingSample(np.ones(DIM), np.ones(DIM), 0.5)
    log.append([(1000, encode_sample(sample))])
    listing = names(d)
    assert {f"{LOG_FILE}-wal", f"{LOG_FILE}-shm"} <= set(listing)
    code, out, _ = run(d)
    assert code == 0 and "..1000;" in fields(out)["sample log"]
    assert names(d) == listing
    # a copy holding the write-ahead log without its index: read from a copy of its own
    copy = tmp_path / "copy"
    shutil.copytree(d, copy, ignore=shutil.ignore_patterns("*-shm"))
    log.close()
    listing = names(copy)
    code, out, _ = run(copy)
    assert code == 0 and "..1000;" in fields(out)["sample log"]
    assert names(copy) == listing


def test_inspecting_a_checkpoint_dir_a_killed_runtime_left_changes_no_byte(
    tmp_path: Path,
) -> None:
    """A read-only SQLite connection would still write to the -shm index (its read marks, and
    all of it after a crash)."""
    d = tmp_path / "d"
    make(d, tmp_path / "c.sona")
    log = SampleLog(d / LOG_FILE, in_features=DIM, out_features=DIM)  # open, as when killed
    log.append([(1000, encode_sample(TrainingSample(np.ones(DIM), np.ones(DIM), 0.5)))])
    killed = tmp_path / "killed"
    shutil.copytree(d, killed)
    log.close()
    assert {f"{LOG_FILE}-wal", f"{LOG_FILE}-shm"} <= set(names(killed))
    before = directory_state(killed)
    code, out, _ = run(killed)
    assert code == 0 and "..1000; 1 after the checkpoint" in fields(out)["sample log"]
    assert directory_state(killed) == before


def test_a_checkpoint_dir_without_its_sample_log_is_described_as_missing_it(
    tmp_path: Path,
) -> None:
    d = tmp_path / "d"
    make(d, tmp_path / "c.sona")
    (d / LOG_FILE).unlink()
    code, out, _ = run(d)
    assert code == 0 and fields(out)["sample log"].startswith("missing")


def test_every_field_shows_its_own_counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose counters all differ: each line of the report carries the number it
    names (applied is not submitted, pending is not queued, ...), and every adapter the
    checkpoint holds, a cluster's included, has its rows."""
    make(tmp_path / "d", tmp_path / "c.sona")
    real = checkpoint.read(tmp_path / "c.sona")
    assert len(real.bank) > 0
    state = dataclasses.replace(
        real,
        run_id="run-abc",
        checkpoint_seq=17,
        counters=msgspec.structs.replace(
            real.counters, submitted=41, dropped=3, dead_lettered=2, deep_runs=5
        ),
        instant=msgspec.structs.replace(real.instant, applied=30, skipped=6),
        background=msgspec.structs.replace(real.background, runs=4, consolidated=25, version=9),
        ensemble={3: real.live},
        samples={
            name: real.samples["replay"][:1] * size
            for name, size in (
                ("queued", 1),
                ("pending", 2),
                ("carry", 3),
                ("unfinished", 4),
                ("replay", 5),
            )
        },
    )
    monkeypatch.setattr(checkpoint, "read", lambda path: state)
    code, out, _ = run(tmp_path / "c.sona")
    assert code == 0
    info = fields(out)
    assert info["run"] == "run-abc" and info["checkpoint number"] == "17"
    assert info["samples"] == ("submitted 41, applied 30, skipped 6, dropped 3, dead-lettered 2")
    assert info["waiting"] == "queued 1, pending 2, held back 3, interrupted hand-over 4"
    assert info["replay buffer"] == f"5 of {real.config.replay_capacity}"
    assert info["consolidations"] == "4 (25 samples), version 9"
    assert info["deep runs"] == "5"
    assert info["pattern clusters"] == f"{len(real.bank)} of {real.config.pattern_clusters}"
    table = out.split("\n\n", 1)[1].splitlines()[1:]  # adapter, module, rank, in, out, |ΔW|
    adapters = {" ".join(line.split()[:-5]) for line in table}
    assert adapters == {"live", "consolidated", "cluster 3"}


def _with_log_rows(tmp_path: Path, rows: int) -> Path:
    """A copy of the checkpoint_dir ``tmp_path / "d"`` whose sample log holds ``rows`` samples
    (ids from 1000)."""
    d = tmp_path / f"rows{rows}"
    shutil.copytree(tmp_path / "d", d, ignore=shutil.ignore_patterns(f"{LOG_FILE}*"))
    log = SampleLog(d / LOG_FILE, in_features=DIM, out_features=DIM)
    sample = TrainingSample(np.ones(DIM), np.ones(DIM), 0.5)
    if rows:
        log.append([(1000 + i, encode_sample(sample)) for i in range(rows)])
    log.close()
    return d


def test_a_log_of_one_sample_is_not_called_empty(tmp_path: Path) -> None:
    make(tmp_path / "d", tmp_path / "c.sona")
    code, out, _ = run(_with_log_rows(tmp_path, 1))
    assert code == 0
    assert fields(out)["sample log"] == (
        "1 samples, ids 1000..1000; 1 after the checkpoint, to replay"
    )
    code, out, _ = run(_with_log_rows(tmp_path, 0))
    assert code == 0 and fields(out)["sample log"] == "empty"


def test_an_unreadable_sample_log_is_described_not_fatal(tmp_path: Path) -> None:
    """The checkpoints can still be read: the report says what is wrong with the log."""
    d = tmp_path / "d"
    make(d, tmp_path / "c.sona")
    (d / LOG_FILE).write_bytes(b"garbage" * 100)
    code, out, _ = run(d)
    assert code == 0
    assert fields(out)["sample log"].startswith(f"unreadable: {d / LOG_FILE}: not a readable")


def test_a_directory_with_a_sample_log_and_no_checkpoint_says_so(tmp_path: Path) -> None:
    """Recognised as a checkpoint_dir by its log, refused for what it lacks, not as an input
    sona inspect does not know."""
    make(tmp_path / "d", tmp_path / "c.sona")
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(tmp_path / "d" / LOG_FILE, only / LOG_FILE)
    code, out, err = run(only)
    assert code == 2 and out == ""
    assert err == f"sona inspect: error: {only}: no readable checkpoint\n"
