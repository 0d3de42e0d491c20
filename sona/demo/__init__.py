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
DEFAULT_OUT = "./sona-demo-out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sona demo`` (the CLI calls this while building its parser)."""
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS,
        help="requests served per run, over all phases (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--dim", type=int, default=DEFAULT_DIM, help="model width (default %(default)s)"
    )
    parser.add_argument(
        "--domains", type=int, default=DEFAULT_DOMAINS,
        help="domains with conflicting corrections (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the users")
    parser.add_argument(
        "--out", default=DEFAULT_OUT,
        help="directory for report.json and the plots (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--chaos", type=float, default=0.0, metavar="P",
        help="probability that a loop crashes while handling a message (fault injection)",
    )  # fmt: skip
    parser.add_argument(
        "--no-ewc", action="store_true",
        help="run only the comparison: the same run without EWC++ (ewc_lambda = 0)",
    )  # fmt: skip
    parser.add_argument(
        "--quiet", action="store_true", help="no live display: log lines only (on stderr)"
    )


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
    """Run the demo; 0 on success, 1 if an accounting identity failed, 2 on a usage error."""
    missing = missing_extras()
    if missing:
        print(
            f"sona demo needs {' and '.join(missing)} (the demo extra): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from sona.demo.command import main

    return main(args)
