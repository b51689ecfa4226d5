"""Log set-up: one line per event, plain or JSON, to stderr, each carrying the
id of the call it belongs to, so an operator can follow one restore through."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the call the current thread is serving; set by the servicer."""


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


FIELDS = ("reason", "peer", "bytes", "sha256", "seconds")
"""Details a log call may pass in `extra`; JSON lines carry each as its own field."""


class _UtcFormatter(logging.Formatter):
    """Times in RFC 3339, UTC, to the millisecond: 2026-11-28T06:31:12.771Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _JsonFormatter(_UtcFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(json_lines: bool) -> None:
    """Send safehold's log to stderr; INFO and up, so each restore step shows."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else _UtcFormatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
