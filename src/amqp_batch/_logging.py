"""Structured logs: a JSON formatter and the fields every consumer log carries.

Each record becomes one JSON object on one line: ``time`` (UTC, ISO 8601),
``level``, ``logger``, ``message``, then every ``extra`` field of the record and
the consumer's context (``queue``, and ``worker`` in a worker's tasks, the
handler's included), and ``exception`` with the traceback when there is one. URL
passwords are replaced by ``***`` everywhere in the line.

A stdlib formatter (about thirty lines) rather than python-json-logger: the
format is small and fixed, it needs the redaction and the context fields, and
the CLI keeps no dependency beyond the library's own.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from ._exceptions import AMQPBatchError

__all__ = [
    "ContextFilter",
    "JSONFormatter",
    "configure_json_logging",
    "log_context",
    "log_fields",
    "set_log_context",
]

#: Fields added to every record logged in this context (a worker's tasks set
#: ``worker``; the consumer sets ``queue``).
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar(
    "amqp_batch_log", default=MappingProxyType({})
)

# ``scheme://user:password@`` anywhere in a text.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s'\"]*:)[^@/\s]*@"
)

#: Attributes every LogRecord has: not ``extra`` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def log_fields() -> Mapping[str, Any]:
    """The context fields of the current task."""
    return _CONTEXT.get()


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every record logged in this context (and in the tasks
    started from it) until the block ends."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def set_log_context(**fields: Any) -> None:
    """Add ``fields`` to the current context for the rest of the task (for a
    task's whole life: its context is its own)."""
    _CONTEXT.set({**_CONTEXT.get(), **fields})


class ContextFilter(logging.Filter):
    """Stamps the context fields on each record, where it is logged (so they
    survive a ``QueueHandler`` that formats in another thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _CONTEXT.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line, passwords redacted.

    A record with an exception gets ``error`` (``Type: message``) and
    ``exception`` (the traceback); with ``library_tracebacks=False`` an
    amqp-batch error (an expected, operational event such as a lost
    connection) gets only ``error``.
    """

    def __init__(self, *, library_tracebacks: bool = True) -> None:
        super().__init__()
        self._library_tracebacks = library_tracebacks

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc
            ).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _CONTEXT.get().items():
            entry.setdefault(name, value)
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            text = str(error)
            entry["error"] = (
                f"{type(error).__name__}: {text}" if text else type(error).__name__
            )
        if record.exc_info and (
            self._library_tracebacks or not isinstance(error, AMQPBatchError)
        ):
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text and error is None:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure_json_logging(level: str, stream: Any = None) -> None:
    """Log JSON lines to ``stream`` (default stderr) at ``level``, replacing the
    root logger's handlers. Library errors carry a traceback only at
    ``DEBUG``."""
    import sys

    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JSONFormatter(library_tracebacks=level.upper() == "DEBUG"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
