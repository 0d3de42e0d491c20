"""Argument coercion and checks shared by the public entry points.

Arrays of other real dtypes are converted to float32; anything that is not a real array is a
``TypeError``. Shape errors name the argument and the expected shape.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from sona.errors import ConfigError, InvalidInputError
from sona.kernels.update import all_finite

F32 = np.float32
# The largest count or id a saved state may hold: no run reaches it, a float64 still counts
# exactly up to it (averages and sums over counts stay exact), and sums of a few such numbers
# stay within the int64 that kernels and SQLite take.
MAX_COUNT = 2**53
# The bits of an engine's or runtime's seed: its adapters' seeds are derived as seed + small
# offsets, which must stay below numpy's 2**63.
RUN_SEED_BITS = 62


def as_f32(value: Any, name: str) -> np.ndarray:
    """``value`` as a C-contiguous float32 array (a no-op for one already)."""
    if type(value) is np.ndarray and value.dtype == F32 and value.flags.c_contiguous:
        return value
    if isinstance(value, np.ma.MaskedArray):  # asarray would keep the masked-out values
        raise TypeError(f"{name} must be a plain array, got a masked array (fill it first)")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested sequences and the like
        raise TypeError(f"{name} must be a real-valued array: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if arr.ndim == 0:  # ascontiguousarray would make it a vector of length 1
        raise InvalidInputError(f"{name} must be an array, got the scalar {value!r}")
    # A finite value beyond float32's range would become inf here and later be refused as
    # "NaN or inf", which the caller never passed; the cast flags that overflow itself, so
    # saying what happened costs no pass of its own (float32 input returned above never casts).
    try:
        with np.errstate(over="raise"):
            return np.ascontiguousarray(arr, dtype=F32)
    except FloatingPointError:
        finite = arr[np.isfinite(arr)]
        largest = float(finite[np.argmax(np.abs(finite))])
        raise InvalidInputError(
            f"{name} holds {largest:.4g}, beyond float32's range "
            f"(max {float(np.finfo(F32).max):.4g}); sona computes in float32"
        ) from None


def as_vector(value: Any, name: str, size: int) -> np.ndarray:
    arr = as_f32(value, name)
    if arr.ndim != 1 or arr.shape[0] != size:
        raise InvalidInputError(f"{name} must have shape ({size},), got {arr.shape}")
    return arr


def as_finite_vector(value: Any, name: str, size: int) -> np.ndarray:
    arr = as_vector(value, name, size)
    check_finite(arr, name)
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype == F32 and arr.flags.c_contiguous:
        if all_finite(arr):
            return
    elif np.isfinite(arr).all():
        return
    raise InvalidInputError(f"{name} contains NaN or inf")


def real_number(value: Any, name: str, expected: str = "a real number") -> float:
    """``value`` as a float: Python and numpy ints and floats, not bools (a rating of True is
    a bug, not 1.0) and not ints beyond float range (OverflowError is not a ValueError)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise InvalidInputError(
            f"{name} must be {expected}, got an int beyond float range"
        ) from None


def check_quality(quality: Any, name: str = "quality") -> float:
    q = real_number(quality, name, "a real number in [0, 1]")
    if not (0.0 <= q <= 1.0):  # also rejects NaN
        raise InvalidInputError(f"{name} must be in [0, 1], got {q!r}")
    return q


def check_text(value: object, name: str) -> str:
    """A str that UTF-8 can encode: a lone surrogate (from a bad decode upstream) would
    otherwise be found only when the durable log or a checkpoint writes the sample."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{name} is not valid Unicode text: {exc.reason} at index {exc.start}"
        ) from None
    return value


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    v = real_number(value, name)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidInputError(f"{name} must be finite and {bound}, got {v!r}")
    return v


def frozen_copy(arr: np.ndarray) -> np.ndarray:
    """A private read-only copy, so later mutation by the caller cannot change stored data.

    The copy lives in an immutable ``bytes`` object: one memcpy that keeps the GIL (numpy's copy
    loop releases it for large arrays, which hands it to any busy worker thread for up to the
    interpreter's switch interval), read-only without a flags call, and impossible to make
    writeable again.
    """
    if arr.dtype != F32:
        arr = arr.astype(F32)
    out = np.frombuffer(arr.tobytes(), F32)
    return out if arr.ndim == 1 else out.reshape(arr.shape)


def config_number(
    value: object,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite real configuration value inside the given bounds, else ``ConfigError``.

    Returns the value to store: numpy scalars become the Python number they stand for (see
    :func:`_plain_number`), so a config compares, hashes, prints and serialises the same
    whichever was passed. An int too large for a float (JSON in a file allows one) counts as
    infinite, so it is a ``ConfigError`` naming the field like any other out-of-range value.
    """
    v = _plain_number(value, name, "a number")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf if v > 0 else -math.inf
    bad = not math.isfinite(f)
    if lo is not None:
        bad = bad or (f <= lo if lo_open else f < lo)
    if hi is not None:
        bad = bad or (f >= hi if hi_open else f > hi)
    if bad:
        lo_s = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo}"
        hi_s = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {lo_s}, {hi_s}, got {f!r}")
    return v


def _plain_number(value: object, name: str, expected: str) -> float:
    """``value`` as a plain ``int`` or ``float``; bools (Python's or numpy's) are refused.

    A float32 (or float16) is read back as the shortest decimal that rounds to it, which is
    the number its holder wrote: ``np.float32(0.01)`` stores 0.01, not 0.009999999776482582,
    so it gives the same config as the literal would.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(np.format_float_scientific(value, unique=True))
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def check_seed(seed: object, *, bits: int = 63) -> int | None:
    """A seed as an int in [0, 2**bits), or None: numpy's generators refuse negative seeds with
    a message that does not say which argument was wrong, and a float would be truncated."""
    if seed is None:
        return None
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or None, got bool")
    try:
        value = operator.index(seed)  # type: ignore[arg-type]  # int and numpy integers only
    except TypeError:
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}") from None
    if not 0 <= value < 1 << bits:
        raise ValueError(f"seed must be in [0, 2**{bits}), got {value}")
    return value


def config_int(value: object, name: str, *, lo: int, hi: int | None = None) -> int:
    """An int configuration value in [``lo``, ``hi``], else ``ConfigError``; returns it as a
    plain ``int`` (numpy integers are taken, bools and floats are not, whole or not). ``hi``
    exists for values that end up as C sizes, array shapes or floats, where a larger int would
    fail later, far from the field that caused it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if v < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {v}")
    return v


def as_list(value: Any, name: str, what: str) -> list[Any]:
    """``value``'s items as a list, or a TypeError saying what ``name`` should have been
    instead of ``list()``'s "'NoneType' object is not iterable"."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {what}, got a string")
    try:
        return list(value)
    except TypeError:
        got = type(value).__name__
        raise TypeError(f"{name} must be a sequence of {what}, got {got}") from None
