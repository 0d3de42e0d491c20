"""The ``sona`` command: demo, bench and inspect.

The CLI is the only place that configures logging (the library never does). It is also where
a Ctrl-C ends: every command is interrupted the same way, with one line and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import structlog

from sona.bench import BENCHES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"

INTERRUPTED_STATUS = 130
"""128 + SIGINT, what a shell reports for a command ended by Ctrl-C."""


def configure_logging(*, level: int = logging.INFO) -> None:
    """Route sona's stdlib-backed structlog loggers to stderr in a readable form."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=structlog.dev.ConsoleRenderer(colors=False))
    )
    root = logging.getLogger("sona")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _log_level(value: str) -> str:
    """Level names are accepted in any case; argparse's ``choices`` then checks the name."""
    return value.upper()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sona", description=__doc__)
    parser.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        default=None,
        metavar="LEVEL",
        help=f"level of sona's logs on stderr: {', '.join(LOG_LEVELS)}, in any case "
        f"(default {DEFAULT_LOG_LEVEL}; 'sona demo --quiet' shows INFO unless a level is given)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the simulator")
    try:
        demo_mod = importlib.import_module("sona.demo")
    except ImportError:
        demo_mod = None
    if demo_mod is not None:
        demo_mod.add_arguments(demo)

    bench = sub.add_parser("bench", help="measure sona against numpy, torch and asyncio")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        p = bench_sub.add_parser(name)
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:
            p.set_defaults(unavailable=True)

    inspect = sub.add_parser("inspect", help="describe an adapter, checkpoint or PEFT directory")
    inspect.add_argument("path")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        if getattr(args, "unavailable", False):
            print(f"sona bench {args.bench}: not available in this build", file=sys.stderr)
            return 2
        result: int = importlib.import_module(BENCHES[args.bench]).run(args)
        return result
    if args.command == "demo":
        demo_mod = importlib.import_module("sona.demo")
        result = demo_mod.run(args)
        return result
    if args.command == "inspect":
        from sona.inspect import run as inspect_run

        return inspect_run(args.path)
    return 2  # pragma: no cover - argparse enforces the choices


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    level = args.log_level or DEFAULT_LOG_LEVEL
    configure_logging(level=logging.getLevelNamesMapping()[level])
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        # asyncio.run turns Ctrl-C into a cancellation of the running task and re-raises it
        # here as KeyboardInterrupt once the task has unwound, so the commands' own clean-up
        # (closing runtimes, removing what they had started to write) has already run.
        name = f"bench {args.bench}" if args.command == "bench" else args.command
        print(f"sona {name}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
