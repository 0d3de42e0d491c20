"""What the demo shows while it runs: a rich live display, or log lines with ``--quiet``.

The live display re-renders a few times a second from the latest :class:`Snapshot`, which the
feeding loop swaps in by reference (the render thread never sees a half-updated one).
"""

from __future__ import annotations

import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sona.demo.report import accounting_line
from sona.demo.simulation import RunRecord, Snapshot
from sona.log import get_logger

REFRESH_PER_SECOND = 4
LOG_EVERY_S = 2.0

_log = get_logger("sona.demo")


class LiveDisplay:
    """Progress bar, per-domain held-out quality, loop counters, latency and supervision."""

    def __init__(self, console: Console, runs: int) -> None:
        self.console = console
        self.runs = runs
        self.index = 0
        self._snap: Snapshot | None = None
        self._live: Live | None = None
        self._title = ""

    def started(self, label: str, title: str, total: int) -> None:
        self.index += 1
        self._title = title
        self._snap = None
        self._live = Live(
            console=self.console,
            get_renderable=self._render,
            refresh_per_second=REFRESH_PER_SECOND,
            transient=False,
        )
        self._live.start()

    def update(self, snapshot: Snapshot) -> None:
        self._snap = snapshot

    def stop(self) -> None:
        """Leave the terminal tidy, also when a run ends with an exception (or Ctrl-C)."""
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
            if not self.console.is_terminal:  # the last frame ends without a line break
                self.console.line()

    def finished(self, record: RunRecord) -> None:
        self.stop()
        self.console.print(
            f"run {self.index}/{self.runs} ({record.title}) finished in {record.seconds:.1f} s"
        )
        if record.stopped:
            self.console.print(f"[bold red]{record.stopped}[/]")

    def _render(self) -> RenderableType:
        head = Text.assemble(
            ("sona demo", "bold"), f"  run {self.index}/{self.runs}: ", (self._title, "cyan")
        )
        s = self._snap
        if s is None:
            return Group(
                head,
                Text(
                    "starting the runtime … (the first run on a machine also compiles sona's "
                    "Numba kernels; later runs load them from the cache)",
                    style="dim",
                ),
            )
        phase = s.phase
        where = Text.assemble(
            f"phase {phase.index + 1}/{s.phases}: traffic from ",
            (f"domain {phase.domain}", "bold"),
            (" (returning)" if phase.returning else "", "yellow"),
        )
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=s.total, completed=s.step, width=40),
            f"{s.step}/{s.total} requests",
            f"{s.elapsed_s:5.1f} s",
        )
        return Group(head, where, bar, _quality_table(s), _counters(s))


def _quality_table(s: Snapshot) -> Table:
    table = Table(title="held-out quality per domain", title_justify="left", expand=False)
    table.add_column("domain")
    table.add_column("frozen base", justify="right")
    table.add_column("now", justify="right")
    table.add_column("best so far", justify="right")
    for d, base in enumerate(s.base):
        now = s.quality[d] if d < len(s.quality) else None
        best = s.best[d] if d < len(s.best) else None
        style = "bold" if d == s.phase.domain else ""
        mark = " ◀ traffic" if d == s.phase.domain else ""
        now_txt = "—" if now is None else f"{now:.3f}"
        color = "" if now is None else ("green" if now > base else "red")
        table.add_row(
            Text(f"{d}{mark}", style=style),
            f"{base:.3f}",
            Text(now_txt, style=color),
            "—" if best is None else f"{best:.3f}",
        )
    return table


def _counters(s: Snapshot) -> Table:
    st = s.stats
    ev = s.events
    fb = s.feedback
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    grid.add_row(
        "loops",
        f"instant {st.instant_count} applied · {st.skipped_count} skipped   "
        f"background {st.background_count}   deep {st.deep_count}   "
        f"task boundaries {st.task_count}",
    )
    if s.latency_p50_us is None or s.latency_p99_us is None:
        latency = "instant update not measured yet (no update applied)"
    else:
        latency = f"instant update p50 {s.latency_p50_us:.1f} µs · p99 {s.latency_p99_us:.1f} µs"
    grid.add_row("latency", latency)
    restarts = Text(f"restarts {st.restarts}", style="yellow" if st.restarts else "")
    grid.add_row(
        "samples",
        Text.assemble(
            f"pending {st.pending_samples} · dropped {st.dropped_samples} · "
            f"dead-lettered {st.dead_lettered} · ",
            restarts,
            f" · crashes {ev.get('LoopCrashed', 0)}",
        ),
    )
    grid.add_row(
        "feedback",
        f"{fb.groups} rated groups · {fb.corrections} corrections · {fb.missing} never rated · "
        f"{fb.awaiting} on their way",
    )
    return grid


class LogProgress:
    """``--quiet``: structured log lines (through the logging the CLI configured)."""

    def __init__(self) -> None:
        self._last = 0.0
        self._phase = -1

    def started(self, label: str, title: str, total: int) -> None:
        self._phase = -1
        _log.info("run_started", run=label, title=title, requests=total)

    def update(self, snapshot: Snapshot) -> None:
        s = snapshot
        now = time.monotonic()
        if s.phase.index != self._phase:
            self._phase = s.phase.index
            _log.info(
                "phase_started",
                run=s.label,
                phase=s.phase.index,
                domain=s.phase.domain,
                returning=s.phase.returning,
            )
        if now - self._last < LOG_EVERY_S:
            return
        self._last = now
        _log.info(
            "progress",
            run=s.label,
            step=s.step,
            total=s.total,
            quality=[round(q, 3) for q in s.quality],
            instant_p50_us=_round(s.latency_p50_us),
            instant_p99_us=_round(s.latency_p99_us),
            pending=s.stats.pending_samples,
            dropped=s.stats.dropped_samples,
            restarts=s.stats.restarts,
        )

    def finished(self, record: RunRecord) -> None:
        _log.info(
            "run_finished",
            run=record.label,
            seconds=round(record.seconds, 2),
            final_quality=[round(q, 3) for q in record.quality[-1]],
            restarts=record.stats.restarts,
            accounting=accounting_line(record.stats),
        )
        if record.stopped:
            _log.warning("run_stopped_early", run=record.label, reason=record.stopped)


def _round(value: float | None) -> float | None:
    """A latency for a log line; ``None`` (nothing measured yet) stays ``None``."""
    return None if value is None else round(value, 1)
