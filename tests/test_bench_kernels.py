"""``sona bench kernels`` reports valid JSON and tables whose headers are whole."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from sona.bench import kernels
from sona.bench.timing import Timing

TINY = ["--samples", "10", "--ranks", "1", "--dims", "32", "--batches", "1", "--no-torch"]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    kernels.add_arguments(parser)
    return kernels.run(parser.parse_args(list(argv)))


def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_json_is_strict_and_a_missing_peer_is_null(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(*TINY, "--json") == 0
    report = json.loads(capsys.readouterr().out, parse_constant=_strict)
    assert report["torch"] is None
    rows = {r["op"]: r for r in report["rows"]}
    assert set(rows) == {"forward", "adapt"}
    for row in rows.values():
        assert row["torch"] is None and row["speedup_torch"] is None
        assert row["sona"]["median_us"] > 0 and row["speedup_numpy"] > 0
    assert rows["adapt"]["numpy_tuned"] is None and rows["adapt"]["speedup_numpy_tuned"] is None


def test_table_headers_are_not_truncated(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(*TINY) == 0
    text = capsys.readouterr().out
    for header in ("numpy/sona", "tuned/sona", "torch/sona", "sona p99", "torch p50"):
        assert header in text
    assert "…" not in text


def test_a_speedup_is_the_peer_time_over_the_sona_time() -> None:
    sona_t = Timing(median_us=0.5, p99_us=1.0, samples=10)
    peer_t = Timing(median_us=2.0, p99_us=3.0, samples=10)
    assert kernels._ratio(peer_t, sona_t) == 4.0
    assert math.isnan(kernels._ratio(None, sona_t))
