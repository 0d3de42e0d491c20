"""Shared timing and table helpers for the benchmarks.

Timings are per call, measured with ``perf_counter_ns`` around batches of calls so that the
timer's own cost (~50 ns) does not dominate sub-microsecond kernels.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_us: float
    p99_us: float
    samples: int


def time_calls(
    fns: Mapping[str, Callable[[], object]],
    *,
    samples: int = 2000,
    inner: int = 10,
    warmup: int = 200,
    block: int = 50,
) -> dict[str, Timing]:
    """Median and p99 of each ``fn()`` in microseconds, each sample averaging ``inner`` calls.

    The contenders take turns, ``block`` samples each, rather than one after the other: a
    machine that slows down for a while (a shared VM does) then weighs on every contender
    alike, so the ratios between them compare like with like. Each turn starts with a few
    untimed calls, so a contender is timed with its own data in the caches, as it would be
    measured alone, not with the previous contender's."""
    names = list(fns)
    calls = [fns[name] for name in names]
    for fn in calls:
        for _ in range(warmup):
            fn()
    rewarm = min(warmup, 2 * inner)
    out = np.empty((len(calls), samples), dtype=np.float64)
    clock = time.perf_counter_ns
    for start in range(0, samples, block):
        stop = min(start + block, samples)
        for j, fn in enumerate(calls):
            for _ in range(rewarm):
                fn()
            for i in range(start, stop):
                t0 = clock()
                for _ in range(inner):
                    fn()
                out[j, i] = (clock() - t0) / inner
    return {name: summarize_ns(out[j]) for j, name in enumerate(names)}


def summarize_ns(values_ns: np.ndarray | Sequence[float]) -> Timing:
    arr = np.asarray(values_ns, dtype=np.float64)
    return Timing(
        median_us=float(np.median(arr)) / 1e3,
        p99_us=float(np.percentile(arr, 99)) / 1e3,
        samples=int(arr.size),
    )


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table with rich when it is installed, else as aligned plain text."""
    cells = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the demo and test extras
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c not in (columns[0],) else "left")
    for r in cells:
        table.add_row(*r)
    # As wide as the widest cell of every column (plus rich's padding and borders): a console
    # narrower than that makes rich truncate headers ("numpy/s…") and wrap cells.
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    Console(width=max(120, sum(w + 3 for w in widths) + 1)).print(table)


def dump_json(payload: Any) -> None:
    """Print ``payload`` as strict JSON: a figure that could not be measured (NaN, an
    infinity) is ``null``. Python's json would write the bare tokens ``NaN`` and ``Infinity``,
    which are not JSON, so strict parsers (jq, JavaScript, most other languages) reject the
    whole report."""
    json.dump(_plain(payload), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def _plain(o: Any) -> Any:
    """``o`` as JSON-ready values, non-finite floats as None, recursively."""
    if isinstance(o, float | np.floating):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.astype(float).round(6).tolist())
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "__dataclass_fields__") and not isinstance(o, type):
        return _plain(asdict(o))
    if o is None or isinstance(o, str | int):
        return o
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
