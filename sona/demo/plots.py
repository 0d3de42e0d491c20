"""The demo's PNG plots, drawn from the report's numbers (so a plot never shows anything the
report does not hold). Matplotlib's Agg backend, no pyplot state: safe in any process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
RUN_STYLE = {
    "sona": {"color": "C0", "linestyle": "-", "linewidth": 1.8},
    "no-ewc": {"color": "C3", "linestyle": "--", "linewidth": 1.4},
}
MARKER_STYLE = {
    "restarts": ("|", "C1", "loop restarted"),
    "dead_letters": ("x", "C4", "messages dead-lettered"),  # messages, not samples
    "drops": ("x", "C5", "samples dropped"),
    "task_boundaries": ("v", "C2", "task boundary detected"),
}


def quality_figure(report: dict[str, Any]) -> Figure:
    """Held-out quality per domain over the run, phases shaded, against the frozen base."""
    base = report["base_quality"]
    phases = report["phases"]
    runs = report["runs"]
    k = len(base)
    fig = Figure(figsize=(10, 1.2 + 2.6 * k), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(k, 1, sharex=True, squeeze=False)[:, 0]
    lows = [min(q) for r in runs.values() for q in r["timeline"]["quality"]]
    bottom = max(0.0, min([*lows, *base]) - 0.04)
    for d, ax in enumerate(axes):
        _shade_phases(ax, phases, d)
        for label, run in runs.items():
            t = run["timeline"]
            ax.plot(
                t["step"],
                [q[d] for q in t["quality"]],
                label=f"{run['title']}",
                **RUN_STYLE.get(label, {}),
            )
        ax.axhline(base[d], color="0.45", linestyle=":", linewidth=1.4, label="frozen base")
        ax.set_ylim(bottom, 1.01)
        _markers(ax, runs, bottom)
        ax.set_title(f"domain {d}", loc="left", fontsize=10)
        ax.set_ylabel("held-out quality")
        ax.grid(alpha=0.25)
    axes[-1].set_xlabel("requests served (phases: traffic from one domain at a time)")
    handles, labels = _unique_legend_entries(axes)
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle("Held-out quality per domain while traffic shifts between domains")
    return fig


def _unique_legend_entries(axes: Any) -> tuple[list[Any], list[str]]:
    """Every labelled artist once, in the order the panels introduce them."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


def _shade_phases(ax: Axes, phases: list[dict[str, Any]], domain: int) -> None:
    labelled = False
    for p in phases:
        if p["domain"] != domain:
            continue
        ax.axvspan(
            p["start"],
            p["stop"],
            color="C2",
            alpha=0.12,
            label=None if labelled else "traffic from this domain",
        )
        labelled = True


def _markers(ax: Axes, runs: dict[str, Any], bottom: float) -> None:
    """Restarts, dead letters and drops of the first run along the bottom; boundaries on top."""
    first = next(iter(runs.values()))
    for kind, (marker, color, text) in MARKER_STYLE.items():
        steps = first["markers"].get(kind, [])
        if not steps:
            continue
        y = 1.0 if kind == "task_boundaries" else bottom + 0.01
        ax.plot(
            steps,
            [y] * len(steps),
            linestyle="none",
            marker=marker,
            color=color,
            markersize=7,
            label=f"{text} ({first['title']})",
        )


def latency_figure(report: dict[str, Any]) -> Figure:
    """Histogram of the Instant loop's per-update handler time, p50 and p99 marked."""
    fig = Figure(figsize=(8, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, run in report["runs"].items():
        lat = run["instant_latency"]
        if not lat.get("count"):
            continue
        color = RUN_STYLE.get(label, {}).get("color", "C7")
        h = lat["histogram"]
        ax.stairs(h["counts"], h["edges_us"], color=color, linewidth=1.6, label=run["title"])
        ax.axvline(lat["p50_us"], color=color, linestyle="--", linewidth=1.0,
                   label=f"p50 {lat['p50_us']:.1f} µs")  # fmt: skip
        ax.axvline(lat["p99_us"], color=color, linestyle=":", linewidth=1.2,
                   label=f"p99 {lat['p99_us']:.1f} µs")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = _occupied(report)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("instant update latency (µs, handler time, log scale)")
    ax.set_ylabel("updates (log scale)")
    ax.set_title("Instant loop: time to apply one feedback sample")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    return fig


def _occupied(report: dict[str, Any]) -> tuple[float, float]:
    """The range of bins any run filled, so the plot does not show empty decades."""
    lo, hi = float("inf"), 0.0
    for run in report["runs"].values():
        h = run["instant_latency"].get("histogram")
        if not h:
            continue
        filled = [i for i, c in enumerate(h["counts"]) if c]
        lo = min(lo, h["edges_us"][filled[0]])
        hi = max(hi, h["edges_us"][filled[-1] + 1])
    return (lo, hi) if hi > 0 else (1.0, 1e3)


def supervision_figure(report: dict[str, Any]) -> Figure:
    """Per run, cumulative crashes and restarts over the requests, dead letters and drops
    marked where they happened (chaos on)."""
    runs = report["runs"]
    fig = Figure(figsize=(5 + 3.5 * len(runs), 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, run in zip(axes, runs.values(), strict=True):
        marks = run["markers"]
        for kind, text, style in (
            ("crashes", "loop crashed", {"color": "C3", "linewidth": 2.4}),
            ("restarts", "loop restarted", {"color": "C1", "linewidth": 1.2, "linestyle": "--"}),
        ):
            steps = sorted(marks.get(kind, []))
            ax.step([0, *steps], range(len(steps) + 1), where="post",
                    label=f"{text} ({len(steps)})", **style)  # fmt: skip
        # DeadLettered events count messages of every loop (a hand-over too), not samples
        for kind, text, color in (("dead_letters", "messages dead-lettered", "C4"),
                                  ("drops", "samples dropped", "C5")):  # fmt: skip
            steps = marks.get(kind, [])
            ax.plot(steps, [0] * len(steps), linestyle="none", marker="x", markersize=9,
                    color=color, label=f"{text} ({len(steps)})")  # fmt: skip
        ax.set_title(run["title"], fontsize=10)
        ax.set_xlabel("requests served")
        ax.set_ylabel("events so far")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"Supervision under injected crashes (crash probability {report['settings']['chaos']})"
    )
    return fig


def figures(report: dict[str, Any]) -> dict[str, Figure]:
    """File name -> figure, for everything the report calls for."""
    out = {"quality.png": quality_figure(report), "latency.png": latency_figure(report)}
    if report["settings"]["chaos"] > 0:
        out["supervision.png"] = supervision_figure(report)
    return out


def save_all(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(report).items():
        path = out / name
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths
