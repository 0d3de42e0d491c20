"""The consolidation timing tool runs end to end, restores everything it patched, and
reports what it measured: each number is checked against durations known in advance."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from sona.kernels import lora as k_lora

import sona.merge
from sona.bench import consolidation


def test_the_tool_reports_every_section_and_unpatches(capsys: pytest.CaptureFixture[str]) -> None:
    merge, forward = sona.merge.merge_adapters, k_lora.forward_batch
    args = ["--dim", "32", "--samples", "60", "--runs", "2", "--stages", "--gil"]
    assert consolidation.main(args) == 0
    out = capsys.readouterr().out
    for label in ("steady", "merge live into consolidated", "outside Numba kernels", "stalled"):
        assert label in out
    assert sona.merge.merge_adapters is merge and k_lora.forward_batch is forward


def test_patched_restores_after_an_error() -> None:
    class Owner:
        @staticmethod
        def f() -> int:
            return 1

    original = Owner.f
    with (
        pytest.raises(RuntimeError),
        consolidation._patched([(Owner, "f")], lambda _name, fn: lambda: 2 * fn()),
    ):
        assert Owner.f() == 2
        raise RuntimeError
    assert Owner.f is original


class _Clock:
    """A perf_counter that only moves when told to: every duration is known in advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(consolidation, "time", SimpleNamespace(perf_counter=c))
    return c


def _case(work: Callable[[], None]) -> Any:
    """A (loop, hand-over) pair whose consolidate and prepare only do ``work``."""
    loop = SimpleNamespace(consolidate=lambda _hand: work(), prepare=lambda _hand: work())
    return loop, None


def test_each_case_is_timed_in_milliseconds(clock: _Clock) -> None:
    def takes(s: float) -> Callable[[], None]:
        def work() -> None:
            clock.now += s

        return work

    assert consolidation.time_cases([_case(takes(0.002)), _case(takes(0.0005))]) == [
        pytest.approx(2.0),
        pytest.approx(0.5),
    ]


def test_every_call_adds_its_own_duration(clock: _Clock) -> None:
    acc: dict[str, float] = defaultdict(float)

    def work(s: float) -> None:
        clock.now += s

    timed = consolidation._adding_time_to(acc, str.upper)("work", work)
    timed(1.0)
    timed(0.25)
    assert acc == {"WORK": pytest.approx(1.25)}


def test_stage_times_are_per_case_medians(clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case's stage time counts only its own calls (the sums are cleared between
    cases), and the summary is the median over cases, not the mean: 1, 2 and 6 ms give 2."""

    def stage() -> None:
        clock.now += stage_s[0]

    module = ModuleType("fake_stages")
    module.stage = stage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_stages", module)
    monkeypatch.setattr(consolidation, "_STAGES", (("fake_stages", "", "stage", "the stage"),))
    stage_s = [0.0]
    cases = []
    for s in (0.001, 0.002, 0.006):

        def run(s: float = s) -> None:
            stage_s[0] = s
            module.stage()  # type: ignore[attr-defined]

        cases.append(_case(run))
    assert consolidation.stage_ms(cases) == {"the stage": pytest.approx(2.0)}
    assert module.stage is stage  # type: ignore[attr-defined]


def test_gaps_sum_only_the_stretches_longer_than_the_threshold(clock: _Clock) -> None:
    """Readings 10 µs apart except two of 1 ms and 3 ms: only those two count, in full."""
    steps = iter([1e-5, 1e-3, 1e-5, 3e-3, 1e-5])

    class Stop:
        def is_set(self) -> bool:
            try:
                clock.now += next(steps)
            except StopIteration:
                return True
            return False

    assert consolidation._gaps(Stop(), 5e-5) == pytest.approx(4e-3)  # type: ignore[arg-type]


def test_gil_stall_is_the_spin_gaps_less_those_of_a_spin_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5 ms of gaps beside the worker, 2 ms in a spin alone just after: 3 ms held."""
    gaps = iter([0.005, 0.002])

    def fake_gaps(stop: threading.Event, threshold_s: float) -> float:
        stop.wait()
        return next(gaps)

    monkeypatch.setattr(consolidation, "_gaps", fake_gaps)
    held, wall = consolidation.gil_held_ms([_case(lambda: None)])
    assert held == pytest.approx(3.0)
    assert wall >= 0.0


def test_time_outside_kernels_is_the_wall_time_less_the_kernels(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    acc: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timed_kernels() -> Iterator[dict[str, float]]:
        yield acc

    def prepare() -> None:  # 10 ms, 4 of them in kernels
        clock.now += 0.010
        acc["kernels"] += 0.004

    monkeypatch.setattr(consolidation, "_timed_kernels", timed_kernels)
    outside, wall = consolidation.outside_kernels_ms([_case(prepare), _case(prepare)])
    assert outside == pytest.approx(6.0) and wall == pytest.approx(10.0)


def test_first_cases_are_fresh_and_steady_cases_consolidated_once() -> None:
    first, steady = consolidation.build_cases(16, 24, 1)
    (bg_first, hand_first), (bg_steady, hand_steady) = first[0], steady[0]
    assert len(bg_first.replay) == 0 and len(hand_first.samples) == 24
    kept = len(bg_steady.replay)
    assert 0 < kept < 24 and len(hand_steady.samples) == 24  # its own hand-over still to do
