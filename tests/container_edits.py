"""Edits of a decoded container (header and arrays), for the tests that re-encode a file with
a valid checksum to reach the checks behind it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Edit = Callable[[dict[str, Any], dict[str, np.ndarray]], None]


def set_at(path: str, value: Any) -> Edit:
    """Set the header field at the dotted ``path`` (``"config.rank"``) to ``value``."""

    def edit(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value

    return edit
