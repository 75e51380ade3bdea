"""Consumer settings: aio-pika-batch's field names and defaults, as attrs classes.

Every field is validated when the object is built; a message names the field. The
``repr`` never shows a password. :meth:`ConsumerSettings.from_env` reads the
fields from environment variables (and optionally a ``.env`` file), typed.
"""

from __future__ import annotations

import json
import math
import os
import re
import ssl
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import attrs

from ._results import MessageResult
from ._transport._url import ConnectionParameters, parse_url

__all__ = ["BatchConsumerSettings", "ConsumerSettings", "DeadLetterStrategy"]

_S = TypeVar("_S", bound="ConsumerSettings")
_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})
_PASSWORD = re.compile(r"(?P<head>^[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/]*:)[^@/]*(?=@)")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
#: How a NACKed or exhausted message reaches the dead-letter exchange.
DeadLetterStrategy = Literal["publish", "broker"]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return _PASSWORD.sub(r"\g<head>***", url)


def _redact_repr(url: str) -> str:
    return repr(redact_url(url))


def _redact_urls_repr(urls: tuple[str, ...]) -> str:
    return repr(tuple(redact_url(url) for url in urls))


def _context_repr(context: ssl.SSLContext | None) -> str:
    return "None" if context is None else "<ssl.SSLContext>"


def _check_url(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        parse_url(value)
    except (TypeError, ValueError) as exc:
        # parse_url's messages never contain the password.
        raise ValueError(f"{attribute.name}: {exc}") from None


def _check_urls(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    for url in value:
        _check_url(instance, attribute, url)


def _at_least(minimum: float) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{attribute.name} must be a number, not {type(value).__name__}"
            )
        if value < minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, got {value!r}")

    return check


def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _at_least(float("-inf"))(instance, attribute, value)
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_empty(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string")


def _exchange_type(
    instance: object, attribute: attrs.Attribute[Any], value: str
) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, not {type(value).__name__}")
    if value not in _EXCHANGE_TYPES and not value.startswith("x-"):
        raise ValueError(
            f"{attribute.name} must be one of {sorted(_EXCHANGE_TYPES)} "
            f"or a plugin type starting with 'x-', got {value!r}"
        )


_QUEUE_TYPES = frozenset({"classic", "quorum"})


def _queue_type(
    instance: object, attribute: attrs.Attribute[Any], value: str | None
) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, not {type(value).__name__}")
    if value == "stream":
        raise ValueError(
            "queue_type 'stream' is not supported: a stream has no per-message "
            "acknowledgement or dead-lettering (see the design notes)"
        )
    if value not in _QUEUE_TYPES:
        raise ValueError(
            f"{attribute.name} must be one of {sorted(_QUEUE_TYPES)}, got {value!r}"
        )


def _to_result(value: MessageResult | str) -> MessageResult:
    if isinstance(value, MessageResult):
        return value
    try:
        return MessageResult(str(value).lower())
    except ValueError:
        try:
            return MessageResult[str(value).upper()]
        except KeyError:
            raise ValueError(
                f"unhandled_exception_action must be one of "
                f"{[r.name for r in MessageResult]}, got {value!r}"
            ) from None


def _to_urls(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"failover_urls must be a str or a sequence of str, "
            f"not {type(value).__name__}"
        )
    return tuple(value)


def _to_arguments(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"queue_arguments must be a mapping, not {type(value).__name__}"
        )
    return types.MappingProxyType(dict(value))


def _to_delays(value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"retry_delays must be a sequence of seconds, not {type(value).__name__}"
        )
    return tuple(value)


def _to_key(value: Any) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    return value  # type: ignore[no-any-return]


def _key_repr(value: bytes | None) -> str:
    return "None" if value is None else "'***'"


def _check_delays(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[float, ...]
) -> None:
    for delay in value:
        _check_value(attribute.name, float, delay)
        if not _MIN_DELAY <= delay <= _MAX_DELAY:
            raise ValueError(
                f"{attribute.name}: every delay must be within {_MIN_DELAY}.."
                f"{_MAX_DELAY} seconds (RabbitMQ's x-message-ttl), got {delay!r}"
            )


def _share(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _positive(instance, attribute, value)
    if value > 1:
        raise ValueError(f"{attribute.name} must be a share in (0, 1], got {value!r}")


def _signing_key(
    instance: object, attribute: attrs.Attribute[Any], value: bytes | None
) -> None:
    if value is not None and (not isinstance(value, bytes) or len(value) < 16):
        # Never show the value: it is a secret.
        raise ValueError(f"{attribute.name} must be at least 16 bytes (or None)")


_MIN_DELAY = 0.001
_MAX_DELAY = (2**32 - 1) / 1000
_HINTS: dict[type, dict[str, Any]] = {}


def _type_error(name: str, expected: str, value: Any) -> TypeError:
    shown = f" ({value!r})" if isinstance(value, (int, float)) else ""
    return TypeError(f"{name} must be {expected}, not {type(value).__name__}{shown}")


def _check_value(name: str, hint: Any, value: Any) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``value`` fits ``hint``.

    Integers are strict (``10.5`` and ``True`` are refused); a float field takes
    an int but never a bool or NaN.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [arg for arg in args if arg is not type(None)]
        for option in options[1:]:
            try:
                _check_value(name, option, value)
            except TypeError:
                continue
            return
        _check_value(name, options[0], value)
    elif origin is Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, tuple):
            raise _type_error(name, "a tuple", value)
        for item in value:
            _check_value(name, args[0], item)
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, "an integer", value)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, "a number", value)
        if math.isnan(value):
            raise ValueError(f"{name} must be a number, got NaN")
    elif hint is not Any and not isinstance(value, origin or hint):
        raise _type_error(name, f"a {getattr(hint, '__name__', hint)}", value)


def _check_types(settings: ConsumerSettings) -> None:
    cls = type(settings)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        _check_value(field.name, hints[field.name], getattr(settings, field.name))


@attrs.frozen(kw_only=True)
class ConsumerSettings:
    """Settings of a consumer (single-message or batch).

    The first group of fields and their defaults are aio-pika-batch's. The rest are
    amqp-batch's own: shutdown, heartbeat, reconnection, dead-lettering, failover
    and TLS.
    """

    #: The queue to consume (declared on every session). Required.
    queue_name: str = attrs.field(validator=_non_empty)
    #: Broker URL, ``amqp://`` or ``amqps://`` (see :func:`~amqp_batch.parse_url`).
    url: str = attrs.field(
        default="amqp://guest:guest@localhost:5672/",
        validator=_check_url,
        repr=_redact_repr,
    )
    #: Unacknowledged deliveries each worker may hold (``basic.qos``).
    prefetch_count: int = attrs.field(default=10, validator=_at_least(1))
    #: An exchange to declare and bind the queue to (``None``: consume the queue
    #: only, e.g. fed through the default exchange).
    exchange_name: str | None = None
    #: ``direct``, ``fanout``, ``topic``, ``headers`` or a plugin type ``x-...``.
    exchange_type: str = attrs.field(default="direct", validator=_exchange_type)
    #: Binding key; ``None`` binds with the queue's name.
    routing_key: str | None = None
    queue_durable: bool = True
    exchange_durable: bool = True
    #: ``classic`` or ``quorum`` (RabbitMQ's replicated queue, for data safety):
    #: declares the work queue, its delay queues and the library's dead-letter
    #: queue with this ``x-queue-type``. ``None`` leaves the type to
    #: ``queue_arguments`` or the broker's default.
    queue_type: str | None = attrs.field(default=None, validator=_queue_type)
    #: Queue arguments (``x-dead-letter-exchange``, ``x-queue-type``, ...).
    queue_arguments: Mapping[str, Any] | None = attrs.field(
        default=None, converter=_to_arguments, eq=False
    )
    #: Workers, each with its own connection, channel and consumer.
    num_workers: int = attrs.field(default=1, validator=_at_least(1))
    #: REQUEUEs before a message is dead-lettered instead (it is handled
    #: ``max_requeue_attempts + 1`` times in all).
    max_requeue_attempts: int = attrs.field(default=3, validator=_at_least(0))
    #: Result for the messages a handler left without one (it raised, stopped
    #: early or yielded a non-result). A :class:`MessageResult` or its name.
    unhandled_exception_action: MessageResult = attrs.field(
        default=MessageResult.REQUEUE, converter=_to_result
    )

    #: Seconds a graceful stop may take before in-flight handlers are cancelled
    #: (their messages then go back to the queue, never acked).
    shutdown_timeout: float = attrs.field(default=30.0, validator=_at_least(0))
    #: Heartbeat in seconds (0 disables); ``None`` keeps the URL's (default 60).
    heartbeat: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_at_least(0)),
    )
    #: Reconnect backoff: sleep uniform(0, min(cap, base * 2**attempt)).
    reconnect_backoff_base: float = attrs.field(default=0.5, validator=_positive)
    #: Upper bound of one reconnect backoff sleep, in seconds.
    reconnect_backoff_cap: float = attrs.field(default=30.0, validator=_positive)
    #: Dead-letter exchange: declared, set as the queue's ``x-dead-letter-exchange``
    #: and used by the library to dead-letter republished copies under their
    #: original routing key.
    dead_letter_exchange: str | None = None
    #: Type of ``dead_letter_exchange`` when the library declares it.
    dead_letter_exchange_type: str = attrs.field(
        default="topic", validator=_exchange_type
    )
    #: Declared and bound to the dead-letter exchange (``#`` for topic, all keys).
    dead_letter_queue: str | None = None
    #: More broker URLs (other nodes of a cluster, or a standby broker); see
    #: ``url_order`` for which one a worker uses.
    failover_urls: tuple[str, ...] = attrs.field(
        default=(), converter=_to_urls, validator=_check_urls, repr=_redact_urls_repr
    )
    #: Which URL a worker connects to first: ``primary`` (every worker starts on
    #: ``url`` and fails over in list order) or ``spread`` (worker *i* starts on
    #: URL *i* mod *n*, to spread the workers over the nodes on purpose). Either
    #: way a URL where a session failed to start in the last
    #: ``reconnect_backoff_cap`` seconds is skipped while another one has not.
    url_order: str = attrs.field(
        default="primary", validator=attrs.validators.in_(("primary", "spread"))
    )
    #: TLS context for ``amqps://`` URLs (default: verify against system CAs).
    ssl_context: ssl.SSLContext | None = attrs.field(
        default=None, repr=_context_repr, eq=False
    )
    #: Prefix of the connection names the broker shows (``-w0``, ``-w0-publisher``…).
    connection_name: str | None = None
    #: Routing key dead letters get (``x-dead-letter-routing-key`` on the queue).
    #: ``None``: they keep their original key, except with a ``direct``
    #: ``dead_letter_exchange`` and a ``dead_letter_queue``, where it defaults
    #: to the dead-letter queue's name so that the queue receives every one.
    dead_letter_routing_key: str | None = None
    #: ``"publish"``: the library dead-letters by publishing to the DLX with a
    #: confirm, then acks (crash-safe; needs the DLX in the settings or queue
    #: arguments, otherwise it falls back to ``"broker"``). ``"broker"``:
    #: ``basic.reject`` and the broker dead-letters (at-most-once on a crash).
    dead_letter_strategy: DeadLetterStrategy = "publish"

    #: Seconds a REQUEUEd copy waits before it is handled again, one per attempt;
    #: the last repeats up to ``max_requeue_attempts``. ``()``: no delay (the copy
    #: goes straight to the back of the queue). Each distinct delay is a delay
    #: queue ``<queue>.retry.<delay>`` (see the retries how-to).
    retry_delays: tuple[float, ...] = attrs.field(
        default=(), converter=_to_delays, validator=_check_delays
    )
    #: Exponential back-off instead of ``retry_delays``: attempt ``n`` (from 1)
    #: waits ``min(retry_backoff_cap, retry_backoff_base * 2 ** (n - 1))``.
    retry_backoff_base: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    #: Upper bound of one back-off delay, in seconds.
    retry_backoff_cap: float = attrs.field(default=3600.0, validator=_positive)
    #: Key for the HMAC that signs the ``x-original-*`` headers of the copies the
    #: library makes (at least 16 bytes; ``str`` is UTF-8 encoded). Every
    #: consumer of a queue must share it. ``None``: unsigned copies are trusted
    #: only by shape, as before.
    header_signing_key: bytes | None = attrs.field(
        default=None,
        converter=_to_key,
        validator=_signing_key,
        repr=_key_repr,
        eq=False,
    )

    #: Kill switch: stop taking deliveries when at least this share of the
    #: results in ``kill_switch_window`` failed (REQUEUE, REQUEUE_IMMEDIATE or a
    #: handler error). ``None``: off.
    kill_switch_threshold: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_share)
    )
    #: Seconds of results the kill switch looks at.
    kill_switch_window: float = attrs.field(default=30.0, validator=_positive)
    #: Results needed in the window before the kill switch may trip.
    kill_switch_min_samples: int = attrs.field(default=20, validator=_at_least(1))
    #: Seconds the kill switch stays open before a probe batch is let through.
    kill_switch_cooldown: float = attrs.field(default=30.0, validator=_positive)

    #: Seconds one handler call may take; past it the handler is cancelled and
    #: its unsettled messages get ``unhandled_exception_action``. ``None``: no
    #: limit.
    handler_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    #: The broker's ``consumer_timeout`` in seconds (RabbitMQ's default is
    #: 1800), to warn at start when a batch could outlive it. ``None``: no check.
    broker_consumer_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    #: Messages per second handed to the handler, shared by all workers of the
    #: consumer (a token bucket). ``None``: no limit.
    max_messages_per_second: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )

    def __attrs_post_init__(self) -> None:
        _check_types(self)
        self._check_retry()
        self._check_dead_lettering()
        self._check_queue_type()
        if self.reconnect_backoff_cap < self.reconnect_backoff_base:
            raise ValueError(
                "reconnect_backoff_cap must be >= reconnect_backoff_base, got "
                f"{self.reconnect_backoff_cap!r} < {self.reconnect_backoff_base!r}"
            )

    def _check_queue_type(self) -> None:
        if self.queue_type is None:
            return
        argument = (self.queue_arguments or {}).get("x-queue-type")
        if argument is not None and argument != self.queue_type:
            raise ValueError(
                f"queue_type {self.queue_type!r} differs from x-queue-type "
                f"{argument!r} in queue_arguments; set it in one place"
            )
        if self.queue_type == "quorum" and not self.queue_durable:
            raise ValueError("queue_type 'quorum' needs queue_durable=True")

    @property
    def work_queue_arguments(self) -> Mapping[str, Any]:
        """``queue_arguments`` with ``x-queue-type`` from :attr:`queue_type`."""
        arguments = dict(self.queue_arguments or {})
        if self.queue_type is not None:
            arguments.setdefault("x-queue-type", self.queue_type)
        return arguments

    def _check_retry(self) -> None:
        if self.retry_delays and self.retry_backoff_base is not None:
            raise ValueError(
                "retry_delays and retry_backoff_base: give one of them, not both"
            )
        if self.retry_backoff_base is not None and (
            self.retry_backoff_cap < self.retry_backoff_base
        ):
            raise ValueError(
                "retry_backoff_cap must be >= retry_backoff_base, got "
                f"{self.retry_backoff_cap!r} < {self.retry_backoff_base!r}"
            )
        for delay in self.retry_delay_schedule:
            if delay > _MAX_DELAY:
                raise ValueError(f"retry_backoff_cap: {delay} s is too long")

    def _check_dead_lettering(self) -> None:
        if self.dead_letter_queue and not self.dead_letter_exchange:
            raise ValueError("dead_letter_queue needs dead_letter_exchange")
        argument = (self.queue_arguments or {}).get("x-dead-letter-routing-key")
        if (
            self.dead_letter_routing_key is not None
            and argument is not None
            and argument != self.dead_letter_routing_key
        ):
            raise ValueError(
                "dead_letter_routing_key differs from x-dead-letter-routing-key "
                "in queue_arguments; set it in one place"
            )
        if (
            self.dead_letter_queue
            and self.dead_letter_exchange_type.startswith("x-")
            and self.effective_dead_letter_routing_key is None
        ):
            raise ValueError(
                "dead_letter_queue: the library cannot bind a queue to a plugin "
                f"exchange type ({self.dead_letter_exchange_type}) so that it "
                "receives every dead letter; set dead_letter_routing_key, or "
                "declare the binding yourself and leave dead_letter_queue unset"
            )

    @property
    def retry_delay_schedule(self) -> tuple[float, ...]:
        """The delay of each attempt (``retry_delays``, or the back-off's, one
        per attempt up to ``max_requeue_attempts``); ``()``: no delay."""
        if self.retry_delays:
            return self.retry_delays
        base = self.retry_backoff_base
        if base is None:
            return ()
        attempts = max(1, self.max_requeue_attempts)
        return tuple(
            min(self.retry_backoff_cap, base * 2 ** min(n, 64)) for n in range(attempts)
        )

    @property
    def effective_dead_letter_routing_key(self) -> str | None:
        """The ``x-dead-letter-routing-key`` the queue gets (``None``: dead letters
        keep their original routing key)."""
        if self.dead_letter_routing_key is not None:
            return self.dead_letter_routing_key
        argument = (self.queue_arguments or {}).get("x-dead-letter-routing-key")
        if isinstance(argument, str):
            return argument
        if self.dead_letter_queue and self.dead_letter_exchange_type == "direct":
            # A direct DLX routes by exact key: without one fixed key the
            # dead-letter queue would receive none of them.
            return self.dead_letter_queue
        return None

    @property
    def dead_letter_binding_key(self) -> str:
        """The key ``dead_letter_queue`` is bound to the DLX with, chosen so that
        it receives every dead letter, whatever the exchange type."""
        fixed = self.effective_dead_letter_routing_key
        if self.dead_letter_exchange_type == "topic":
            return "#"
        if self.dead_letter_exchange_type in ("fanout", "headers"):
            # fanout ignores the key; a headers binding without arguments
            # matches every message.
            return ""
        assert fixed is not None  # direct: derived above; x-: checked
        return fixed

    def timing_warnings(self) -> list[str]:
        """What in these settings cannot fit inside ``broker_consumer_timeout``
        (logged as warnings when the consumer starts); empty when it all fits."""
        limit = self.broker_consumer_timeout
        if limit is None:
            return []
        found: list[str] = []
        batch_timeout = getattr(self, "batch_timeout", 0.0)
        if self.handler_timeout is not None:
            longest = batch_timeout + self.handler_timeout
            if longest >= limit:
                found.append(
                    f"batch_timeout + handler_timeout ({longest:g} s) does not fit "
                    f"inside broker_consumer_timeout ({limit:g} s): the broker "
                    "would close the channel under a slow batch"
                )
        if self.shutdown_timeout >= limit:
            found.append(
                f"shutdown_timeout ({self.shutdown_timeout:g} s) does not fit "
                f"inside broker_consumer_timeout ({limit:g} s)"
            )
        return found

    @property
    def urls(self) -> tuple[str, ...]:
        """``url`` followed by ``failover_urls``."""
        return (self.url, *self.failover_urls)

    def connection_parameters(self, index: int = 0) -> ConnectionParameters:
        """Parameters for the ``index``-th URL (rotating through :attr:`urls`)."""
        urls = self.urls
        params = parse_url(urls[index % len(urls)], ssl_context=self.ssl_context)
        if self.heartbeat is not None:
            params = attrs.evolve(params, heartbeat=self.heartbeat)
        return params

    @classmethod
    def from_env(
        cls: type[_S],
        prefix: str = "AMQP_BATCH_",
        *,
        env_file: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> _S:
        """Build settings from ``{prefix}{FIELD}`` environment variables.

        Values are converted to the field's type: integers, floats, booleans
        (``1/true/yes/on`` and ``0/false/no/off``), ``queue_arguments`` as a JSON
        object, ``failover_urls`` as a comma-separated list or JSON array,
        ``unhandled_exception_action`` by name. ``env_file`` (a ``.env`` file of
        ``KEY=VALUE`` lines) is read first; the environment wins over it and
        ``overrides`` win over both. A bad value raises :class:`ValueError` naming
        the variable.
        """
        values: dict[str, str] = {}
        if env_file is not None and os.path.exists(env_file):
            values.update(_read_env_file(env_file))
        values.update(os.environ if environ is None else environ)
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for field in attrs.fields(cls):
            name = f"{prefix}{field.name.upper()}"
            if (
                field.name in overrides
                or name not in values
                or field.name == ("ssl_context")
            ):
                continue
            try:
                kwargs[field.name] = _convert(values[name], hints[field.name])
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        from_environment = set(kwargs)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            # Validation messages start with the field's name; name the variable
            # too when the value came from the environment.
            text = str(exc)
            for field_name in from_environment:
                if text.startswith((f"{field_name}:", f"{field_name} ")):
                    variable = f"{prefix}{field_name.upper()}"
                    raise type(exc)(f"{variable}: {text}") from None
            raise


def _read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for raw_line in file:
            line = raw_line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.removeprefix("export ").partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip()] = value
    return values


def _convert(text: str, hint: Any) -> Any:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if optional and text == "":
        return None
    target = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(target)
    if target is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if target is int:
        return int(text)
    if target is float:
        return float(text)
    if target is MessageResult:
        return _to_result(text)
    if origin is tuple:
        stripped = text.strip()
        if stripped.startswith("["):
            items = tuple(json.loads(stripped))
        else:
            items = tuple(p.strip() for p in stripped.split(",") if p.strip())
        if typing.get_args(target)[0] is float:
            return tuple(float(item) for item in items)
        return items
    if origin is Mapping or target is Mapping:
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError("expected a JSON object")
        return loaded
    return text


@attrs.frozen(kw_only=True)
class BatchConsumerSettings(ConsumerSettings):
    """Settings of a batch consumer: :class:`ConsumerSettings` plus batching."""

    #: Flush a batch once it holds this many messages.
    batch_size: int = attrs.field(default=10, validator=_at_least(1))
    #: Flush a batch this many seconds after its first message arrived.
    batch_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: Batches of one worker that may be in the handler at once.
    max_concurrent_batches: int = attrs.field(default=1, validator=_at_least(1))
    #: Upper bound of a batch's bodies in bytes (``None``: no limit). A batch
    #: never exceeds it, except a single message that alone is larger: that
    #: one is a batch of its own.
    max_batch_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_at_least(1))
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.prefetch_count < self.batch_size:
            raise ValueError(
                f"prefetch_count ({self.prefetch_count}) must be >= batch_size "
                f"({self.batch_size}), or a batch could never fill"
            )
