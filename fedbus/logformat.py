"""Log records as JSON lines (``fedbus --log-format json``), for log collectors.

One object per line: ``ts`` (seconds since the epoch, as a number), ``time`` (ISO 8601, UTC),
``level``, ``logger``, ``message`` (the formatted message), ``process`` (the pid), and, when
the record carries an exception, ``exc`` (its formatted traceback). Values given to a
logging call through ``extra=`` that JSON can hold are added under their own names (names
the record itself uses are never overwritten). Only the CLI installs it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

__all__ = ["JsonFormatter"]

# attributes every LogRecord has: anything else on a record came from ``extra=``
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}
_OWN = frozenset({"ts", "time", "level", "logger", "message", "process", "exc"})


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (never more: newlines are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key in _RECORD_FIELDS or key in _OWN or key.startswith("_"):
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = repr(value)
            out[key] = value
        return json.dumps(out, ensure_ascii=False, allow_nan=False, default=repr)
