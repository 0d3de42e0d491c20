"""The ``sona`` command: demo, bench and inspect.

The CLI is the only place that configures logging (the library never does). It is also where
a Ctrl-C ends: every command is interrupted the same way, with one line and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import TracebackType

import structlog

from sona.bench import BENCHES

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


class _SigintWatch:
    """Tells whether a SIGINT arrived while a command ran, whoever handled it.

    ``asyncio.run`` turns the first Ctrl-C into a cancellation of its task, and raises
    KeyboardInterrupt only if that task then ends cancelled: clean-up that meets the
    cancellation with an error of its own (an ExceptionGroup from a task group whose child
    failed while stopping) makes that error escape instead. The signal module writes every
    signal to the wakeup fd, whichever Python handler takes it, so the CLI can still tell that
    the command ended because it was interrupted.
    """

    def __init__(self) -> None:
        self._read_fd = -1
        self._write_fd = -1
        self._previous = -1
        self._seen = False

    def __enter__(self) -> _SigintWatch:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            self._previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread, which is the only one signals reach
            os.close(r)
            os.close(w)
            return self
        self._read_fd, self._write_fd = r, w
        return self

    def arrived(self) -> bool:
        while not self._seen and self._read_fd >= 0:
            try:
                data = os.read(self._read_fd, 512)
            except BlockingIOError:
                break
            if not data:
                break
            self._seen = signal.SIGINT in data
        return self._seen

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._read_fd >= 0:
            signal.set_wakeup_fd(self._previous)
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1


def _leaf_names(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [name for sub in exc.exceptions for name in _leaf_names(sub)]
    return [type(exc).__name__]


def _interrupted(args: argparse.Namespace, exc: BaseException | None = None) -> int:
    name = f"bench {args.bench}" if args.command == "bench" else args.command
    after = ""
    if exc is not None:  # say what stopping raised, without a traceback
        after = f" (stopping it raised {', '.join(dict.fromkeys(_leaf_names(exc)))})"
    print(f"sona {name}: interrupted{after}", file=sys.stderr)
    return INTERRUPTED_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    level = args.log_level or DEFAULT_LOG_LEVEL
    configure_logging(level=logging.getLevelNamesMapping()[level])
    with _SigintWatch() as sigint:
        try:
            return _dispatch(args)
        except KeyboardInterrupt:
            # asyncio.run turns Ctrl-C into a cancellation of the running task and re-raises
            # it here as KeyboardInterrupt once the task has unwound, so the commands' own
            # clean-up (closing runtimes, removing what they had started to write) has run.
            return _interrupted(args)
        except BaseException as exc:
            if isinstance(exc, SystemExit) or not sigint.arrived():
                raise
            return _interrupted(args, exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
