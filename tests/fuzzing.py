"""What the fuzz tests share: their settings, the exceptions a clear rejection may raise, and
the small width they run at."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings

DIM = 6
EXPECTED = (ValueError, TypeError)


def fuzz(n: int) -> Any:
    """``n`` reproducible examples, no deadline, no example database."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
