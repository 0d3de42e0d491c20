"""Loggers for the actor runtime, kept local so that ``actors/`` depends on no other sona module.

The runtime never configures logging: its structlog loggers sit on stdlib loggers under
``sona.actors`` with a ``NullHandler``, so nothing is printed unless the host configures logging.
Call sites pass key-values and never pre-format messages: a filtered-out call then costs ~0.1 µs.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

logging.getLogger("sona.actors").addHandler(logging.NullHandler())


def get_logger(name: str, **bound: Any) -> Any:
    """A structlog logger on ``logging.getLogger(name)``, bound with ``bound``."""
    logger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return logger.bind(**bound) if bound else logger
