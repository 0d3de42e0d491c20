"""``sona demo``: the simulator newcomers run first.

A frozen base model, domains whose hidden corrections conflict, traffic that shifts between
them and comes back, and simulated users whose feedback is noisy, delayed and often missing,
all run through :class:`sona.runtime.SonaRuntime`. It shows, live, that sona learns from
feedback, keeps what it learned when traffic shifts (against the same run without EWC++), and
survives its own loops crashing (``--chaos``); it writes ``report.json`` and PNG plots.

rich and matplotlib come with the ``demo`` extra; without them the command says how to
install them and exits with status 2. They are imported only when the demo runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXTRAS = ("rich", "matplotlib")
INSTALL_HINT = "pip install 'sona[demo]'"

DEFAULT_STEPS = 12000
DEFAULT_DIM = 512
DEFAULT_DOMAINS = 3
DEFAULT_SEED = 0
DEFAULT_OUT = "./sona-demo-out"

BATCH = 16
"""Requests answered together (one forward call); every phase holds at least one batch."""

MIN_DIM = 16
MAX_DIM = 4096
"""The world holds dim × dim float32 matrices (the base, and a correction and an ideal map per
domain): at 4096 with 8 domains a short run peaked at 1.5 GB resident, and building the world
already took minutes."""

MAX_DOMAINS = 8
MAX_CHAOS = 0.5

MAX_STEPS = 1_000_000
"""About seven minutes per run at the demo's 2,500 requests per second."""

MAX_STEPS_TIMES_DIM = 2**27
"""Every request of a run is drawn up front (inputs, base and ideal outputs: three float32
arrays of steps × dim). At this size, building them peaked at 3.9 GB resident at width 512, and
at 5.1 GB with the largest world (width 4096, 8 domains): well within a 24 GB machine."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sona demo`` (the CLI calls this while building its parser)."""
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS,
        help=f"requests served per run, over all phases (2 × domains − 1 phases): at least "
        f"{BATCH} per phase, at most {MAX_STEPS:,}, and steps × dim at most "
        f"{MAX_STEPS_TIMES_DIM:,}, since a run's requests are drawn up front "
        "(default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--dim", type=int, default=DEFAULT_DIM,
        help=f"model width, {MIN_DIM} to {MAX_DIM} (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--domains", type=int, default=DEFAULT_DOMAINS,
        help=f"domains with conflicting corrections, 1 to {MAX_DOMAINS} (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED,
        help="seed of the world and the users, below 2**62 and >= 0 (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=DEFAULT_OUT,
        help="directory for report.json and the plots, created if missing; checked before "
        "anything runs (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--chaos", type=float, default=0.0, metavar="P",
        help=f"probability, 0 to {MAX_CHAOS:g}, that a loop crashes while handling a message "
        "(fault injection); the supervisor's restart budget is raised to match "
        "(default %(default)s: no crashes)",
    )  # fmt: skip
    parser.add_argument(
        "--no-ewc", action="store_true",
        help="run only the comparison: the same run without EWC++ (ewc_lambda = 0)",
    )  # fmt: skip
    parser.add_argument(
        "--quiet", action="store_true",
        help="no live display: log lines only, on stderr (at INFO unless --log-level is given)",
    )  # fmt: skip


def missing_extras() -> list[str]:
    """The demo extra's packages that cannot be imported."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 if a run stopped early or an accounting identity failed,
    2 on a usage error (nothing run, nothing written)."""
    missing = missing_extras()
    if missing:
        print(
            f"sona demo needs {' and '.join(missing)} (the demo extra): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from sona.demo.command import main

    return main(args)
