"""Restart delays: exponential, capped, jittered, so crash loops neither spin nor synchronise."""

from __future__ import annotations

import random

import msgspec


def is_number(value: object) -> bool:
    """A real number, not a bool (``True`` as a timeout is a mistake, not one second)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Backoff(msgspec.Struct, frozen=True):
    """Delay before the n-th consecutive restart: ``min_s * 2**(n-1)``, capped at ``max_s``.

    The delay is multiplied by a factor drawn uniformly from ``[1 - jitter, 1 + jitter]`` and
    capped again, so children that crash together do not restart in lockstep.
    """

    min_s: float = 0.01
    max_s: float = 1.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        # msgspec checks field types only when decoding, not in the constructor.
        for field in ("min_s", "max_s", "jitter"):
            value = getattr(self, field)
            if not is_number(value):
                raise TypeError(f"Backoff.{field} must be a number, got {value!r}")
        if not (self.min_s >= 0.0 and self.max_s >= self.min_s):
            raise ValueError(
                f"Backoff needs 0 <= min_s <= max_s, got min_s={self.min_s}, max_s={self.max_s}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Backoff.jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before restart number ``attempt`` (1 for the first in a row)."""
        if attempt < 1 or self.max_s == 0.0:
            return 0.0
        # 2**60 already exceeds any sane cap; clamping the exponent avoids float overflow.
        base = min(self.max_s, self.min_s * 2.0 ** min(attempt - 1, 60))
        if self.jitter:
            r = rng.random() if rng is not None else random.random()
            base *= 1.0 + self.jitter * (2.0 * r - 1.0)
        return min(self.max_s, base)
