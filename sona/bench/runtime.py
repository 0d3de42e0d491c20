"""``sona bench runtime``: the async runtime against bare asyncio in the same run.

Part one measures the generic actor runtime (``sona.actors``), see
:mod:`sona.bench.runtime_actors`; part two SonaRuntime's own numbers (instant latency alone and
during a Deep run, sustained throughput, consolidation time), see :mod:`sona.bench.runtime_sona`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sona.bench import options
from sona.bench.runtime_actors import bench_actors
from sona.bench.timing import dump_json, print_table

ACTOR_COLUMNS = ("case", "p50 µs", "p99 µs", "msgs/s", "p50 vs Queue", "rate vs Queue")
# the JSON rows also say how many handled samples handler_avg_us averages (handler_samples)
# and, for the latency cases, how many requests were timed (timed_samples)
SONA_COLUMNS = (
    "case",
    "dim",
    "modules",
    "p50_us",
    "p99_us",
    "samples_per_s",
    "handler_avg_us",
    "deep_runs",
    "max_pending",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.remember_parser(parser)
    count = options.positive_int
    parser.add_argument("--paced", type=count, default=20_000, help="messages per paced run")
    parser.add_argument(
        "--saturated", type=count, default=500_000, help="messages per saturated run"
    )
    parser.add_argument("--rounds", type=count, default=3, help="best of this many rounds")
    parser.add_argument(
        "--dim", type=options.adapter_dim, default=4096, help="hidden size for SonaRuntime (rank 2)"
    )
    parser.add_argument(
        "--latency-samples",
        type=count,
        default=20_000,
        help="timed instant_adapt requests per latency case (SonaRuntime part)",
    )
    parser.add_argument(
        "--seconds", type=options.positive_float, default=60.0, help="sustained-load duration"
    )
    parser.add_argument(
        "--part",
        choices=("all", "actors", "sona"),
        default="all",
        help="which part to run: the actor runtime against asyncio, SonaRuntime, or both",
    )
    parser.add_argument(
        "--switch-interval",
        # CPython keeps the interval in whole microseconds: below one it would be 0
        type=options.float_in(1e-6, 60.0, lo_open=False),
        default=None,
        metavar="SECONDS",
        help="sys.setswitchinterval for the SonaRuntime part (default: the interpreter's, 0.005):"
        " how long a busy Background or Deep worker thread may keep the GIL from the event loop",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop for the SonaRuntime part (uvloop: pip install uvloop)",
    )


def _actor_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    return bench_actors(paced=args.paced, saturated=args.saturated, rounds=args.rounds)


def _sona_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    from sona.bench.runtime_sona import bench_sona

    previous = sys.getswitchinterval()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    try:
        return bench_sona(
            dim=args.dim,
            latency_samples=args.latency_samples,
            seconds=args.seconds,
            uvloop=args.loop == "uvloop",
        )
    finally:
        sys.setswitchinterval(previous)


def run(args: argparse.Namespace) -> int:
    actors = _actor_part(args) if args.part in ("all", "actors") else []
    sona_rows = _sona_part(args) if args.part in ("all", "sona") else []
    if args.json:
        interval = args.switch_interval or sys.getswitchinterval()
        dump_json(
            {"actors": actors, "sona": sona_rows, "switch_interval_s": interval, "loop": args.loop}
        )
        return 0
    nan = float("nan")
    if actors:
        _print_actors(actors, nan)
    if sona_rows:
        interval = args.switch_interval or sys.getswitchinterval()
        title = f"SonaRuntime ({args.loop}, GIL switch interval {interval * 1e3:g} ms)"
        print_table(title, SONA_COLUMNS, [[r[c] for c in SONA_COLUMNS] for r in sona_rows])
    return 0


def _print_actors(actors: list[dict[str, Any]], nan: float) -> None:
    print_table(
        "sona.actors: one hop and a 3-actor pipeline vs asyncio.Queue (best of rounds)",
        ACTOR_COLUMNS,
        [
            (
                r["case"],
                r["p50_us"],
                r["p99_us"],
                r["msgs_per_s"],
                r.get("p50_vs_queue", nan),
                r.get("rate_vs_queue", nan),
            )
            for r in actors
        ],
    )
