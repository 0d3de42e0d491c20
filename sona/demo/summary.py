"""The end of a demo: what it found, as tables on the terminal or as log lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sona.demo import report
from sona.log import get_logger

_log = get_logger("sona.demo")


def _yes(ok: bool | None) -> str:
    return "[dim]can't tell[/]" if ok is None else ("[green]yes[/]" if ok else "[red]no[/]")


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def print_summary(console: Console, doc: dict[str, Any], out: Path) -> None:
    """Final quality per domain, every return, the verdicts, latency, supervision and the
    accounting identity of each run: the numbers in report.json, as tables."""
    runs = doc["runs"]
    base = doc["base_quality"]
    final = Table(title="held-out quality at the end", title_justify="left")
    final.add_column("domain")
    final.add_column("frozen base", justify="right")
    for run in runs.values():
        final.add_column(run["title"], justify="right")
    for d, b in enumerate(base):
        cells = [
            Text(_fmt(r["final_quality"][d]), style="green" if r["final_quality"][d] > b else "red")
            for r in runs.values()
        ]
        final.add_row(str(d), _fmt(b), *cells)
    console.print(final)
    # a run that stopped early lacks the returns it did not reach
    returned = sorted(
        {(r["phase_index"], r["domain"]) for run in runs.values() for r in run["returns"]}
    )
    if returned:
        back = Table(
            title="when traffic returns: quality when it left → when it came back "
            "(share of the gain over the base kept)",
            title_justify="left",
        )
        back.add_column("phase")
        back.add_column("domain")
        for run in runs.values():
            back.add_column(run["title"], justify="right")
        for index, domain in returned:
            texts: list[str] = []
            for run in runs.values():
                r = next((r for r in run["returns"] if r["phase_index"] == index), None)
                if r is None:
                    texts.append("not reached (stopped early)")
                    continue
                kept = r["kept_fraction_of_gain"]
                share = " (gain too small to compare)" if kept is None else f" ({100 * kept:.0f} %)"
                texts.append(f"{r['quality_when_left']:.3f} → {r['quality_at_return']:.3f}{share}")
            back.add_row(str(index + 1), str(domain), *texts)
        console.print(back)
    comp = doc["comparison"]
    for label, ok in comp["every_domain_above_base"].items():
        console.print(
            f"every domain ends above the frozen base ({runs[label]['title']}): {_yes(ok)}"
        )
    for row in comp.get("returns", []):
        console.print(
            f"back to domain {row['domain']} (phase {row['phase_index'] + 1}): "
            f"sona forgets less {_yes(row['sona_forgets_less'])}"
            f"{' (neither forgot)' if row.get('neither_forgot') else ''}, "
            f"serves it better {_yes(row['sona_higher_at_return'])} "
            f"({row['sona_at_return']:.3f} vs {row['no_ewc_at_return']:.3f} without EWC)"
        )
    if "sona_forgets_less_on_every_return" in comp:
        console.print(report.forgets_less_verdict(comp["sona_forgets_less_on_every_return"]))
    for run in runs.values():
        lat = run["instant_latency"]
        st = run["stats"]
        latency = (
            f"instant update p50 {lat['p50_us']:.1f} µs, p99 {lat['p99_us']:.1f} µs"
            if lat["count"]
            else "instant update latency not measured (no update applied)"
        )
        console.print(
            f"[bold]{run['title']}[/]: {run['seconds']:.1f} s; {latency}; "
            f"background {st['background_count']}, deep {st['deep_count']}, "
            f"task boundaries {st['task_count']}; restarts {st['restarts']}, "
            f"crashes {run['events'].get('LoopCrashed', 0)}"
        )
        acc = run["accounting"]
        style = "green" if acc["holds"] else "bold red"
        console.print(f"  accounting: [{style}]{report.accounting_line_from(acc)}[/]")
        style = "green" if acc["consolidation_holds"] else "bold red"
        console.print(f"  consolidation: [{style}]{report.consolidation_line_from(acc)}[/]")
        if run["stopped_early"]:
            console.print(f"  [red]{run['stopped_early']}[/]")
    files = ", ".join(str(out / f) for f in doc["files"])
    console.print(f"wrote {files} ({doc['seconds_total']:.1f} s in all)")


def log_summary(doc: dict[str, Any], path: Path) -> None:
    """The same findings as :func:`print_summary`, as structured log lines (``--quiet``)."""
    for label, run in doc["runs"].items():
        _log.info(
            "result",
            run=label,
            final_quality=run["final_quality"],
            base_quality=doc["base_quality"],
            returns=[
                (r["domain"], r["quality_when_left"], r["quality_at_return"])
                for r in run["returns"]
            ],
            instant_p50_us=run["instant_latency"].get("p50_us"),
            instant_p99_us=run["instant_latency"].get("p99_us"),
            restarts=run["stats"]["restarts"],
            accounting=report.accounting_line_from(run["accounting"]),
            consolidation=report.consolidation_line_from(run["accounting"]),
        )
    comp = doc["comparison"]
    if "sona_forgets_less_on_every_return" in comp:
        verdict = report.forgets_less_verdict(comp["sona_forgets_less_on_every_return"])
        _log.info("comparison", verdict=verdict, **comp)
    else:
        _log.info("comparison", **comp)
    _log.info("report_written", path=str(path), files=doc["files"], seconds=doc["seconds_total"])
