"""``sona bench runtime --part sona`` runs end to end and reports what it measured."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import pytest

from sona.bench import runtime
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
    assert [r["modules"] for r in throughput] == [1, 2]
    assert all(r["samples_per_s"] > 0 and r["max_pending"] <= 1000 for r in throughput)
    for r in throughput:  # labelled with the duration it ran, not "0 s"
        label = re.fullmatch(r"sustained submit \((\S+) s, bound 1000\)", r["case"])
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
