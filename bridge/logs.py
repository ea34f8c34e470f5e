"""Logging for both processes: one format, and as little work per line as it allows.

Its own module so that the publisher process, which needs only this, does not load
the config's parser (1 MB of its memory).
"""

from __future__ import annotations

import logging
import sys
import threading
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


FLUSH_AFTER = 0.05  # s: the longest an info line waits in the buffer


class BufferedStderr(logging.Handler):
    """Lines to stderr, info and below gathered for up to FLUSH_AFTER and written at
    once: a write() per line was 4-5 % of the webhook process's CPU under load. A
    warning or an error is written at once, after the lines before it. A `kill -9`
    loses at most FLUSH_AFTER of info lines."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        self._waiting = threading.Event()  # set when the buffer stops being empty
        threading.Thread(target=self._flush_later, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock made it
            self._lines.append(line)
            if record.levelno >= logging.WARNING:
                self._write()
            elif len(self._lines) == 1:
                self._waiting.set()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        """Write what is buffered; the caller holds the lock."""
        if self._lines:
            text, self._lines = "".join(self._lines), []
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr is gone (closed pipe): nothing left to tell

    def _flush_later(self) -> None:
        while True:
            self._waiting.wait()
            time.sleep(FLUSH_AFTER)
            self._waiting.clear()
            self.flush()


def configure_logging(level: str) -> None:
    """Log to stderr at `level`. logging skips what the format never shows (the logging
    HOWTO's "Optimization"): the stack walk for the caller's file and line, thread and
    process names."""
    handler = BufferedStderr()
    handler.setFormatter(_Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
