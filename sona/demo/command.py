"""The demo from start to finish: settings, the runs, the report, the plots, the summary."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sona.demo import (
    MAX_CHAOS,
    MAX_DIM,
    MAX_DOMAINS,
    MAX_STEPS,
    MAX_STEPS_TIMES_DIM,
    MIN_DIM,
    plots,
    report,
)
from sona.demo.live import LiveDisplay, LogProgress
from sona.demo.output import Output, OutputError
from sona.demo.simulation import DemoSettings, Observer, RunRecord, simulate
from sona.demo.summary import log_summary, print_summary
from sona.demo.world import DemoWorld, Phase, schedule
from sona.training_config import TrainingConfig


class UsageError(ValueError):
    """An option value the demo cannot run with."""


def settings_from(args: argparse.Namespace) -> DemoSettings:
    """The settings, or :class:`UsageError` naming the first option out of its range (the
    limits are in :mod:`sona.demo`, with the reasons for them)."""
    settings = DemoSettings(
        steps=int(args.steps),
        dim=int(args.dim),
        domains=int(args.domains),
        seed=int(args.seed),
        chaos=float(args.chaos),
    )
    if not 1 <= settings.domains <= MAX_DOMAINS:
        raise UsageError(f"--domains must be between 1 and {MAX_DOMAINS}, got {settings.domains}")
    if not MIN_DIM <= settings.dim <= MAX_DIM:
        raise UsageError(f"--dim must be between {MIN_DIM} and {MAX_DIM}, got {settings.dim}")
    if not 0.0 <= settings.chaos <= MAX_CHAOS:
        raise UsageError(f"--chaos must be between 0 and {MAX_CHAOS}, got {settings.chaos}")
    if not 0 <= settings.seed < 1 << 62:  # SonaRuntime's range
        raise UsageError(f"--seed must be in [0, 2**62), got {settings.seed}")
    phases = 2 * settings.domains - 1
    if settings.steps < phases * settings.batch:
        raise UsageError(
            f"--steps must be >= {phases * settings.batch} for {settings.domains} domains "
            f"({phases} phases of at least {settings.batch} requests), got {settings.steps}"
        )
    if settings.steps > MAX_STEPS:
        raise UsageError(f"--steps must be <= {MAX_STEPS}, got {settings.steps}")
    if settings.steps * settings.dim > MAX_STEPS_TIMES_DIM:
        raise UsageError(
            f"--steps × --dim must be <= {MAX_STEPS_TIMES_DIM} (a run's requests are drawn up "
            f"front), got {settings.steps} × {settings.dim}; at --dim {settings.dim}, --steps "
            f"<= {MAX_STEPS_TIMES_DIM // settings.dim}"
        )
    return settings


def command_line(settings: DemoSettings, no_ewc: bool) -> str:
    s = settings
    line = f"sona demo --steps {s.steps} --dim {s.dim} --domains {s.domains} --seed {s.seed}"
    if s.chaos:
        line += f" --chaos {s.chaos:g}"
    return line + (" --no-ewc" if no_ewc else "")


def run_plan(no_ewc: bool) -> list[tuple[str, str, bool]]:
    """(label, title, ewc) per run: sona, then the same run without EWC++ as the comparison."""
    without = ("no-ewc", "no EWC (λ = 0)", False)
    if no_ewc:
        return [without]
    lam = TrainingConfig().ewc_lambda
    return [("sona", f"sona (EWC++, λ = {lam:g})", True), without]


async def run_all(
    world: DemoWorld,
    phases: list[Phase],
    settings: DemoSettings,
    plan: list[tuple[str, str, bool]],
    observer: Observer,
) -> list[RunRecord]:
    """The runs one after another, on the same requests and the same users."""
    traffic = world.traffic(phases, seed=settings.seed + 2)
    records = []
    for label, title, ewc in plan:
        record = await simulate(
            world, phases, traffic, settings, label=label, title=title, ewc=ewc, observer=observer
        )
        records.append(record)
    return records


def main(args: argparse.Namespace) -> int:
    """Check the options and ``--out``, run, write the report and plots, print the summary.

    0 when every run finished and its accounting holds; 1 (with a line on stderr saying why)
    when a run stopped early or an identity failed, the report written either way; 2 for an
    option or ``--out`` the demo cannot use, before anything runs or is written.
    """
    t0 = time.perf_counter()
    try:
        settings = settings_from(args)
        if not str(args.out).strip():  # Path("") is the current directory
            raise OutputError("--out must name a directory, got an empty path")
        output = Output(Path(args.out))
        output.prepare()
    except (UsageError, OutputError) as exc:
        print(f"sona demo: {exc}", file=sys.stderr)
        return 2
    quiet = bool(args.quiet)
    demo_logger = logging.getLogger("sona.demo")
    level_before = demo_logger.level
    # --quiet means "logs only", so the logs must show, unless a level was asked for
    explicit_level = getattr(args, "log_level", None) is not None
    if quiet and not explicit_level and demo_logger.getEffectiveLevel() > logging.INFO:
        demo_logger.setLevel(logging.INFO)
    try:
        doc, path = _run_and_write(args, settings, output, quiet, t0)
    finally:
        demo_logger.setLevel(level_before)
    return _exit_status(doc, path)


def _run_and_write(
    args: argparse.Namespace, settings: DemoSettings, output: Output, quiet: bool, t0: float
) -> tuple[dict[str, Any], Path]:
    console = Console(highlight=False)
    plan = run_plan(bool(args.no_ewc))
    observer: Observer
    if quiet:
        observer = LogProgress()
    else:
        observer = LiveDisplay(console, runs=len(plan))
        console.print(
            f"[bold]sona demo[/]: {settings.domains} domains at width {settings.dim}, "
            f"{settings.steps} requests per run"
            + (f", crash probability {settings.chaos:g}" if settings.chaos else "")
        )
    staging: Path | None = None
    try:
        world = DemoWorld(settings.dim, settings.domains, seed=settings.seed)
        phases = schedule(settings.domains, settings.steps)
        try:
            records = asyncio.run(run_all(world, phases, settings, plan, observer))
        finally:
            if isinstance(observer, LiveDisplay):
                observer.stop()
        doc = report.build(
            settings, world, phases, records, command=command_line(settings, bool(args.no_ewc))
        )
        staging = output.staging()
        written = plots.save_all(doc, staging)
        doc["files"] = ["report.json", *[p.name for p in written]]
        doc["seconds_total"] = round(time.perf_counter() - t0, 2)
        report.write(doc, staging)
        output.commit(staging)
    except BaseException:
        output.discard(staging)
        raise
    out = output.path
    path = out / "report.json"
    if quiet:
        log_summary(doc, path)
    else:
        print_summary(console, doc, out)
    return doc, path


def _exit_status(doc: dict[str, Any], path: Path) -> int:
    """1 with one line on stderr per run that stopped early or broke an identity, else 0."""
    problems = []
    for label, run in doc["runs"].items():
        if run["stopped_early"]:
            problems.append(f"run {label!r} stopped early: {run['stopped_early']}")
        acc = run["accounting"]
        if not (acc["holds"] and acc["consolidation_holds"]):
            problems.append(f"run {label!r}: an accounting identity does not hold")
    for line in problems:
        print(f"sona demo: {line} (report: {path})", file=sys.stderr)
    return 1 if problems else 0
