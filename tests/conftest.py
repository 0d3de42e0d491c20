"""Shared pytest configuration."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio, the backend sona targets."""
    return "asyncio"


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO nobody writes to. Opening it to read waits for a writer, so a watchdog keeps
    opening and closing its write end: code that waits reads an empty file and fails its test
    instead of hanging the run."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs POSIX FIFOs")
    path = tmp_path / "fifo"
    os.mkfifo(path)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader waiting
                continue
            os.close(fd)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    yield path
    stop.set()
    watchdog.join()
