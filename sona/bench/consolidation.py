"""Where one Background consolidation spends its time, and how long it holds the GIL.

Quick check of the ``background consolidation of 1000 samples`` row of ``sona bench runtime``
(the same setup: rated samples of width 4096, rank 2, one target module, default
:class:`~sona.config.SonaLlmConfig` otherwise)::

    .venv/bin/python -m sona.bench.consolidation            # first / steady medians
    .venv/bin/python -m sona.bench.consolidation --stages   # plus a per-stage breakdown
    .venv/bin/python -m sona.bench.consolidation --gil      # plus GIL-held ms per prepare

The runtime prepares a consolidation in a worker thread while the Instant loop runs on the event
loop, so what matters there is not only the wall time but how much of it holds the GIL: that
part delays every instant update. ``--gil`` measures it from the other side: a Python loop on
the main thread notes every gap in its own progress while a worker thread prepares, and the
gaps beyond those seen with no worker are the time the worker held the GIL, plus any time
helper threads (a multi-threaded BLAS call) took the main thread's core.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from sona.background import BackgroundLoop
from sona.bench.runtime_sona import Q, _config, _samples
from sona.instant import HandOver, InstantLoop

Case = tuple[BackgroundLoop, HandOver]

# (module path, owner attribute or "", function name, label) of each stage timed by --stages
_STAGES = (
    ("sona.background", "", "_split_eval", "split held-back samples"),
    ("sona.background", "_RowBuffer", "scan", "gather + scan input rows (one kernel)"),
    ("sona.training", "TrainingPipeline", "track_many", "track: importance window + boundary"),
    ("sona.boundary", "ShiftDetector", "_learn_basis", "  of which: learn reference subspace"),
    ("sona.pattern_bank", "PatternBank", "update", "pattern bank update"),
    ("sona.merge", "", "merge_adapters", "merge live into consolidated"),
    ("sona.training", "TrainingPipeline", "prox_step", "EWC++ proximal step"),
    ("sona.background", "", "measured_delta", "quality_delta on held-back"),
    ("sona.background", "BackgroundLoop", "prepare", "prepare (total)"),
)


def build_cases(dim: int, n: int, runs: int) -> tuple[list[Case], list[Case]]:
    """``runs`` hand-overs of ``n`` samples for a fresh loop (first of a task) and as many for a
    loop that has consolidated once already (steady state), as in the runtime bench."""
    cfg = _config(dim, (Q,))
    first: list[Case] = []
    steady: list[Case] = []
    for r in range(runs):
        batches = _samples(dim, 2 * n, seed=10 + r)
        for out, steps in ((first, 1), (steady, 2)):
            bg = BackgroundLoop(cfg, seed=r)
            inst = InstantLoop(cfg, seed=r, consolidated=lambda bg=bg: bg.published)  # type: ignore[misc]
            for k in range(steps):
                for i, s in enumerate(batches[k * n : (k + 1) * n]):
                    inst.process(k * n + i, s)
                hand = inst.hand_over()
                if k + 1 < steps:
                    bg.consolidate(hand)
            out.append((bg, hand))
    return first, steady


def time_cases(cases: list[Case]) -> list[float]:
    """Wall ms of ``consolidate`` for each case."""
    out = []
    for bg, hand in cases:
        t0 = time.perf_counter()
        bg.consolidate(hand)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@contextlib.contextmanager
def _patched(
    targets: list[tuple[Any, str]], wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replace each ``owner.name`` by ``wrap(name, original)`` meanwhile, then put it back."""
    undo: list[tuple[Any, str, Any]] = []
    try:
        for owner, name in targets:
            fn = getattr(owner, name)
            setattr(owner, name, wrap(name, fn))
            undo.append((owner, name, fn))
        yield
    finally:
        for owner, name, fn in reversed(undo):
            setattr(owner, name, fn)


def _adding_time_to(acc: dict[str, float], key: Callable[[str], str]) -> Callable[..., Any]:
    """A ``wrap`` for :func:`_patched` that adds each call's duration to ``acc[key(name)]``."""

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        slot = key(name)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[slot] += time.perf_counter() - t0

        return timed

    return wrap


@contextlib.contextmanager
def _timed_stages() -> Iterator[dict[str, float]]:
    import importlib

    acc: dict[str, float] = defaultdict(float)
    targets: list[tuple[Any, str]] = []
    labels: dict[str, str] = {}
    for mod_name, owner_name, fn_name, label in _STAGES:
        mod = importlib.import_module(mod_name)
        targets.append((getattr(mod, owner_name) if owner_name else mod, fn_name))
        labels[fn_name] = label
    with _patched(targets, _adding_time_to(acc, labels.__getitem__)):
        yield acc


def stage_ms(cases: list[Case]) -> dict[str, float]:
    """Median ms per stage over ``cases`` (stages that did not run count as 0)."""
    per: dict[str, list[float]] = {label: [] for *_, label in _STAGES}
    with _timed_stages() as acc:
        for bg, hand in cases:
            acc.clear()
            bg.consolidate(hand)
            for label in per:
                per[label].append(acc.get(label, 0.0) * 1e3)
    return {label: statistics.median(v) for label, v in per.items()}


def _gaps(stop: threading.Event, threshold_s: float) -> float:
    """Spin on this thread until ``stop``; the summed gaps longer than ``threshold_s``."""
    clock = time.perf_counter
    last = clock()
    lost = 0.0
    while not stop.is_set():
        now = clock()
        if now - last > threshold_s:
            lost += now - last
        last = now
    return lost


def gil_held_ms(cases: list[Case], threshold_s: float = 50e-6) -> tuple[float, float]:
    """(median main-thread stall ms, median wall ms) of ``prepare`` in a worker thread.

    Each prepare runs in its own thread while this thread spins and sums the gaps in its
    progress; the gaps of a spin alone for as long right after are subtracted (the OS and
    other processes), so each case is paired with its own noise.
    """
    stalls: list[float] = []
    walls: list[float] = []
    for bg, hand in cases:
        stop = threading.Event()
        wall: list[float] = []

        def worker(
            bg: BackgroundLoop = bg,
            hand: HandOver = hand,
            wall: list[float] = wall,
            stop: threading.Event = stop,
        ) -> None:
            t0 = time.perf_counter()
            bg.prepare(hand)
            wall.append(time.perf_counter() - t0)
            stop.set()

        t = threading.Thread(target=worker)
        t0 = time.perf_counter()
        t.start()
        lost = _gaps(stop, threshold_s)
        elapsed = time.perf_counter() - t0
        t.join()
        alone = threading.Event()
        timer = threading.Timer(elapsed, alone.set)
        timer.start()
        noise = _gaps(alone, threshold_s)
        timer.join()
        stalls.append(max(lost - noise, 0.0) * 1e3)
        walls.append(wall[0] * 1e3)
    return statistics.median(stalls), statistics.median(walls)


@contextlib.contextmanager
def _timed_kernels() -> Iterator[dict[str, float]]:
    """Sum the time spent inside every Numba kernel into ``acc["kernels"]``."""
    import importlib
    import pkgutil

    import numba

    import sona.kernels
    from sona.kernels.warmup import fast

    owners: list[Any] = [fast]
    for info in pkgutil.iter_modules(sona.kernels.__path__):
        owners.append(importlib.import_module(f"sona.kernels.{info.name}"))
    targets = [
        (owner, name)
        for owner in owners
        for name, value in list(vars(owner).items())
        if isinstance(value, numba.core.registry.CPUDispatcher)
        or (owner is fast and callable(value))
    ]
    acc: dict[str, float] = defaultdict(float)
    with _patched(targets, _adding_time_to(acc, lambda _name: "kernels")):
        yield acc


def outside_kernels_ms(cases: list[Case]) -> tuple[float, float]:
    """(median ms of prepare outside Numba kernels, median wall ms): about the time prepare
    holds the GIL (numpy may release it in some of the rest; of the kernels that keep it,
    prepare calls one, noting where each input row is, and that one counts as outside)."""
    outside: list[float] = []
    walls: list[float] = []
    with _timed_kernels() as acc:
        for bg, hand in cases:
            acc["kernels"] = 0.0
            t0 = time.perf_counter()
            bg.prepare(hand)
            wall = time.perf_counter() - t0
            walls.append(wall * 1e3)
            outside.append((wall - acc["kernels"]) * 1e3)
    return statistics.median(outside), statistics.median(walls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sona.bench.consolidation", description=__doc__)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--runs", type=int, default=9, help="consolidations per case")
    p.add_argument("--stages", action="store_true", help="per-stage breakdown")
    p.add_argument("--gil", action="store_true", help="main-thread stall per prepare in a thread")
    p.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval for --gil"
    )
    args = p.parse_args(argv)

    def cases() -> tuple[list[Case], list[Case]]:
        return build_cases(args.dim, args.samples, args.runs)

    time_cases(build_cases(args.dim, args.samples, 1)[0])  # load kernels, touch every path
    first, steady = cases()
    for label, times in (("first of a task", time_cases(first)), ("steady", time_cases(steady))):
        print(
            f"{label:16s} median {statistics.median(times):7.2f} ms   "
            f"min {min(times):7.2f}   max {max(times):7.2f}   ({len(times)} runs)"
        )
    if args.stages:
        first, steady = cases()
        f, s = stage_ms(first), stage_ms(steady)
        print(f"\n{'stage (median ms)':40s} {'first':>8s} {'steady':>8s}")
        for label in f:
            print(f"{label:40s} {f[label]:8.2f} {s[label]:8.2f}")
    if args.gil:
        first, steady = cases()
        print()
        for label, cs in (("first of a task", first), ("steady", steady)):
            out, wall = outside_kernels_ms(cs)
            print(f"{label:16s} outside Numba kernels {out:6.2f} ms of {wall:.2f} ms")
        first, steady = cases()
        previous = sys.getswitchinterval()
        if args.switch_interval:
            sys.setswitchinterval(args.switch_interval)
        try:
            stalls = [
                (label, gil_held_ms(cs))
                for label, cs in (("first of a task", first), ("steady", steady))
            ]
        finally:
            sys.setswitchinterval(previous)
        for label, (held, wall) in stalls:
            print(
                f"{label:16s} main thread stalled {held:6.2f} ms per prepare (wall {wall:.2f} ms)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
