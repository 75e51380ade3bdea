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

__all__ = ["JSONFormatter", "log_context", "log_fields"]

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
    """One JSON object per record, on one line, passwords redacted."""

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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _redact(json.dumps(entry, default=str, ensure_ascii=False))
