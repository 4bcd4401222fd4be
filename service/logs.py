"""Structured logs: one JSON object per line, with the event's fields at the top level.

Call sites log ``log.info("round completed", extra={"fields": {...}})``; :class:`JsonFormatter`
merges ``fields`` into the record, :class:`TextFormatter` appends them as ``key=value``.
Never pass secrets (keys, seeds, inputs) as fields.

gRPC's C core writes its own lines (``I1201 21:19:44.975146 3991 file.cc:123] text``) to file
descriptor 2. :class:`StderrCapture` (``secagg serve``) puts a pipe there and re-logs every
such line through the same handler as logger ``grpc.core``, so stderr stays one stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["JsonFormatter", "StderrCapture", "TextFormatter", "configure", "event"]

LOGGER = "secagg.service"
GRPC_CORE = "grpc.core"

_CORE_LINE = re.compile(r"^([DIWEF])\d{4} [\d:.]+\s+\d+\s+([^\]\s]+)\] ?(.*)$")
_CORE_LEVEL = {
    "D": logging.DEBUG,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``ts level logger: msg key=value ...`` (values with spaces are JSON-quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname.lower(), f"{record.name}:"]
        parts.append(record.getMessage())
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                if not text or any(c.isspace() or c in '"=' for c in text):
                    text = json.dumps(text)
                parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def configure(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Send ``secagg.*`` and ``grpc.*`` logs to ``stream`` (stderr) as JSON or text."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("secagg", "grpc"):
        root = logging.getLogger(name)
        root.handlers[:] = [handler]
        root.setLevel(level.upper())
        root.propagate = False


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


def parse_core_line(line: str) -> tuple[int, str, dict[str, Any]]:
    """(level, message, fields) of one line gRPC's core (or anything else) wrote to fd 2."""
    m = _CORE_LINE.match(line)
    if m is None:
        return logging.WARNING, line, {"source": "stderr"}
    return _CORE_LEVEL[m.group(1)], m.group(3), {"source": m.group(2)}


class StderrCapture:
    """Replace file descriptor 2 with a pipe; every line written there is logged.

    ``start`` returns a text stream on the original stderr for the log handler. Listeners
    (``on_line``) see each captured message (the server counts TLS handshake failures
    from gRPC's lines, the only place gRPC reports them).
    """

    def __init__(self) -> None:
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[str], None]] = []
        self.log = logging.getLogger(GRPC_CORE)

    def on_line(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> IO[str]:
        sys.stderr.flush()
        self._saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        out = os.fdopen(os.dup(self._saved), "w", buffering=1)
        sys.stderr = out
        self._thread = threading.Thread(
            target=self._pump, args=(read,), name="secagg-stderr", daemon=True
        )
        self._thread.start()
        return out

    def _pump(self, fd: int) -> None:
        with os.fdopen(fd, "r", errors="replace") as pipe:
            for raw in pipe:
                line = raw.rstrip("\n")
                if not line.strip():
                    continue
                level, msg, fields = parse_core_line(line)
                for listener in self._listeners:
                    with contextlib.suppress(Exception):
                        listener(msg)
                event(self.log, level, msg, **fields)

    def stop(self) -> None:
        """Put the original stderr back and drain what is left in the pipe."""
        if self._saved is None:
            return
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump sees EOF
        os.close(self._saved)
        self._saved = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
