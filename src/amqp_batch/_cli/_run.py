"""``amqp-batch run MODULE:TARGET``: consume a queue with a handler or a consumer
class, settings from flags, the environment and a ``.env`` file."""

from __future__ import annotations

import argparse
import enum
import json
import logging
import logging.config
import os
import ssl
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from .._consumer import BatchConsumer, _FunctionConsumer
from .._exceptions import AMQPBatchError, TransportError, first_library_error
from .._hooks import BatchInfo, ConsumerHooks
from .._logging import configure_json_logging, log_context
from .._settings import BatchConsumerSettings, _read_env_file
from .._transport._native import NativeTransport
from .._version import __version__
from .._worker import WorkerHealth, WorkerState
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    Option,
    add_options,
    describe,
    option,
)
from ._lifeline import take_lifeline, watch_lifeline
from ._target import Target, load_target

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from ..prometheus import PrometheusHooks

__all__ = ["ENV_PREFIX", "add_run_arguments", "run_command"]

logger = logging.getLogger("amqp_batch.cli")

#: Prefix of the environment variables (and ``.env`` keys) ``run`` reads.
ENV_PREFIX = "AMQP_BATCH_"
#: Result counts the summary shows, in this order (``WorkerHealth.results`` keys).
RESULT_KEYS = ("ack", "nack", "requeue", "requeue_immediate", "dead_lettered")

_FIELDS = {field.name: field for field in attrs.fields(BatchConsumerSettings)}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _default_text(field: str) -> str:
    default = _FIELDS[field].default
    if default is attrs.NOTHING:
        return "required"
    if default is None or default == ():
        return "default none"
    if isinstance(default, bool):
        return f"default {str(default).lower()}"
    if isinstance(default, enum.Enum):
        return f"default {default.value}"
    return f"default {default}"


def _setting(*flags: str, field: str, help: str, **options: Any) -> Option:
    """A flag for settings field ``field``: absent from the namespace unless given,
    so the environment and ``.env`` apply when it is not."""
    env = f"{ENV_PREFIX}{field.upper()}"
    return option(
        *flags,
        dest=field,
        default=argparse.SUPPRESS,
        help=f"{help} [env {env}; {_default_text(field)}]",
        **options,
    )


#: ``run``'s options, by argument group, in the order ``--help`` lists them.
_BROKER = (
    _setting(
        "--url",
        field="url",
        metavar="URL",
        help="broker URL, amqp:// or amqps:// (the password is never logged)",
    ),
    _setting(
        "--failover-url",
        field="failover_urls",
        metavar="URL",
        action="append",
        help="another broker URL; reconnects rotate through them (repeatable; the "
        "environment variable takes a comma-separated list)",
    ),
    _setting(
        "--heartbeat",
        field="heartbeat",
        type=int,
        metavar="SECONDS",
        help="AMQP heartbeat, 0 disables (none: the URL's, default 60)",
    ),
    _setting(
        "--connection-name",
        field="connection_name",
        metavar="NAME",
        help="prefix of the connection names the broker shows",
    ),
    option(
        "--ca-file",
        metavar="PATH",
        help="CA bundle (PEM) to verify an amqps:// broker with, instead of the "
        "system's CAs",
    ),
)
_TOPOLOGY = (
    _setting(
        "-q",
        "--queue",
        field="queue_name",
        metavar="NAME",
        help="the queue to consume (here, in the environment or in .env)",
    ),
    _setting(
        "--exchange",
        field="exchange_name",
        metavar="NAME",
        help="an exchange to declare and bind the queue to",
    ),
    _setting(
        "--exchange-type",
        field="exchange_type",
        metavar="TYPE",
        help="direct, fanout, topic, headers or a plugin's x-... type",
    ),
    _setting(
        "--routing-key",
        field="routing_key",
        metavar="KEY",
        help="binding key of the queue to --exchange (none: the queue's name)",
    ),
    _setting(
        "--queue-durable",
        field="queue_durable",
        action=argparse.BooleanOptionalAction,
        help="declare the queues durable",
    ),
    _setting(
        "--exchange-durable",
        field="exchange_durable",
        action=argparse.BooleanOptionalAction,
        help="declare the exchanges durable",
    ),
    _setting(
        "--queue-arguments",
        field="queue_arguments",
        type=_json_object,
        metavar="JSON",
        help='queue arguments as a JSON object, e.g. \'{"x-queue-type": "quorum"}\'',
    ),
    _setting(
        "--queue-type",
        field="queue_type",
        choices=["classic", "quorum"],
        help="declare the queues as classic or quorum queues",
    ),
    _setting(
        "--dead-letter-exchange",
        field="dead_letter_exchange",
        metavar="NAME",
        help="declared and set as the queue's dead-letter exchange; NACKed and "
        "exhausted messages go there under their original routing key",
    ),
    _setting(
        "--dead-letter-exchange-type",
        field="dead_letter_exchange_type",
        metavar="TYPE",
        help="type of --dead-letter-exchange",
    ),
    _setting(
        "--dead-letter-queue",
        field="dead_letter_queue",
        metavar="NAME",
        help="a queue declared and bound to --dead-letter-exchange (all keys)",
    ),
)
_BATCHING = (
    _setting(
        "-b",
        "--batch-size",
        field="batch_size",
        type=int,
        metavar="N",
        help="hand a batch to the handler once it holds N messages",
    ),
    _setting(
        "-t",
        "--batch-timeout",
        field="batch_timeout",
        type=float,
        metavar="SECONDS",
        help="... or this long after its first message arrived",
    ),
    _setting(
        "--max-batch-bytes",
        field="max_batch_bytes",
        type=int,
        metavar="N",
        help="... or once its bodies add up to N bytes",
    ),
    _setting(
        "-p",
        "--prefetch",
        field="prefetch_count",
        type=int,
        metavar="N",
        help="unacknowledged messages per worker (at least --batch-size)",
    ),
    _setting(
        "-w",
        "--workers",
        field="num_workers",
        type=int,
        metavar="N",
        help="connections in this process, each a worker consuming the queue "
        "(--processes N runs N OS processes, each with this many)",
    ),
    _setting(
        "--max-concurrent-batches",
        field="max_concurrent_batches",
        type=int,
        metavar="N",
        help="batches of one worker in the handler at once",
    ),
)
_RESULTS = (
    _setting(
        "--max-retries",
        field="max_requeue_attempts",
        type=int,
        metavar="N",
        help="REQUEUEs of a message before it is dead-lettered",
    ),
    _setting(
        "--unhandled-exception-action",
        field="unhandled_exception_action",
        choices=("ack", "nack", "requeue", "requeue_immediate"),
        help="result for the messages of a batch whose handler raised",
    ),
    _setting(
        "--shutdown-timeout",
        field="shutdown_timeout",
        type=float,
        metavar="SECONDS",
        help="how long a graceful stop may take before the handler is cancelled "
        "(its unsettled messages go back to the queue)",
    ),
    _setting(
        "--backoff-base",
        field="reconnect_backoff_base",
        type=float,
        metavar="SECONDS",
        help="reconnect backoff: first ceiling, doubled per failure",
    ),
    _setting(
        "--backoff-cap",
        field="reconnect_backoff_cap",
        type=float,
        metavar="SECONDS",
        help="reconnect backoff: largest ceiling",
    ),
)
#: The HTTP server and the log format.
_MONITORING = (
    option(
        "--http-port",
        type=int,
        metavar="PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on this port "
        "(needs amqp-batch[prometheus]) [default: no server]",
    ),
    option(
        "--http-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the --http-port server binds; 0.0.0.0 for a container "
        "[default 127.0.0.1]",
    ),
    option(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line with the queue, worker and "
        "other fields [default text]",
    ),
    option(
        "--log-config",
        metavar="FILE",
        help="a JSON file with a logging.config.dictConfig dictionary; replaces "
        "--log-level and --log-format",
    ),
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand's arguments."""
    parser.add_argument(
        "target",
        metavar="MODULE:TARGET",
        help=(
            "what consumes: a handler (an async generator yielding one "
            "MessageResult per message, or an async function returning them) or a "
            "BatchConsumer / Consumer subclass, as module:name (the current "
            "directory is importable) or path/to/file.py:name"
        ),
    )
    add_options(parser, "broker", _BROKER)
    add_options(parser, "queue and exchanges (declared on start)", _TOPOLOGY)
    add_options(parser, "batching and workers", _BATCHING)
    add_options(parser, "results, retries and shutdown", _RESULTS)
    _command_arguments(parser)


def _command_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.add_argument_group("this command")
    env_file = command.add_mutually_exclusive_group()
    env_file.add_argument(
        "--env-file",
        metavar="PATH",
        help="read AMQP_BATCH_* settings from this file of KEY=VALUE lines "
        "(default: .env in the current directory, if there is one)",
    )
    env_file.add_argument(
        "--no-env-file", action="store_true", help="do not read any .env file"
    )
    command.add_argument(
        "--summary-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="log a summary (batches, results per kind, reconnects) this often; "
        "0 only at the end [default 30]",
    )
    add_options(parser, "monitoring", _MONITORING)
    command.add_argument(
        "--check",
        action="store_true",
        help="load the target, resolve the settings and connect once; print the "
        "settings and exit without consuming",
    )


# -- settings -------------------------------------------------------------------------


def _env_file(args: argparse.Namespace) -> Path | None:
    if args.no_env_file:
        return None
    if args.env_file is not None:
        path = Path(args.env_file)
        if not path.is_file():
            raise CLIError(f"--env-file {args.env_file!r}: no such file")
        return path
    default = Path(".env")
    return default if default.is_file() else None


def build_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> BatchConsumerSettings:
    """Settings from the flags given in ``args``, then ``AMQP_BATCH_*`` variables
    in ``environ`` (default ``os.environ``), then the ``.env`` file, then the
    defaults: the first that sets a field wins."""
    environ = os.environ if environ is None else environ
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _FIELDS if hasattr(args, name)
    }
    if "failover_urls" in overrides:
        overrides["failover_urls"] = tuple(overrides["failover_urls"])
    if args.ca_file is not None:
        try:
            overrides["ssl_context"] = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise CLIError(f"--ca-file {args.ca_file!r}: {describe(exc)}") from None
    env_file = _env_file(args)
    if "queue_name" not in overrides:
        seen = dict(_read_env_file(env_file)) if env_file is not None else {}
        seen.update(environ)
        if not seen.get(f"{ENV_PREFIX}QUEUE_NAME"):
            raise CLIError(
                f"no queue to consume: pass --queue NAME or set "
                f"{ENV_PREFIX}QUEUE_NAME (environment or .env)"
            )
    try:
        return BatchConsumerSettings.from_env(
            ENV_PREFIX, env_file=env_file, environ=environ, **overrides
        )
    except (ValueError, TypeError) as exc:
        raise CLIError(f"invalid settings: {exc}") from None


def settings_lines(settings: BatchConsumerSettings) -> list[str]:
    """``name = value`` per settings field, passwords redacted."""
    lines = []
    for field in attrs.fields(type(settings)):
        value = getattr(settings, field.name)
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        text = field.repr(value) if callable(field.repr) else repr(value)
        lines.append(f"{field.name} = {text}")
    return lines


# -- observing the consumer -----------------------------------------------------------


class Monitor(ConsumerHooks):
    """Logs worker state changes, counts batches, and writes summaries (a
    consumer hook)."""

    def __init__(self, settings: BatchConsumerSettings) -> None:
        self.settings = settings
        self.batches = 0
        self.seen_consuming = False
        self._started = time.monotonic()

    def worker_state_changed(self, health: WorkerHealth, previous: WorkerState) -> None:
        """One log line per worker state change."""
        state = health.state
        detail = ""
        level = logging.INFO
        if state is WorkerState.CONNECTING:
            detail = f" to {health.url}"
        elif state is WorkerState.CONSUMING:
            self.seen_consuming = True
            detail = f" queue {self.settings.queue_name!r} at {health.url}"
        elif state is WorkerState.BACKING_OFF:
            level = logging.WARNING
            detail = f" (reconnect {health.reconnect_count}; {health.last_error})"
        logger.log(
            level,
            "worker %d: %s -> %s%s",
            health.index,
            previous.value,
            state.value,
            detail,
            extra={"state": state.value, "previous_state": previous.value},
        )

    def batch_started(self, batch: BatchInfo) -> None:
        """Count the batch."""
        self.batches += 1

    def summary(self, consumer: BatchConsumer[Any]) -> str:
        """``batches=… ack=… … reconnects=… consuming=n/N`` for ``consumer``."""
        healths = consumer.health()
        totals: Counter[str] = Counter()
        for health in healths:
            totals.update(health.results)
        consuming = sum(h.state is WorkerState.CONSUMING for h in healths)
        parts = [f"batches={self.batches}"]
        parts += [f"{key}={totals[key]}" for key in RESULT_KEYS]
        parts.append(f"reconnects={sum(h.reconnect_count for h in healths)}")
        parts.append(f"consuming={consuming}/{self.settings.num_workers}")
        return " ".join(parts)

    async def report_every(self, consumer: BatchConsumer[Any], interval: float) -> None:
        """Log a summary every ``interval`` seconds, forever."""
        while True:
            await anyio.sleep(interval)
            logger.info("summary: %s", self.summary(consumer))

    def final(self, consumer: BatchConsumer[Any]) -> None:
        """Log the summary at exit."""
        elapsed = time.monotonic() - self._started
        logger.info("stopped after %.1f s: %s", elapsed, self.summary(consumer))


def make_consumer(
    target: Target, settings: BatchConsumerSettings, hooks: Sequence[ConsumerHooks]
) -> BatchConsumer[Any]:
    """The consumer for ``target``: a handler in a function consumer, or the
    consumer class instantiated with ``settings``; ``hooks`` observe it."""
    if target.handler is not None:
        return _FunctionConsumer(
            settings, target.handler, transport=NativeTransport(), hooks=hooks
        )
    assert target.consumer_class is not None
    try:
        consumer: BatchConsumer[Any] = target.consumer_class(settings)
    except Exception as exc:
        raise CLIError(
            f"target {target.spec!r}: cannot create "
            f"{target.consumer_class.__name__}(settings): {describe(exc)}"
        ) from None
    consumer.add_hooks(*hooks)
    return consumer


# -- running --------------------------------------------------------------------------


async def check_broker(settings: BatchConsumerSettings) -> str:
    """Connect once to the first URL of ``settings`` that answers; its redacted
    URL. :class:`CLIError` if none answers or the broker refuses the login."""
    transport = NativeTransport()
    failures: list[str] = []
    for index in range(len(settings.urls)):
        parameters = attrs.evolve(
            settings.connection_parameters(index), connection_name="amqp-batch-check"
        )
        timeout = parameters.connection_timeout
        deadline = timeout + 5 if timeout else None
        try:
            with anyio.fail_after(deadline):
                async with transport.open_publisher(parameters):
                    pass
        except TransportError as exc:
            if not exc.retryable:  # bad credentials, unknown vhost: final
                raise CLIError(f"{parameters.redacted_url}: {describe(exc)}") from None
            failures.append(describe(exc))
        except TimeoutError:
            failures.append(f"{parameters.redacted_url}: no answer in {deadline} s")
        else:
            return parameters.redacted_url
    raise CLIError(f"no broker answered: {'; '.join(failures)}")


def metrics_hooks(args: argparse.Namespace) -> PrometheusHooks | None:
    """``PrometheusHooks`` on prometheus_client's registry with ``--http-port``."""
    if args.http_port is None:
        return None
    try:
        from ..prometheus import PrometheusHooks
    except ImportError:
        raise CLIError(
            "--http-port needs prometheus-client and h11: "
            "pip install 'amqp-batch[prometheus]'"
        ) from None
    return PrometheusHooks()


async def serve(
    target: Target, settings: BatchConsumerSettings, args: argparse.Namespace
) -> int:
    """Check the broker, then consume until SIGINT/SIGTERM (or print the settings
    with ``--check``); the exit code."""
    lifeline = take_lifeline()
    monitor = Monitor(settings)
    metrics = metrics_hooks(args)
    hooks = [monitor] if metrics is None else [monitor, metrics]
    consumer = make_consumer(target, settings, hooks)
    where = await check_broker(settings)
    if args.check:
        print(f"target: {target.spec} ({target.kind})")
        print(f"broker: {where} answered")
        print("settings:")
        for line in settings_lines(settings):
            print(f"  {line}")
        return EXIT_OK
    with log_context(queue=settings.queue_name):
        logger.info(
            "amqp-batch %s: starting on queue %r at %s with %s (%s), %d worker(s), "
            "batch_size %d, batch_timeout %s s, on %s; SIGINT or SIGTERM stops",
            __version__,
            settings.queue_name,
            where,
            target.spec,
            target.kind,
            settings.num_workers,
            settings.batch_size,
            settings.batch_timeout,
            args.backend,
        )
        return await consume(consumer, monitor, metrics, args, lifeline)


async def consume(
    consumer: BatchConsumer[Any],
    monitor: Monitor,
    metrics: PrometheusHooks | None,
    args: argparse.Namespace,
    lifeline: int | None = None,
) -> int:
    """Run ``consumer`` (and the HTTP server and broker sampler with
    ``metrics``) until it stops, or until the supervisor that started this
    process is gone (``lifeline``); the exit code."""
    try:
        async with anyio.create_task_group() as group:
            if metrics is not None:
                from ..prometheus import serve_http

                await group.start(
                    serve_http,
                    consumer,
                    args.http_host,
                    args.http_port,
                    metrics.registry,
                )
                group.start_soon(metrics.sample_consumer, consumer)
            if args.summary_interval > 0:
                group.start_soon(monitor.report_every, consumer, args.summary_interval)
            if lifeline is not None:
                group.start_soon(watch_lifeline, lifeline, consumer.stop)
            await consumer.run()
            group.cancel_scope.cancel()
    except (Exception, BaseExceptionGroup) as exc:
        error = first_library_error(exc, AMQPBatchError)
        if error is None:
            raise
        monitor.final(consumer)
        raise CLIError(
            describe(error),
            exit_code=EXIT_FAILED if monitor.seen_consuming else EXIT_USAGE,
        ) from None
    monitor.final(consumer)
    return EXIT_OK


def configure_run_logging(args: argparse.Namespace) -> None:
    """``--log-config`` or ``--log-format json`` (``--log-format text`` is what
    the command set up already)."""
    if args.log_config is not None:
        where = f"--log-config {args.log_config!r}"
        try:
            config = json.loads(Path(args.log_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CLIError(f"{where}: {describe(exc)}") from None
        if not isinstance(config, dict):
            raise CLIError(f"{where}: expected a JSON object (a dictConfig dict)")
        config.setdefault("version", 1)
        # The library's loggers exist already (imported): keep them working
        # unless the file says otherwise.
        config.setdefault("disable_existing_loggers", False)
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            raise CLIError(f"{where}: {describe(exc)}") from None
    elif args.log_format == "json":
        configure_json_logging(args.log_level)


def run_command(args: argparse.Namespace) -> int:
    """``amqp-batch run``: the exit code (raises :class:`CLIError`)."""
    target = load_target(args.target)
    settings = build_settings(args)
    code: int = anyio.run(serve, target, settings, args, backend=args.backend)
    return code
