"""Checked option types for ``sona bench``.

Each factory returns an argparse ``type=`` callable, so a bad value is refused while the command
line is parsed (``argument --samples: must be an integer >= 1, got '0'``, exit status 2) before
any work starts. Left unchecked, such values surfaced minutes later as a traceback from deep
inside a run, or worse, as a table of figures that were never measured (a negative
throughput, a mean over zero seeds).

Constraints between options, which argparse cannot express, are checked at the start of a
bench's ``run`` with :func:`refuse`, which reports them the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from sona.lora_config import MAX_FEATURES

_PARSER_KEY = "_bench_parser"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (no upper bound when ``hi`` is None)."""
    what = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def ints_in(lo: int, hi: int | None = None) -> Callable[[str], list[int]]:
    """A non-empty comma-separated list of integers in [lo, hi]."""
    one = int_in(lo, hi)
    what = f"integers >= {lo}" if hi is None else f"integers in [{lo}, {hi}]"

    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [one(p) for p in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated {what}, got {text!r}"
            ) from None
        return values

    parse.__name__ = "int list"
    return parse


def float_in(
    lo: float, hi: float | None = None, *, lo_open: bool = True, hi_open: bool = False
) -> Callable[[str], float]:
    """A finite number between ``lo`` and ``hi``, each bound open or closed (by default: > lo,
    no upper bound). NaN and infinities are refused: no bench can run a NaN learning rate or
    an infinite duration."""
    what = _interval(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not _inside(value, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def floats_in(
    lo: float,
    hi: float | None = None,
    *,
    lo_open: bool = True,
    hi_open: bool = False,
    allow_empty: bool = False,
) -> Callable[[str], list[float]]:
    """A comma-separated list of finite numbers between ``lo`` and ``hi`` (see
    :func:`float_in`); an empty list only when ``allow_empty``."""
    one = float_in(lo, hi, lo_open=lo_open, hi_open=hi_open)
    what = "comma-separated " + _interval(lo, hi, lo_open, hi_open, plural=True)

    def parse(text: str) -> list[float]:
        parts = [p.strip() for p in text.split(",")]
        if allow_empty and all(not p for p in parts):
            return []
        try:
            return [one(p) for p in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None

    parse.__name__ = "float list"
    return parse


def _interval(
    lo: float, hi: float | None, lo_open: bool, hi_open: bool, *, plural: bool = False
) -> str:
    noun = "finite numbers" if plural else "a finite number"
    if hi is None:
        return f"{noun} {'>' if lo_open else '>='} {lo:g}"
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return f"{noun} in {left}{lo:g}, {hi:g}{right}"


def _inside(value: float, lo: float, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if not math.isfinite(value):
        return False
    if value < lo or (lo_open and value == lo):
        return False
    return hi is None or not (value > hi or (hi_open and value == hi))


positive_int = int_in(1)
positive_ints = ints_in(1)
positive_float = float_in(0.0)
# A MicroLoRA's widest projection: a wider --dim ended in a ConfigError traceback, after any
# earlier part of the bench had run
adapter_dim = int_in(2, MAX_FEATURES)
adapter_dims = ints_in(1, MAX_FEATURES)
# Benches whose simulated task is a dense dim × dim matrix: 512 MiB of float64 at this width
# (and a MemoryError traceback from numpy far beyond it)
dense_dim = int_in(2, 8192)
# SonaRuntime takes seeds in [0, 2**62) (it derives its adapters' seeds by adding to them)
seed = int_in(0, 2**62 - 1)


def new_directory(text: str) -> Path:
    """A directory a run may create or fill: absent (its nearest existing ancestor a
    directory), or existing and empty. A sona checkpoint_dir holding an earlier run's state
    belongs to that run, and a file in the way cannot become one."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
        if any(path.iterdir()):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not empty; give a new or empty directory"
            )
        return path
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{str(parent)!r} in {text!r} is not a directory")
            break
    return path


def remember_parser(parser: argparse.ArgumentParser) -> None:
    """Keep ``parser`` in the parsed arguments, for :func:`refuse`."""
    parser.set_defaults(**{_PARSER_KEY: parser})


def refuse(args: argparse.Namespace, message: str) -> NoReturn:
    """Report options that do not go together as argparse reports a bad one: usage and a
    one-line error on stderr, exit status 2. Call it before any work starts."""
    parser = getattr(args, _PARSER_KEY, None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
