"""The ``amqp-batch`` command (also ``python -m amqp_batch``).

- ``amqp-batch run MODULE:TARGET``: consume a queue with a handler or a
  ``BatchConsumer`` / ``Consumer`` subclass; settings from flags, then
  ``AMQP_BATCH_*`` environment variables, then a ``.env`` file, then defaults.
- ``amqp-batch demo``: publish sample messages and consume them in batches.
- ``amqp-batch dlq inspect|replay|purge QUEUE``: a dead-letter queue's contents,
  moved back or removed, without losing or reordering a message.
- ``amqp-batch --version``.

Exit codes: 0 done (stopped by SIGINT/SIGTERM, or the demo finished); 1 the
consumer stopped on an error after it had consumed; 2 nothing was consumed (bad
arguments, target, settings, broker or credentials), reported as one line on
stderr; 130 interrupted before the consumer took over the signals. The reference
is ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence

from .._exceptions import AMQPBatchError
from .._version import __version__
from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CLIError,
    OneLineParser,
    configure_logging,
    describe,
    report,
)
from ._demo import add_demo_arguments, demo_command
from ._dlq import add_dlq_arguments, dlq_command
from ._reload import add_reload_arguments, reload_command
from ._run import add_run_arguments, configure_run_logging, run_command
from ._supervisor import add_supervisor_arguments, supervise_command

__all__ = ["main", "parser"]

_RUN_DESCRIPTION = """\
Consume a RabbitMQ queue with a handler or a consumer class until SIGINT or
SIGTERM, which drain gracefully: no new deliveries, the batches in the handler
finish and are settled, prefetched messages go back to the queue (bounded by
--shutdown-timeout; a second signal stops at once).

TARGET is a handler (an async generator yielding one MessageResult per message,
or an async function returning a sequence of them) or a BatchConsumer / Consumer
subclass, which is instantiated with the settings.

Settings: a flag wins over the AMQP_BATCH_<FIELD> environment variable, which wins
over the same key in the .env file, which wins over the default. Before consuming,
the command connects once: if no broker answers or the login is refused, it exits
with status 2.

Logs go to stderr: one line per worker state change and a summary every
--summary-interval seconds (--log-format json: one JSON object per line).
Passwords in URLs are never logged. --http-port serves /metrics, /healthz and
/readyz.
"""

_RUN_EPILOG = """\
examples:
  amqp-batch run myapp.handlers:handle --queue orders --batch-size 100
  AMQP_BATCH_URL=amqp://app:secret@rabbit/ amqp-batch run myapp:Ingest -q orders
  amqp-batch run ./handlers.py:handle -q orders --dead-letter-exchange orders.dlx
  amqp-batch run myapp:handle -q orders --check      # show settings, connect, exit
  amqp-batch run myapp:handle -q orders --http-port 9464 --log-format json
"""

_DEMO_DESCRIPTION = """\
Declare a demo queue with a dead-letter exchange and queue, publish sample
messages (every 10th is NACKed, every other 7th REQUEUEd until its retries run
out, the rest ACKed), consume them in batches of 100, and print the counts per
result and in the dead-letter queue. Uses --url or AMQP_BATCH_URL (default
localhost); when no RabbitMQ answers there it says so and runs the same demo on
the in-memory broker. A progress bar on a terminal; otherwise one progress line
per quarter.
"""


def _add_common(parser: argparse.ArgumentParser, *, log_level: str) -> None:
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="event loop to run on (trio needs the trio package) [default asyncio]",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=log_level,
        help=f"log level on stderr [default {log_level}]",
    )


def parser() -> argparse.ArgumentParser:
    """The ``amqp-batch`` argument parser."""
    top = OneLineParser(
        prog="amqp-batch",
        description="RabbitMQ batch consumer for anyio (asyncio and trio).",
        epilog="'amqp-batch COMMAND --help' describes each command.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="consume a queue with a handler or consumer class",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run)
    add_supervisor_arguments(run)
    add_reload_arguments(run)
    _add_common(run, log_level="INFO")
    demo = commands.add_parser(
        "demo",
        help="publish sample messages and consume them in batches",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(demo)
    _add_common(demo, log_level="WARNING")
    dlq = commands.add_parser(
        "dlq",
        help="inspect, replay or purge a dead-letter queue",
        description="Inspect, replay or purge a dead-letter queue; nothing is lost "
        "or reordered (see 'amqp-batch dlq ACTION --help').",
    )
    add_dlq_arguments(dlq, lambda sub: _add_common(sub, log_level="WARNING"))
    return top


def _check_backend(backend: str) -> None:
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        raise CLIError("--backend trio needs trio: pip install 'amqp-batch[trio]'")


def _check_monitoring(args: argparse.Namespace) -> None:
    if args.http_port is not None and args.processes is not None:
        raise CLIError(
            "--http-port and --processes: the processes cannot share one port "
            "(their metrics would be scraped at random); run one process per "
            "container or pod and scale with replicas"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``amqp-batch`` console script; the exit code."""
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(args.log_level)
    prog = f"amqp-batch {args.command}"
    try:
        _check_backend(args.backend)
        if args.command == "run":
            _check_monitoring(args)
            configure_run_logging(args)
        if args.command == "run" and args.reload:
            return reload_command(args)
        if args.command == "run" and args.processes is not None:
            return supervise_command(args)
        if args.command == "run":
            return run_command(args)
        if args.command == "dlq":
            return dlq_command(args, interactive=sys.stdout.isatty())
        return demo_command(args, interactive=sys.stdout.isatty())
    except CLIError as exc:
        report(str(exc), prog=prog)
        return exc.exit_code
    except AMQPBatchError as exc:
        report(describe(exc), prog=prog)
        return EXIT_USAGE
    except KeyboardInterrupt:
        report("interrupted", prog=prog)
        return EXIT_INTERRUPTED
    except Exception:
        logging.getLogger("amqp_batch.cli").exception("%s failed", prog)
        return EXIT_FAILED
