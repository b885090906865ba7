"""A server's logs: one line per record on stderr, as JSON or as text with the same fields
(time, level, logger, message, then each ``extra`` field: an RPC's ``method``, ``code``,
``duration_ms``, ``peer``, and ``error`` when it failed; ``request_id`` on every line
logged while a call is handled)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from gradmesh.server.runtime.config import ServerConfig
from gradmesh.wire.channel import request_id

# A record's own attributes; anything else on it came from ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with ``extra=``, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(extra_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _text_value(value: Any) -> str:
    # Bare where that reads back unambiguously as a string, else as JSON ("a b", "42",
    # lists, numbers, true).
    if isinstance(value, str):
        if (
            value
            and value[0] not in "-0123456789"
            and value not in ("true", "false", "null")
            and not any(c.isspace() or c in '"=\\' for c in value)
        ):
            return value
        return json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message key=value ...``: the fields of :class:`JsonFormatter`,
    for people reading a terminal; a traceback follows on the lines below."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record), record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in extra_fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record logged while a call is handled (the id the
    interceptor set), so each line of a call, on every server it reaches, can be found."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not as it was when logging
    was set up: a stream swapped out and closed since (pytest's capture of one test) would
    fail every later record of a server still running."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(config: ServerConfig) -> None:
    """Send gradmesh's logs to stderr in ``config.log_format``; safe to call twice."""
    logger = logging.getLogger("gradmesh")
    for h in list(logger.handlers):
        if getattr(h, "_gradmesh", False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler._gradmesh = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(config.log_level.upper())
    logger.propagate = False
