"""``sona bench soak`` runs end to end: load, chaos, durable log, per-window report."""

from __future__ import annotations

import argparse
import gc
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from sona.bench import soak
from sona.events import CheckpointWritten


def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def run(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    base = ["--minutes", "0.04", "--rate", "300", "--dim", "16", "--producers", "4", "--json"]
    assert soak.run(parser.parse_args([*base, *extra])) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out, parse_constant=_strict)
    return out


def test_soak_reports_every_window_and_accounts_for_every_sample(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run(capsys, "--chaos", "0.01")
    windows = report["windows"]
    assert len(windows) == 5 and all(w["samples"] > 0 and w["rss_mb"] > 0 for w in windows)
    s = report["stats"]
    assert not s["gave_up"]
    assert s["submitted"] == s["applied"] + s["skipped"] + s["dropped"] + s["dead_lettered"]
    assert sum(w["samples"] for w in windows) + sum(report["submit_errors"].values()) == 720
    log = report["durable_log"]
    assert log["samples"] == s["submitted"] and log["transactions"] >= 1


def test_soak_without_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    report = run(capsys, "--no-log", "--chaos", "0")
    assert report["durable_log"] is None and report["stats"]["restarts"] == 0
    assert report["config"]["durable_log"] is False
    assert report["config"]["window_s"] == pytest.approx(0.48)  # the default, a fifth of 2.4 s


def test_soak_refuses_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="sona bench soak")
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--minutes", "0"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "error: argument --minutes:" in err


def test_each_window_is_measured_over_its_own_span(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """3.25 s in windows of 1 s: the last row covers 2-3.25 s and its rate divides by 1.25 s.
    The checkpoints written at start and at stop are counted, as the directory shows."""
    state = tmp_path / "state"
    report = run(
        capsys,
        *["--minutes", str(3.25 / 60), "--window", "1", "--rate", "200", "--chaos", "0"],
        *["--dir", str(state)],
    )
    windows = report["windows"]
    assert [w["window"] for w in windows] == ["0-1 s", "1-2 s", "2-3.25 s"]
    assert windows[-1]["end_s"] == pytest.approx(3.25)
    for w in windows:
        span = w["end_s"] - w["start_s"]
        assert w["samples_per_s"] == pytest.approx(w["samples"] / span)
        assert w["samples_per_s"] == pytest.approx(200, rel=0.02)  # scheduled open-loop load
    assert report["config"]["window_s"] == 1.0
    written = report["checkpoints"]["written"]
    assert written == 2 == len(list(state.glob("checkpoint-*.sona")))
    assert report["checkpoints"]["mean_bytes"] > 0


def test_one_window_reports_valid_json_and_no_growth_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run(capsys, "--minutes", "0.01", "--window", "0.6", "--no-log", "--chaos", "0")
    (window,) = report["windows"]
    assert window["window"] == "0-0.6 s" and abs(window["samples"] - 180) <= 1
    assert report["rss_growth_after_first_window"] is None
    assert report["last_p99_over_second_p99"] is None
    assert report["checkpoints"] == {"written": 0, "mean_bytes": None}


def test_short_runs_default_to_five_windows() -> None:
    assert soak.default_window(300.0) == 60.0
    assert soak.default_window(2.4) == pytest.approx(0.48)
    spans = soak.windows_for(2.4, soak.default_window(2.4))
    assert len(spans) == 5 and spans[-1][1] == 2.4
    assert soak.windows_for(3.5, 1.0)[-1] == (2.0, 3.5)
    # 0.6 / 0.2 is 2.9999999999999996 in floating point: still three windows, not two
    assert soak.windows_for(0.6, 0.2) == [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6)]


def test_soak_refuses_a_rate_that_offers_not_one_sample(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="sona bench soak")
    parser.add_argument("--json", action="store_true")
    soak.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        soak.run(parser.parse_args(["--minutes", "0.01", "--rate", "1.5", "--no-log"]))
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "--rate 1.5 over --minutes 0.01 (0.6 s) offers not one sample" in err


class _Runtime:
    """A SonaRuntime stand-in with submit times known in advance: per 20 calls, 12 take 0.05 s,
    one takes 0.15 s, and every 50th call fails; the first one runs a full collection (of the
    objects made since the suite's heap was frozen: over the whole heap, late in a suite on a
    slow machine, it held the event loop up past a window, which then had no memory reading). Its
    counters, checkpoints and durable-log totals are known values too: what the soak reports
    is then checked against what it was given, not against a real run's unknowns."""

    def __init__(self, config: Any, **kw: Any) -> None:
        self.checkpoint_dir = kw.get("checkpoint_dir")
        self.calls = 0
        self.send, self.receive = anyio.create_memory_object_stream[Any](16)
        writer = SimpleNamespace(done_total=600, batches=40, write_ns=1_200_000)
        self._durable = SimpleNamespace(writer=writer)

    @asynccontextmanager
    async def subscribe(self, kinds: Any) -> AsyncIterator[Any]:
        async with self.receive:
            yield self.receive

    async def __aenter__(self) -> _Runtime:
        await self.send.send(CheckpointWritten(path="first", bytes=100))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.send.send(CheckpointWritten(path="final", bytes=300))
        self.send.close()

    async def submit(self, sample: object) -> None:
        self.calls += 1
        if self.calls == 1:  # over this test's objects alone: the suite's heap is frozen
            gc.freeze()
            try:
                gc.collect()
            finally:
                gc.unfreeze()
        if self.calls % 50 == 7:
            raise RuntimeError("refused")
        if self.calls % 20 == 10:
            await anyio.sleep(0.15)
        elif self.calls % 5 in (1, 2, 3):
            await anyio.sleep(0.05)

    async def drain(self) -> None:
        return None

    def stats(self) -> SimpleNamespace:
        names = ["submitted_count", "instant_count", "skipped_count", "dropped_samples"]
        names += ["dead_lettered", "in_flight", "restarts", "gave_up", "background_count"]
        names += ["deep_count", "task_count"]
        return SimpleNamespace(**{name: 100 + i for i, name in enumerate(names)})


class _Rising:
    """Resident-set readings that grow by half each time (so a window's mean is never its
    median), remembered."""

    def __init__(self) -> None:
        self.readings: list[int] = []

    def __call__(self) -> int:
        self.readings.append(int(100 * 2**20 * 1.5 ** len(self.readings)))
        return self.readings[-1]


def test_the_report_is_computed_from_what_the_run_measured(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1.5 s at 200 samples/s in windows of 0.5 s. Per window, 65 % of submits take 50 ms or
    more and 5 % 150 ms: the p50 is at least 50 ms (a mean would be below), the p99 at least
    150 ms (a p90 would be below), p99.9 and max above it. The memory figure is a median of
    the window's readings; growth and the p99 ratio are those of the rows; failed submits are
    counted by type; each counter, checkpoint and log figure comes from its own source."""
    rss = _Rising()
    monkeypatch.setattr(soak, "SonaRuntime", _Runtime)
    monkeypatch.setattr(soak, "rss_bytes", rss)
    report = run(
        capsys,
        *["--minutes", str(1.5 / 60), "--window", "0.5", "--rate", "200", "--producers", "24"],
    )
    windows = report["windows"]
    assert [w["window"] for w in windows] == ["0-0.5 s", "0.5-1 s", "1-1.5 s"]
    readings = [r / 2**20 for r in rss.readings]
    middles = readings + [(a + b) / 2 for a, b in itertools.pairwise(readings)]
    for w in windows:
        # 100 scheduled in each, 2 of them failed: a sample counts where it was due
        assert abs(w["samples"] - 98) <= 2
        assert w["samples_per_s"] == pytest.approx(w["samples"] / 0.5)
        assert w["max_ms"] < 1000  # no submit here takes over 0.15 s
        assert 50 <= w["p50_ms"] <= w["p99_ms"] < w["p999_ms"] < w["max_ms"]
        assert w["p99_ms"] >= 150
        # a window the first submit's full collection held up may hold a single reading
        assert w["rss_mb"] <= w["rss_max_mb"] and w["rss_max_mb"] in readings
        assert min(abs(w["rss_mb"] - m) for m in middles) < 1e-6 * w["rss_mb"]
    # timed from each submit's scheduled time, not the start of the run, where a window's
    # median would be half a second above the one before
    assert windows[-1]["p50_ms"] < windows[0]["p50_ms"] + 250
    # the first submit's full collection, in the window where it ended (later under load)
    assert sum(w["full_gcs"] for w in windows) >= 1
    assert max(w["full_gc_max_ms"] for w in windows) > 0
    assert report["submit_errors"] == {"RuntimeError": 6}  # calls 7, 57, ..., 257 of 300
    assert sum(w["samples"] for w in windows) == 300 - 6
    first, last = windows[0]["rss_mb"], windows[-1]["rss_mb"]
    assert report["rss_growth_after_first_window"] == pytest.approx((last - first) / first)
    assert report["last_p99_over_second_p99"] == pytest.approx(
        windows[-1]["p99_ms"] / windows[1]["p99_ms"]
    )
    assert report["checkpoints"] == {"written": 2, "mean_bytes": 200.0}
    assert report["durable_log"] == {
        "samples": 600,
        "transactions": 40,
        "samples_per_transaction": 15.0,
        "thread_us_per_sample": 2.0,
        "thread_us_per_transaction": 30.0,
    }
    assert report["config"]["durable_log"] and report["config"]["window_s"] == 0.5
    assert list(report["stats"].values()) == list(range(100, 111))


def test_two_windows_give_a_growth_figure_but_no_p99_ratio(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ratio compares the last window with the second; with two, they are one window."""
    monkeypatch.setattr(soak, "SonaRuntime", _Runtime)
    monkeypatch.setattr(soak, "rss_bytes", _Rising())
    report = run(capsys, "--minutes", str(0.4 / 60), "--window", "0.2", "--rate", "100")
    assert len(report["windows"]) == 2
    assert report["last_p99_over_second_p99"] is None
    assert report["rss_growth_after_first_window"] > 0
