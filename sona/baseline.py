"""Running quality baseline for advantage-based feedback (rated outputs, REINFORCE)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from sona.kernels import baseline as k_baseline
from sona.validation import MAX_COUNT

_FIELDS = frozenset({"count", "mean", "var"})


class RunningBaseline:
    """Exponential moving mean and variance of quality, with a warm start.

    The effective decay is min(decay, 1 − 1/n), so the first ratings are averaged exactly rather
    than biased toward the first one. Advantages are z-scores against this baseline, so one step
    size works whether ratings spread over 0.5 or over 0.005.

    The state lives in :attr:`values`, [count, mean, var] as float64: the rated-step and replay
    kernels read the weight from it and move it in the same call as the step
    (:mod:`sona.kernels.baseline`), and :meth:`update` runs that same kernel code.
    """

    __slots__ = ("decay", "values")

    MIN_STD = k_baseline.MIN_STD

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.values = np.zeros(3, np.float64)

    @property
    def count(self) -> int:
        return int(self.values[k_baseline.COUNT])

    @property
    def mean(self) -> float:
        return float(self.values[k_baseline.MEAN])

    @property
    def var(self) -> float:
        return float(self.values[k_baseline.VAR])

    def advantage(self, quality: float) -> float:
        """(quality − mean) / std, or 0 before any rating was seen."""
        return float(k_baseline.advantage(self.values, quality))

    def weight(self, quality: float, temperature: float, cap: float) -> float:
        """A rated output's regression weight: min(exp(advantage / temperature), cap)."""
        return float(k_baseline.output_weight(self.values, quality, temperature, cap))

    def update(self, quality: float) -> None:
        k_baseline.update_baseline(self.values, quality, self.decay)

    def state(self) -> dict[str, float]:
        return {"count": float(self.count), "mean": self.mean, "var": self.var}

    def load(self, state: Mapping[str, object]) -> None:
        """Restore a :meth:`state`; anything it could not have produced raises ValueError naming
        the field, and changes nothing.

        The count is kept as a float64, so it must be a whole number no larger than 2**53, the
        last one a float64 still counts exactly; a bool is not a number here.
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
        if not (0 <= count <= MAX_COUNT and float(count).is_integer()):
            raise ValueError(f"baseline.count must be a whole number in [0, 2**53], got {count!r}")
        if var < 0:
            raise ValueError(f"baseline.var must be >= 0, got {var!r}")
        self.values[:] = (float(count), float(values["mean"]), float(var))


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float; an int too large for one (JSON allows it) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
