"""Logging for both processes: one format, and as little work per line as it allows.

Its own module so that the publisher process, which needs only this, does not load
the config's parser (1 MB of its memory).
"""

from __future__ import annotations

import logging
import time

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _Formatter(logging.Formatter):
    """logging's own format, with the date and time formatted once a second, not once a
    line: a line per webhook is on the acknowledgement's path."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def configure_logging(level: str) -> None:
    """Log to stderr at `level`. logging skips what the format never shows (the logging
    HOWTO's "Optimization"): the stack walk for the caller's file and line, thread and
    process names."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Formatter(LOG_FORMAT))
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
