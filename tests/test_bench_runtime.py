"""``sona bench runtime --part sona`` runs end to end and reports what it measured."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest

from sona.bench import runtime


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
    report = json.loads(capsys.readouterr().out)
    assert report["switch_interval_s"] == 0.001 and report["loop"] == loop
    rows = {r["case"].split(" (")[0]: r for r in report["sona"]}
    latency = rows["instant_adapt"]
    assert 0 < latency["p50_us"] <= latency["p99_us"]
    assert latency["handler_avg_us"] > 0
    throughput = [r for r in report["sona"] if r["case"].startswith("sustained")]
    assert [r["modules"] for r in throughput] == [1, 2]
    assert all(r["samples_per_s"] > 0 and r["max_pending"] <= 1000 for r in throughput)
    consolidation = [r for r in report["sona"] if r["case"].startswith("background")]
    assert len(consolidation) == 2
    assert all(math.isfinite(r["p50_us"]) and r["p50_us"] > 0 for r in consolidation)
