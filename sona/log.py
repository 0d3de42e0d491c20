"""Logger factory for the library.

sona never configures logging: its structlog loggers sit on stdlib ``logging`` loggers under
``sona.*`` with a ``NullHandler`` at the root, so nothing is printed unless the host (or the CLI)
configures logging. Callers must never format messages eagerly on hot paths; pass key-values.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

logging.getLogger("sona").addHandler(logging.NullHandler())


def get_logger(name: str, **bound: Any) -> Any:
    """A structlog logger on top of ``logging.getLogger(name)``, bound with ``bound``."""
    logger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return logger.bind(**bound) if bound else logger
