"""What the subcommands share: one-line errors, redaction, logging, the parser."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import attrs

from .._exceptions import AMQPBatchError

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "OneLineParser",
    "Option",
    "add_options",
    "configure_logging",
    "describe",
    "error_line",
    "option",
    "redact",
    "report",
]

#: Exit codes of the ``amqp-batch`` command.
EXIT_OK = 0
#: The consumer stopped on an error after it had been consuming.
EXIT_FAILED = 1
#: Nothing was consumed: bad arguments, target, settings, broker or credentials.
EXIT_USAGE = 2
#: Ctrl-C before the consumer had installed its signal handlers.
EXIT_INTERRUPTED = 130

# ``scheme://user:password@`` anywhere in a text (several URLs, quoted or not).
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s'\"]*:)[^@/\s]*@"
)


class CLIError(Exception):
    """A user-facing error: reported as one line on stderr, with ``exit_code``."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def error_line(message: str) -> str:
    """``message`` as one redacted line."""
    return " ".join(redact(message).split())


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, redacted."""
    text = str(exc)
    return error_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def report(message: str, *, prog: str = "amqp-batch") -> None:
    """Print ``prog: error: message`` as one line on stderr."""
    print(f"{prog}: error: {error_line(message)}", file=sys.stderr, flush=True)


class _Formatter(logging.Formatter):
    """Redacts URL passwords; shows a library error (an expected, operational
    event such as a refused redeclare) as ``: Type: message`` instead of a
    traceback, unless ``tracebacks`` is set (``--log-level debug``)."""

    def __init__(self, fmt: str, *, tracebacks: bool) -> None:
        super().__init__(fmt)
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, AMQPBatchError) and not self._tracebacks:
            record = logging.makeLogRecord(
                {
                    **record.__dict__,
                    "msg": f"{record.getMessage()}: {describe(error)}",
                    "args": (),
                    "exc_info": None,
                    "exc_text": None,
                }
            )
        return redact(super().format(record))


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``, one line per record, with URL passwords
    redacted. Tracebacks appear for unexpected errors (a handler that raised),
    and for library errors only at ``DEBUG``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            tracebacks=level.upper() == "DEBUG",
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{self.prog}: error: {error_line(message)} (see {self.prog} --help)\n",
        )


@attrs.frozen
class Option:
    """One command-line option, declared as data: the arguments of
    ``add_argument``."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]


def option(*flags: str, **options: Any) -> Option:
    """The option ``add_argument(*flags, **options)`` adds."""
    return Option(flags, options)


def add_options(
    parser: argparse.ArgumentParser, title: str, options: Iterable[Option]
) -> None:
    """Add the argument group ``title`` with ``options`` to ``parser``."""
    group = parser.add_argument_group(title)
    for each in options:
        group.add_argument(*each.flags, **each.options)
