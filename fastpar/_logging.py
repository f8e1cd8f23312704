"""Logging helpers: one logger per module, and messages that must be said only once."""

from __future__ import annotations

import logging
import threading

_said: set[tuple[str, str]] = set()
_said_lock = threading.Lock()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_once(logger: logging.Logger, message: str, level: int = logging.INFO) -> bool:
    """Log `message` on `logger` the first time it is seen in this process.

    Backend and transport fallbacks use this so a loop does not repeat the same reason.

    Returns:
        True when the message was logged now, False when it had been logged before.
    """
    key = (logger.name, message)
    with _said_lock:
        if key in _said:
            return False
        _said.add(key)
    logger.log(level, message)
    return True
