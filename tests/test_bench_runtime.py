"""``sona bench runtime --part sona`` runs end to end and reports what it measured."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest

from sona.bench import runtime, runtime_actors, runtime_sona
from sona.bench.runtime_sona import handler_average
from sona.results import LearningStats


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sona_part_reports_every_case_and_restores_the_switch_interval(
    capsys: pytest.CaptureFixture[str], loop: str
) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    runtime.add_arguments(parser)
    args = ["--part", "sona", "--dim", "32", "--seconds", "0.2", "--latency-samples", "200"]
    args += ["--loop", loop]
    before = sys.getswitchinterval()
    assert runtime.run(parser.parse_args([*args, "--switch-interval", "0.001", "--json"])) == 0
    assert sys.getswitchinterval() == before
    report = json.loads(capsys.readouterr().out, parse_constant=_strict)
    assert report["switch_interval_s"] == 0.001 and report["loop"] == loop
    rows = {r["case"].split(" (")[0]: r for r in report["sona"]}
    latency = rows["instant_adapt"]
    assert 0 < latency["p50_us"] <= latency["p99_us"]
    assert latency["handler_avg_us"] > 0
    assert latency["samples_per_s"] is None  # not measured in a latency case: null, not NaN
    # the handler's average covers the timed requests, not the ~12,000 warm-up ones
    for case in ("instant_adapt", "instant_adapt, deep running"):
        assert rows[case]["handler_samples"] == rows[case]["timed_samples"] >= 200
    throughput = [r for r in report["sona"] if r["case"].startswith("sustained")]
    assert [(r["modules"], r["case"].split(" (")[0]) for r in throughput] == [
        (1, "sustained submit, Deep off"),
        (2, "sustained submit, Deep off"),
        (1, "sustained submit, Deep on"),
    ]
    assert [r["deep_runs"] > 0 for r in throughput] == [False, False, True]
    assert all(r["samples_per_s"] > 0 and r["max_pending"] <= 1000 for r in throughput)
    for r in throughput:  # labelled with the duration it ran, not "0 s"
        label = re.fullmatch(r"sustained submit, Deep o(?:n|ff) \((\S+) s, bound 1000\)", r["case"])
        assert label is not None and 0.2 <= float(label[1]) < 10
    consolidation = [r for r in report["sona"] if r["case"].startswith("background")]
    assert len(consolidation) == 2
    assert all(math.isfinite(r["p50_us"]) and r["p50_us"] > 0 for r in consolidation)


def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_handler_average_covers_only_the_samples_between_two_snapshots() -> None:
    before = LearningStats(instant_count=12_000, instant_avg_latency_us=50.0)
    after = LearningStats(instant_count=12_200, instant_avg_latency_us=49.5)
    avg, handled = handler_average(before, after)
    assert handled == 200
    assert avg == pytest.approx((49.5 * 12_200 - 50.0 * 12_000) / 200)  # 25 µs, not 49.5
    assert handler_average(after, after)[1] == 0


def _latencies(p50_us: float) -> list[int]:
    """A paced run's hop latencies in ns: a tenth of warm-up (1 s each, to be skipped), then
    95 % at ``p50_us`` and 5 % at three times that (so the p99)."""
    warm = [10**9] * 10
    return warm + [int(p50_us * 1e3)] * 85 + [int(3 * p50_us * 1e3)] * 5


def _by_round(values: dict[int, list[Any]]) -> Callable[..., Awaitable[Any]]:
    """A stand-in for one measuring coroutine: round k returns ``values[hops][k]``."""
    calls: dict[int, int] = {}

    async def fake(n: int, hops: int = 1) -> Any:
        k = calls.get(hops, 0)
        calls[hops] = k + 1
        return values[hops][k]

    return fake


def test_actor_rows_keep_each_cases_best_round_and_compare_sona_with_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Known measurements in, reported numbers out: per case the lowest p50 and p99 and the
    highest rate over the rounds, percentiles without the first tenth of warm-up, and both
    ratios sona over asyncio.Queue (p50_vs_queue 2 = sona's hop takes twice as long;
    rate_vs_queue 0.9 = sona handles 90 % as many messages per second)."""
    patch = monkeypatch.setattr
    patch(
        runtime_actors,
        "_paced_queue",
        _by_round({1: [_latencies(1.0), _latencies(1.5)], 3: [_latencies(5.0), _latencies(4.0)]}),
    )
    patch(
        runtime_actors,
        "_paced_actor",
        _by_round({1: [_latencies(3.0), _latencies(2.0)], 3: [_latencies(6.0), _latencies(7.0)]}),
    )
    patch(runtime_actors, "_paced_stream", _by_round({1: [_latencies(0.5), _latencies(0.7)]}))
    patch(runtime_actors, "_saturated_queue", _by_round({1: [1000.0, 500.0], 3: [200.0, 300.0]}))
    patch(runtime_actors, "_saturated_actor", _by_round({1: [800.0, 900.0], 3: [600.0, 100.0]}))
    patch(runtime_actors, "_saturated_stream", _by_round({1: [50.0, 70.0]}))
    rows = {r["case"]: r for r in runtime_actors.bench_actors(paced=100, saturated=10, rounds=2)}
    expected = {  # case: (p50 µs, msgs/s)
        "asyncio.Queue, 1 hop": (1.0, 1000.0),
        "sona.actors, 1 hop": (2.0, 900.0),
        "anyio memory stream, 1 hop": (0.5, 70.0),
        "asyncio.Queue, 3 hops": (4.0, 300.0),
        "sona.actors, 3 hops": (6.0, 600.0),
    }
    assert set(rows) == set(expected)
    for case, (p50, rate) in expected.items():
        assert rows[case]["p50_us"] == pytest.approx(p50), case
        assert rows[case]["p99_us"] == pytest.approx(3 * p50), case
        assert rows[case]["msgs_per_s"] == rate, case
    one, three = rows["sona.actors, 1 hop"], rows["sona.actors, 3 hops"]
    assert one["p50_vs_queue"] == pytest.approx(2.0)
    assert one["rate_vs_queue"] == pytest.approx(0.9)
    assert three["p50_vs_queue"] == pytest.approx(1.5)
    assert three["rate_vs_queue"] == pytest.approx(2.0)
    assert "p50_vs_queue" not in rows["asyncio.Queue, 1 hop"]


class _Clock:
    """A perf_counter_ns that moves 1 ms per reading: every interval is a count of readings."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 1_000_000
        return self.now


@pytest.mark.parametrize("shape", ["queue", "actor", "stream"])
def test_saturated_rate_is_messages_over_the_seconds_they_took(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """The clock is read once before the first send and once after the last message is
    handled: 1 ms apart here, so 500 messages make 500,000 per second."""
    monkeypatch.setattr(runtime_actors, "_clock", _Clock())
    measure: Callable[..., Awaitable[float]] = getattr(runtime_actors, f"_saturated_{shape}")
    hops = () if shape == "stream" else (1,)
    assert anyio.run(measure, 500, *hops) == pytest.approx(500 / 1e-3)


@pytest.mark.parametrize("hops", [1, 3])
def test_paced_latency_is_read_from_the_send_to_the_handler(
    monkeypatch: pytest.MonkeyPatch, hops: int
) -> None:
    """One clock reading at the send and one where the message is handled, nothing between:
    every hop latency is one 1 ms tick, through the actors and through the queues alike."""
    monkeypatch.setattr(runtime_actors, "_clock", _Clock())
    for measure in (runtime_actors._paced_actor, runtime_actors._paced_queue):
        assert anyio.run(measure, 20, hops) == [1_000_000] * 20
    row = runtime_actors._row("x", [1_000_000] * 20, None)
    assert (row["p50_us"], row["p99_us"]) == (1000.0, 1000.0)
    assert np.isnan(row["msgs_per_s"])


class _Ticks:
    """A perf_counter_ns for code that reads it in (start, end) pairs: pair j spans
    ``spans[j]`` ns, so every measured interval is known in advance."""

    def __init__(self, spans: list[int]) -> None:
        self.spans = spans
        self.reads = 0
        self.now = 0

    def __call__(self) -> int:
        if self.reads % 2:
            self.now += self.spans[self.reads // 2]
        self.reads += 1
        return self.now


def test_latency_rows_are_the_median_and_p99_of_the_timed_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans = [1000 * (1 + i % 50) for i in range(200)]  # 1 to 50 µs, four times over
    monkeypatch.setattr(runtime_sona, "time", SimpleNamespace(perf_counter_ns=_Ticks(spans)))
    row = anyio.run(runtime_sona._latency, 16, 200, False)
    assert row["timed_samples"] == row["handler_samples"] == 200
    assert row["p50_us"] == pytest.approx(np.median(spans) / 1e3)
    assert row["p99_us"] == pytest.approx(np.percentile(spans, 99) / 1e3)


def test_consolidation_rows_keep_first_and_steady_runs_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run r of 5 times its first consolidation (r + 1 ms) then a steady one (10 × (r + 1)
    ms, on purpose the slower here): each row is the median and p99 of its own five."""
    spans = [ms * 1_000_000 for r in range(1, 6) for ms in (r, 10 * r)]
    monkeypatch.setattr(runtime_sona, "time", SimpleNamespace(perf_counter_ns=_Ticks(spans)))
    first, steady = runtime_sona._consolidation(16, 40)
    assert "first of a task" in first["case"] and "steady state" in steady["case"]
    assert (first["p50_us"], steady["p50_us"]) == (3000.0, 30_000.0)
    assert first["p99_us"] == pytest.approx(np.percentile([1, 2, 3, 4, 5], 99) * 1e3)
    assert steady["p99_us"] == pytest.approx(np.percentile([10, 20, 30, 40, 50], 99) * 1e3)


class _SlowRuntime:
    """Accepts each submit after 0.2 s; reports 9, then 3, then 0 pending samples."""

    def __init__(self, config: Any, *, seed: int) -> None:
        self.pending = iter([9, 3])

    async def __aenter__(self) -> _SlowRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def submit(self, sample: object) -> None:
        await anyio.sleep(0.2)

    def stats(self) -> SimpleNamespace:
        pending = next(self.pending, 0)
        return SimpleNamespace(
            pending_samples=pending, instant_avg_latency_us=7.0, deep_count=0, instant_count=5
        )


def test_throughput_divides_by_the_time_the_producers_took(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 0.05 s run whose eight producers each get one 0.2 s submit in: 8 samples over the
    ~0.2 s the run lasted (as its label says), not over the 0.05 s asked for; and the
    largest pending count seen, not the last."""
    monkeypatch.setattr(runtime_sona, "SonaRuntime", _SlowRuntime)
    row = anyio.run(runtime_sona._throughput, 16, (runtime_sona.Q,), 0.05)
    label = re.fullmatch(r"sustained submit, Deep off \((\S+) s, bound 1000\)", row["case"])
    assert label is not None and float(label[1]) >= 0.2
    assert row["samples_per_s"] * float(label[1]) == pytest.approx(8, rel=1e-2)
    assert row["max_pending"] == 9
    assert (row["handler_avg_us"], row["handler_samples"]) == (7.0, 5)


def test_deep_runs_counts_only_the_runs_in_flight_while_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs that ended before the first timed request do not count; every run that started
    before the last one did, the one still in flight included, does."""
    started: list[int] = []
    finished: list[int] = []
    timing_from: list[int] = []  # runs finished when the first timed request was sent
    original = runtime_sona.SonaRuntime.deep_optimize

    async def deep_optimize(self: Any, samples: Any = None) -> Any:
        started.append(1)
        result = await original(self, samples)
        finished.append(1)
        return result

    def clock() -> int:
        if not timing_from:
            timing_from.append(len(finished))
        return time.perf_counter_ns()

    monkeypatch.setattr(runtime_sona.SonaRuntime, "deep_optimize", deep_optimize)
    monkeypatch.setattr(runtime_sona, "time", SimpleNamespace(perf_counter_ns=clock))
    row = anyio.run(runtime_sona._latency, 16, 200, True)
    assert timing_from[0] >= 1  # a first run ended before timing began
    assert row["deep_runs"] == len(started) - timing_from[0] >= 1
