"""The rating baseline of rated outputs, on its array [count, mean, var].

``sona.baseline.RunningBaseline`` keeps its state in such an array, so the kernels that step
on a rated output (the Instant loop's rated step, the replay kernels) read the weight and move
the baseline in the same call, and every path weighs a rating with this one code.

Compiled without fast-math flags: contracting or reordering these few float64 operations would
round them differently from one caller to the next. Fast-math kernels call these functions
rather than inline them, so the functions keep their own flags.
"""

from __future__ import annotations

import math

import numpy as np
from sona.kernels.jit import strict_kernel

MIN_STD = 1e-4  # the smallest spread an advantage is measured against
COUNT, MEAN, VAR = 0, 1, 2  # the array's slots


@strict_kernel
def advantage(baseline: np.ndarray, quality: float) -> float:
    """The rating's z-score against the baseline, (quality − mean) / std, or 0 before the
    first rating: one step size then works whether ratings spread over 0.5 or over 0.005."""
    adv = 0.0
    if baseline[COUNT] > 0.0:
        adv = (quality - baseline[MEAN]) / max(math.sqrt(baseline[VAR]), MIN_STD)
    return adv


@strict_kernel
def output_weight(baseline: np.ndarray, quality: float, temperature: float, cap: float) -> float:
    """A rated output's regression weight: exp(advantage / temperature), capped at ``cap``.

    The cap is compared in the exponent: right after the first ratings the spread is tiny and
    z-scores reach thousands, beyond what exp can return."""
    z = advantage(baseline, quality) / temperature
    if z >= math.log(cap):
        return cap
    return math.exp(z)


@strict_kernel
def update_baseline(baseline: np.ndarray, quality: float, decay: float) -> None:
    """Fold a rating into the exponential moving mean and variance.

    The effective decay is min(decay, 1 − 1/n), so the first ratings are averaged exactly
    rather than biased toward the first one."""
    count = baseline[COUNT] + 1.0
    baseline[COUNT] = count
    if count == 1.0:
        baseline[MEAN] = quality
        baseline[VAR] = 0.0
        return
    d = min(decay, 1.0 - 1.0 / count)
    delta = quality - baseline[MEAN]
    baseline[MEAN] += (1.0 - d) * delta
    baseline[VAR] = d * (baseline[VAR] + (1.0 - d) * delta * delta)


def warm_up() -> None:
    b = np.zeros(3)
    update_baseline(b, 0.5, 0.9)
    advantage(b, 0.5)
    output_weight(b, 0.5, 1.0, 4.0)
