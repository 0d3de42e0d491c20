"""``sona bench soak``: sustained load with fault injection, watched for drift over time.

Producers submit samples at a fixed aggregate rate (open loop: each submission has a scheduled
time, so a stall shows up as latency instead of quietly lowering the load) to a SonaRuntime
with a checkpoint directory (durable sample log and periodic checkpoints) and ``Chaos``
crashing the loops at random. Per window (a minute by default, a fifth of a shorter run; the
last one also covers what is left) it reports throughput over the window's own span, submit
latency percentiles and resident memory; at the end, memory growth after the first window, the
last window's p99 against the second's, the checkpoints written and what the durable log cost
per sample.

What would show up here and nowhere else: memory that grows with the number of samples seen
(a leak, an unbounded buffer, a log never truncated), latency that creeps up as state grows,
and supervision that does not recover under a steady trickle of crashes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from sona.bench import options
from sona.bench.timing import dump_json, print_table
from sona.config import Chaos, SonaLlmConfig, SupervisionConfig
from sona.errors import CheckpointDirError
from sona.events import CheckpointWritten
from sona.runtime import SonaRuntime
from sona.sample import TrainingSample

COLUMNS = (
    "window",
    "samples",
    "samples/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "RSS MB",
    "RSS max MB",
    "full GCs",
    "GC max ms",
)
POOL = 4096  # distinct samples, drawn from at random (no generation on the measured path)
STUCK_S = 60.0
# a week, and as many report rows as a table can show: beyond these, the windows list alone
# took all the memory there is (--minutes 1e300) before anything was reported
_MAX_MINUTES = 7 * 24 * 60.0
_MAX_WINDOWS = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.remember_parser(parser)
    parser.add_argument(
        "--minutes",
        type=options.float_in(0.0, _MAX_MINUTES),
        default=5.0,
        help="how long to run (at most a week)",
    )
    parser.add_argument(
        "--rate", type=options.positive_float, default=1000.0, help="samples per second offered"
    )
    parser.add_argument(
        "--producers", type=options.positive_int, default=16, help="concurrent submitters"
    )
    parser.add_argument(
        "--dim", type=options.adapter_dim, default=256, help="hidden size of the adapter (rank 2)"
    )
    parser.add_argument(
        "--chaos",
        type=options.float_in(0.0, 1.0, lo_open=False, hi_open=True),
        default=0.001,
        help="crash probability per message, in [0, 1) (0: no fault injection)",
    )
    parser.add_argument(
        "--window",
        type=options.positive_float,
        default=None,
        metavar="SECONDS",
        help="seconds per report row (default: 60, or a fifth of a run shorter than 5 minutes);"
        " the last row also covers what is left of the run, each row's rate is divided by its"
        " own span, and a window longer than the run is refused",
    )
    parser.add_argument(
        "--no-log",
        action="store_true",
        help="no checkpoint_dir (no durable log, no checkpoints); not with --dir",
    )
    parser.add_argument(
        "--dir",
        type=options.new_directory,
        default=None,
        help="checkpoint_dir, new or empty (default: a temporary one, removed at the end)",
    )
    parser.add_argument(
        "--seed",
        type=options.seed,
        default=0,
        help="seed of the sample pool, the order samples are drawn in and the injected crashes",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once started, as a latency-sensitive server would: a full collection "
        "otherwise scans the ~100k objects numba and numpy leave behind (~0.1 s, every few "
        "seconds of load)",
    )


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def soak_config(dim: int, chaos: float) -> SonaLlmConfig:
    """The balanced preset, with a restart budget that matches the injected crash rate and a
    Deep loop that runs every few seconds rather than several times a second."""
    return SonaLlmConfig.balanced(dim).replace(
        deep_trigger_threshold=3000.0,
        checkpoint_interval_s=30.0,
        supervision=SupervisionConfig(max_restarts=100_000, within_s=10.0),
    )


def _pool(dim: int, seed: int) -> list[TrainingSample]:
    """Samples from four input domains, each with its own correction, rated by closeness."""
    rng = np.random.default_rng(seed)
    domains = [rng.standard_normal((8, dim)).astype(np.float32) for _ in range(4)]
    fixes = [rng.standard_normal(dim).astype(np.float32) for _ in range(4)]
    out = []
    for i in range(POOL):
        d = i % 4
        x = rng.standard_normal(8).astype(np.float32) @ domains[d]
        x /= np.float32(np.linalg.norm(x) + 1e-6)
        y = fixes[d] + 0.3 * rng.standard_normal(dim).astype(np.float32)
        out.append(TrainingSample(x, y, float(rng.uniform(0.3, 1.0))))
    return out


def windows_for(duration: float, window: float) -> list[tuple[float, float]]:
    """The report rows' spans, [start, end) in seconds from the start of the load: whole
    windows of ``window`` seconds, the last one also taking the rest of the run (less than a
    window), so no row is a sliver of a few samples. Each row's rate divides by its own span."""
    n = max(1, int(duration / window * (1 + 1e-9)))  # 3 windows of 1 s in 2.9999999 s
    edges = [i * window for i in range(n)] + [duration]
    return list(itertools.pairwise(edges))


def default_window(duration: float) -> float:
    """A minute, or a fifth of a run shorter than five minutes (so it still has five rows)."""
    return min(60.0, duration / 5.0)


def _seconds(value: float) -> str:
    """Seconds for a row label: whole when they are, with up to three decimals otherwise."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


class _DirectoryRefused(Exception):
    """The runtime could not start in the directory given with --dir."""


async def _soak(
    args: argparse.Namespace, directory: Path | None, window: float
) -> dict[str, Any] | str:
    """The report, or why the runtime could not start in ``--dir``."""
    cfg = soak_config(args.dim, args.chaos)
    chaos = Chaos(crash_probability=args.chaos, seed=args.seed) if args.chaos > 0 else None
    rt = SonaRuntime(cfg, seed=args.seed, checkpoint_dir=directory, chaos=chaos)
    checkpoints: list[int] = []

    async def count_checkpoints(events: AsyncIterator[Any]) -> None:
        async for ev in events:
            if isinstance(ev, CheckpointWritten):
                checkpoints.append(int(ev.bytes))

    # Subscribed before the runtime starts and read until it closes its events at stop: the
    # checkpoint written at start and the final one written at stop count with the periodic
    # ones, so "written" matches what the run put in its directory.
    async with rt.subscribe([CheckpointWritten]) as events, anyio.create_task_group() as tg:
        tg.start_soon(count_checkpoints, events)
        try:
            report = await _load(args, rt, window, refusable=args.dir is not None)
        except _DirectoryRefused as exc:
            tg.cancel_scope.cancel()
            return str(exc)
    report["checkpoints"] = {
        "written": len(checkpoints),
        "mean_bytes": float(np.mean(checkpoints)) if checkpoints else None,
    }
    return report


async def _load(
    args: argparse.Namespace, rt: SonaRuntime, window: float, *, refusable: bool
) -> dict[str, Any]:
    pool = _pool(args.dim, args.seed)
    duration = args.minutes * 60.0
    spans = windows_for(duration, window)
    n_windows = len(spans)
    # schedule -> acknowledged, in seconds; allocated and touched up front so that recording
    # the measurements does not itself show up as memory growth. A window holds the samples
    # scheduled in its span: at most rate × span of them, plus one for rounding.
    cap = int(args.rate * max(b - a for a, b in spans)) + 16
    lat = np.full((n_windows, cap), np.nan)
    counts = np.zeros(n_windows, np.int64)
    rss: list[list[int]] = [[] for _ in range(n_windows)]
    rss_every = min(0.5, window / 4)  # a few readings in every window, however short
    gc_pauses: list[list[float]] = [[] for _ in range(n_windows)]  # full collections, s
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        now = time.perf_counter()
        if phase == "start":
            gc_started[0] = now
        elif gc_started[0]:
            w = min(int((now - start) / window), n_windows - 1) if now > start else 0
            gc_pauses[w].append(now - gc_started[0])

    failures: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(rt)
        except (OSError, CheckpointDirError) as exc:
            if not refusable:
                raise
            raise _DirectoryRefused(str(exc)) from exc
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        start = time.perf_counter()
        gc.callbacks.append(on_gc)
        slots = itertools.count()
        rng = np.random.default_rng(args.seed + 1)
        picks = rng.integers(0, POOL, size=1 << 16)
        period = 1.0 / args.rate

        async def producer() -> None:
            clock = time.perf_counter
            while True:
                k = next(slots)
                due = start + k * period
                if due >= start + duration:
                    return
                wait = due - clock()
                if wait > 0:
                    await anyio.sleep(wait)
                try:
                    with anyio.fail_after(STUCK_S):  # a stuck submit is reported, not waited out
                        await rt.submit(pool[picks[k & 0xFFFF]])
                except Exception as exc:  # counted, never fatal to the soak
                    name = type(exc).__name__
                    failures[name] = failures.get(name, 0) + 1
                    continue
                done = clock()
                w = min(int((due - start) / window), n_windows - 1)
                i = counts[w]
                if i < cap:
                    lat[w, i] = done - due
                    counts[w] = i + 1

        async def sampler() -> None:
            while True:
                w = min(int((time.perf_counter() - start) / window), n_windows - 1)
                rss[w].append(rss_bytes())
                await anyio.sleep(rss_every)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler)
                async with anyio.create_task_group() as producers:
                    for _ in range(args.producers):
                        producers.start_soon(producer)
                tg.cancel_scope.cancel()
        finally:
            gc.callbacks.remove(on_gc)
        with anyio.move_on_after(STUCK_S):
            await rt.drain()
        stats = rt.stats()
        writer = rt._durable.writer
        log_cost = None
        if writer is not None and writer.done_total:
            log_cost = {
                "samples": writer.done_total,
                "transactions": writer.batches,
                "samples_per_transaction": writer.done_total / max(writer.batches, 1),
                "thread_us_per_sample": writer.write_ns / writer.done_total / 1e3,
                "thread_us_per_transaction": writer.write_ns / max(writer.batches, 1) / 1e3,
            }
    rows: list[dict[str, Any]] = []
    for i, (a, b) in enumerate(spans):
        arr = lat[i, : counts[i]] * 1e3
        rows.append(
            {
                "window": f"{_seconds(a)}-{_seconds(b)} s",
                "start_s": a,
                "end_s": b,
                "samples": int(arr.size),
                "samples_per_s": arr.size / (b - a),
                "p50_ms": float(np.percentile(arr, 50)) if arr.size else float("nan"),
                "p99_ms": float(np.percentile(arr, 99)) if arr.size else float("nan"),
                "p999_ms": float(np.percentile(arr, 99.9)) if arr.size else float("nan"),
                "max_ms": float(arr.max()) if arr.size else float("nan"),
                "rss_mb": float(np.median(rss[i])) / 2**20 if rss[i] else float("nan"),
                "rss_max_mb": max(rss[i]) / 2**20 if rss[i] else float("nan"),
                "full_gcs": len(gc_pauses[i]),
                "full_gc_max_ms": 1e3 * max(gc_pauses[i], default=0.0),
            }
        )
    # retained memory: the median over each window, so a checkpoint being written at the
    # moment of one reading does not count as growth
    first, last = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = (
        (last - first) / first
        if n_windows > 1 and math.isfinite(last) and math.isfinite(first) and first > 0
        else None
    )
    second_p99, last_p99 = (rows[1]["p99_ms"], rows[-1]["p99_ms"]) if n_windows > 2 else (0, 0)
    p99_ratio = (
        last_p99 / second_p99
        if math.isfinite(second_p99) and second_p99 > 0 and math.isfinite(last_p99)
        else None
    )
    return {
        "config": {
            "minutes": args.minutes,
            "rate": args.rate,
            "producers": args.producers,
            "dim": args.dim,
            "chaos": args.chaos,
            "durable_log": rt.checkpoint_dir is not None,
            "window_s": window,
            "gc_freeze": bool(args.gc_freeze),
        },
        "windows": rows,
        "rss_growth_after_first_window": growth,
        "last_p99_over_second_p99": p99_ratio,
        "stats": {
            "submitted": stats.submitted_count,
            "applied": stats.instant_count,
            "skipped": stats.skipped_count,
            "dropped": stats.dropped_samples,
            "dead_lettered": stats.dead_lettered,
            "in_flight": stats.in_flight,
            "restarts": stats.restarts,
            "gave_up": stats.gave_up,
            "consolidations": stats.background_count,
            "deep_runs": stats.deep_count,
            "tasks": stats.task_count,
        },
        "submit_errors": failures,
        "durable_log": log_cost,
    }


def run(args: argparse.Namespace) -> int:
    if args.no_log and args.dir is not None:
        options.refuse(args, "--no-log runs without a checkpoint_dir: it does not go with --dir")
    duration = args.minutes * 60.0
    window = default_window(duration) if args.window is None else args.window
    if window > duration:
        options.refuse(
            args,
            f"argument --window: {window:g} s is longer than the run (--minutes {args.minutes:g}"
            f" = {duration:g} s)",
        )
    if duration / window > _MAX_WINDOWS:
        options.refuse(
            args,
            f"argument --window: {window:g} s makes {duration / window:.3g} report rows of a "
            f"{duration:g} s run; at most {_MAX_WINDOWS:,}",
        )
    if args.rate * duration < 1:
        options.refuse(
            args,
            f"--rate {args.rate:g} over --minutes {args.minutes:g} ({duration:g} s) offers not "
            "one sample",
        )
    with tempfile.TemporaryDirectory(prefix="sona-soak-") as tmp:
        directory = None if args.no_log else (args.dir or Path(tmp) / "state")
        report = anyio.run(_soak, args, directory, window)
    if isinstance(report, str):
        options.refuse(args, f"argument --dir: {report}")
    if args.json:
        dump_json(report)
        return 0
    c = report["config"]
    title = (
        f"sona bench soak: {c['rate']:.0f} samples/s offered by {c['producers']} producers, "
        f"dim {c['dim']}, chaos {c['chaos']}, durable log {'on' if c['durable_log'] else 'off'}"
        f"{', gc frozen' if c['gc_freeze'] else ''}"
    )
    print_table(
        title,
        COLUMNS,
        [
            (
                r["window"],
                r["samples"],
                r["samples_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["p999_ms"],
                r["max_ms"],
                r["rss_mb"],
                r["rss_max_mb"],
                r["full_gcs"],
                r["full_gc_max_ms"],
            )
            for r in report["windows"]
        ],
    )
    s = report["stats"]
    print(
        f"samples: {s['submitted']} submitted, {s['applied']} applied, {s['skipped']} skipped, "
        f"{s['dropped']} dropped, {s['dead_lettered']} dead-lettered, {s['in_flight']} still in "
        f"flight; {s['restarts']} loop "
        f"restarts (gave up: {s['gave_up']}); {s['consolidations']} consolidations, "
        f"{s['deep_runs']} deep runs"
    )
    if report["submit_errors"]:
        print(f"submit errors: {report['submit_errors']}")
    ck = report["checkpoints"]
    if not c["durable_log"]:
        print("checkpoints: none (no checkpoint_dir)")
    else:
        size = "" if ck["mean_bytes"] is None else f", {ck['mean_bytes'] / 2**20:.1f} MB on average"
        print(f"checkpoints: {ck['written']} written, the first and the final one included{size}")
    log = report["durable_log"]
    if log is not None:
        print(
            f"durable log: {log['samples_per_transaction']:.1f} samples per transaction, "
            f"{log['thread_us_per_sample']:.1f} µs of writer-thread time per sample "
            f"({log['thread_us_per_transaction']:.0f} µs per committed transaction)"
        )
    growth = report["rss_growth_after_first_window"]
    ratio = report["last_p99_over_second_p99"]
    if growth is None:
        print("resident memory growth: not measured (it needs two windows or more)")
    else:
        print(
            "resident memory growth after the first window (window medians): "
            f"{100 * growth:+.2f} % (target < 5 %)"
        )
    if ratio is not None:
        print(f"last window's p99 / second window's p99: {ratio:.2f} (target <= 1.2)")
    return 0
