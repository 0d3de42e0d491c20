"""The timing and report helpers shared by the benches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sona.bench.timing import Timing, dump_json, time_calls


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
