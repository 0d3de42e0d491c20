"""Running quality baseline for advantage-based feedback (rated outputs, REINFORCE)."""

from __future__ import annotations

import math


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

    def load(self, state: dict[str, float]) -> None:
        count = state.get("count", 0.0)
        mean = state.get("mean", 0.0)
        var = state.get("var", 0.0)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (count, mean, var)):
            raise ValueError("baseline state must hold finite numbers")
        if count < 0 or var < 0:
            raise ValueError("baseline state has a negative count or variance")
        self.count = int(count)
        self.mean = float(mean)
        self.var = float(var)
