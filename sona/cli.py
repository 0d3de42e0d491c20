"""The ``sona`` command: demo, bench and inspect.

The CLI is the only place that configures logging (the library never does). It is also where
a Ctrl-C ends: every command is interrupted the same way, with one line and exit status 130;
and where a reader that stopped early (``sona inspect X | head -1``) ends it, silently, with 141.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import structlog

from sona.bench import BENCHES
from sona.errors import InvalidInputError

DESCRIPTION = (
    "sona: online adaptation of language models from user feedback. "
    "Run the simulated application (demo), measure sona against its peers (bench), or "
    "describe a saved adapter, checkpoint or PEFT adapter directory (inspect)."
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "WARNING"

BENCH_HELP = {
    "kernels": "MicroLoRA forward and adapt against numpy and torch CPU: µs per call",
    "runtime": "the actor runtime against bare asyncio, and SonaRuntime's latency, "
    "throughput and consolidation time",
    "learning": "held-out quality over updates for each feedback form",
    "forgetting": "what is kept of four conflicting tasks learned in turn (ACC, BWT): plain "
    "SGD, EWC++ at several λ, joint training, a torch online-EWC peer",
    "soak": "sustained load with crashes and the durable log: throughput, latency and "
    "memory per window",
}
"""One line per benchmark for ``sona bench --help`` (kept here so the help does not depend on
which optional dependencies a benchmark module can import)."""

INTERRUPTED_STATUS = 130
"""128 + SIGINT, what a shell reports for a command ended by Ctrl-C."""

BROKEN_PIPE_STATUS = 141
"""128 + SIGPIPE, what a shell reports for a command whose reader went away (``| head``)."""


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
    parser = argparse.ArgumentParser(
        prog="sona",
        description=DESCRIPTION,
        epilog="Run 'sona COMMAND --help' for the options of one command.",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        default=None,
        metavar="LEVEL",
        help=f"level of sona's logs on stderr: {', '.join(LOG_LEVELS)}, in any case "
        f"(default {DEFAULT_LOG_LEVEL}; 'sona demo --quiet' shows INFO unless a level is given)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_help = "run the simulated application and write report.json and plots"
    demo = sub.add_parser("demo", help=demo_help, description=demo_help)
    try:
        demo_mod = importlib.import_module("sona.demo")
    except ImportError:
        demo_mod = None
    if demo_mod is not None:
        demo_mod.add_arguments(demo)

    bench_help = "measure sona against numpy, torch and asyncio"
    bench = sub.add_parser("bench", help=bench_help, description=bench_help)
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHES.items():
        text = BENCH_HELP.get(name)
        p = bench_sub.add_parser(name, help=text, description=text)
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:
            p.set_defaults(unavailable=True)

    inspect_help = "describe an adapter, checkpoint or PEFT directory"
    inspect = sub.add_parser("inspect", help=inspect_help, description=inspect_help)
    inspect.add_argument(
        "path",
        metavar="PATH",
        help="an adapter file (MicroLoRA.save), a checkpoint file, a checkpoint_dir or a PEFT "
        "adapter directory; read only, nothing is written",
    )
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        if getattr(args, "unavailable", False):
            print(f"sona bench {args.bench}: not available in this build", file=sys.stderr)
            return 2
        try:
            result: int = importlib.import_module(BENCHES[args.bench]).run(args)
        except InvalidInputError as exc:
            # settings that drive an adapter past float32 (a learning rate of 1e30, say): the
            # adapter refuses to go on, which is the answer, not a crash to show a trace of
            print(f"sona bench {args.bench}: stopped: {exc}", file=sys.stderr)
            return 1
        return result
    if args.command == "demo":
        demo_mod = importlib.import_module("sona.demo")
        result = demo_mod.run(args)
        return result
    if args.command == "inspect":
        from sona.inspect import run as inspect_run

        return inspect_run(args.path)
    return 2  # pragma: no cover - argparse enforces the choices


def _interrupted(args: argparse.Namespace) -> int:
    name = f"bench {args.bench}" if args.command == "bench" else args.command
    print(f"sona {name}: interrupted", file=sys.stderr)
    return INTERRUPTED_STATUS


def _reader_gone() -> int:
    """Stop quietly, like the tools a pipeline mixes sona with: nobody is left to read the
    output, so a traceback about it would only bury what the reader did print. Python ignores
    SIGPIPE, so the closed pipe shows as a BrokenPipeError; stdout is pointed at devnull so
    the interpreter's last flush of what is still buffered does not raise it again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by an object without a descriptor
        return BROKEN_PIPE_STATUS
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return BROKEN_PIPE_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    level = args.log_level or DEFAULT_LOG_LEVEL
    configure_logging(level=logging.getLevelNamesMapping()[level])
    try:
        status = _dispatch(args)
        # Buffered output meets a closed pipe here, not at the interpreter's exit, where it
        # would be reported as an ignored exception and status 120.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        # asyncio.run turns Ctrl-C into a cancellation of the running task and re-raises it
        # here as KeyboardInterrupt once the task has unwound, so the commands' own clean-up
        # (closing runtimes, removing what they had started to write) has run.
        return _interrupted(args)
    except BaseExceptionGroup as group:
        # A Ctrl-C that lands while no asyncio runner handles it (between two runs of a
        # benchmark, say) is raised inside whatever task group is open, in a group.
        if group.subgroup(KeyboardInterrupt) is not None:
            return _interrupted(args)
        if group.split(BrokenPipeError)[1] is None:  # output written from inside a task
            return _reader_gone()
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
