from sona.bench.timing import time_calls


def test_contenders_take_their_samples_in_turn() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timed = time_calls(fns, samples=3, inner=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert list(timed) == ["a", "b"]
    assert all(t.samples == 3 and 0 < t.median_us <= t.p99_us for t in timed.values())
