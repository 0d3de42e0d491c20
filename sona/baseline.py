"""Running quality baseline for advantage-based feedback (rated outputs, REINFORCE)."""

from __future__ import annotations

import math
from collections.abc import Mapping

_FIELDS = frozenset({"count", "mean", "var"})
_MAX_COUNT = 2**53


class RunningBaseline:
    """Exponential moving mean and variance of quality, with a warm start.

    The effective decay is min(decay, 1 − 1/n), so the first ratings are averaged exactly rather
    than biased toward the first one. Advantages are z-scores against this baseline, so one step
    size works whether ratings spread over 0.5 or over 0.005.
    """

    __slots__ = ("count", "decay", "mean", "var")

    MIN_STD = 1e-4

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def advantage(self, quality: float) -> float:
        """(quality − mean) / std, or 0 before any rating was seen."""
        if self.count == 0:
            return 0.0
        return (quality - self.mean) / max(math.sqrt(self.var), self.MIN_STD)

    def update(self, quality: float) -> None:
        self.count += 1
        if self.count == 1:
            self.mean = quality
            self.var = 0.0
            return
        d = min(self.decay, 1.0 - 1.0 / self.count)
        delta = quality - self.mean
        self.mean += (1.0 - d) * delta
        self.var = d * (self.var + (1.0 - d) * delta * delta)

    def state(self) -> dict[str, float]:
        return {"count": float(self.count), "mean": self.mean, "var": self.var}

    def load(self, state: Mapping[str, object]) -> None:
        """Restore a :meth:`state`; anything it could not have produced raises ValueError naming
        the field, and changes nothing.

        The count is stored as a float, so it must be a whole number no larger than 2**53, the
        last one a float (and the replay kernels, which count in float64) still counts exactly;
        a bool is not a number here.
        """
        if set(state) != _FIELDS:
            raise ValueError(f"baseline must hold exactly {sorted(_FIELDS)}, got {sorted(state)}")
        values: dict[str, int | float] = {}
        for name in sorted(_FIELDS):
            v = state[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                raise ValueError(f"baseline.{name} must be a finite number, got {v!r}")
            values[name] = v
        count, var = values["count"], values["var"]
        if not (0 <= count <= _MAX_COUNT and float(count).is_integer()):
            raise ValueError(f"baseline.count must be a whole number in [0, 2**53], got {count!r}")
        if var < 0:
            raise ValueError(f"baseline.var must be >= 0, got {var!r}")
        self.count = int(count)
        self.mean = float(values["mean"])
        self.var = float(var)


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float; an int too large for one (JSON allows it) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
