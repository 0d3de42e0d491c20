"""The timing and report helpers shared by the benches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sona.bench import timing
from sona.bench.timing import Timing, dump_json, summarize_ns, time_calls


def test_contenders_take_their_samples_in_turn() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timed = time_calls(fns, samples=3, inner=2, warmup=1, block=2)
    # warm-up; then turns of two samples (the last turn one), each after one untimed call
    assert calls == ["a", "b"] + ["a"] * 5 + ["b"] * 5 + ["a"] * 3 + ["b"] * 3
    assert list(timed) == ["a", "b"]
    assert all(t.samples == 3 and 0 < t.median_us <= t.p99_us for t in timed.values())


def test_json_has_null_where_a_figure_is_not_finite(capsys: pytest.CaptureFixture[str]) -> None:
    payload = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "np": np.float32("nan"),
        "nested": [1.5, {"deep": (float("inf"), 2)}],
        "array": np.array([1.0, np.nan]),
        "timing": Timing(median_us=float("nan"), p99_us=1.0, samples=3),
    }
    dump_json(payload)

    def strict(constant: str) -> None:
        raise ValueError(constant)

    out = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert out == {
        "nan": None,
        "inf": None,
        "np": None,
        "nested": [1.5, {"deep": [None, 2]}],
        "array": [1.0, None],
        "timing": {"median_us": None, "p99_us": 1.0, "samples": 3},
    }


def test_summary_is_the_median_and_99th_percentile_in_microseconds() -> None:
    # 100 samples, one slow outlier: the mean (1.09 µs) and p90 (1 µs) differ from both figures
    values = [1000.0] * 98 + [2000.0, 100_000.0]
    t = summarize_ns(values)
    assert t.samples == 100
    assert t.median_us == pytest.approx(1.0)
    assert t.p99_us == pytest.approx(float(np.percentile(values, 99)) / 1e3)
    assert t.p99_us > 2.0


def test_each_sample_is_the_time_of_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that advances only inside the calls: 300 ns per call of ``a``, 1 µs per
    call of ``b``, whatever the number of calls a sample averages."""
    now = [0]
    monkeypatch.setattr(timing.time, "perf_counter_ns", lambda: now[0])

    def advance(ns: int) -> None:
        now[0] += ns

    fns = {"a": lambda: advance(300), "b": lambda: advance(1000)}
    timed = time_calls(fns, samples=5, inner=4, warmup=1, block=2)
    assert timed["a"] == Timing(median_us=0.3, p99_us=0.3, samples=5)
    assert timed["b"] == Timing(median_us=1.0, p99_us=1.0, samples=5)
