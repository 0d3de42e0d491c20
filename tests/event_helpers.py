"""Reading what a subscription has already buffered, for tests that check events afterwards."""

from __future__ import annotations

from typing import Any


def buffered(sub: Any) -> list[Any]:
    """The events waiting in an ``EventBus`` subscription, oldest first, received without
    waiting."""
    events = []
    while sub.pending:
        events.append(sub.receive_nowait())
    return events
