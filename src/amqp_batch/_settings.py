"""Consumer settings: aio-pika-batch's field names and defaults, as attrs classes.

Every field is validated when the object is built; a message names the field. The
``repr`` never shows a password. :meth:`ConsumerSettings.from_env` reads the
fields from environment variables (and optionally a ``.env`` file), typed.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ._results import MessageResult
from ._transport._url import ConnectionParameters, parse_url

__all__ = ["BatchConsumerSettings", "ConsumerSettings"]

_S = TypeVar("_S", bound="ConsumerSettings")
_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})
_PASSWORD = re.compile(r"(?P<head>^[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/]*:)[^@/]*(?=@)")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


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
    if value not in _EXCHANGE_TYPES and not value.startswith("x-"):
        raise ValueError(
            f"{attribute.name} must be one of {sorted(_EXCHANGE_TYPES)} "
            f"or a plugin type starting with 'x-', got {value!r}"
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
    return tuple(value)


def _to_arguments(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else types.MappingProxyType(dict(value))


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
    #: More broker URLs; reconnects rotate through ``url`` and these.
    failover_urls: tuple[str, ...] = attrs.field(
        default=(), converter=_to_urls, validator=_check_urls, repr=_redact_urls_repr
    )
    #: TLS context for ``amqps://`` URLs (default: verify against system CAs).
    ssl_context: ssl.SSLContext | None = attrs.field(
        default=None, repr=_context_repr, eq=False
    )
    #: Prefix of the connection names the broker shows (``-w0``, ``-w0-publisher``…).
    connection_name: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.reconnect_backoff_cap < self.reconnect_backoff_base:
            raise ValueError(
                "reconnect_backoff_cap must be >= reconnect_backoff_base, got "
                f"{self.reconnect_backoff_cap!r} < {self.reconnect_backoff_base!r}"
            )
        if self.dead_letter_queue and not self.dead_letter_exchange:
            raise ValueError("dead_letter_queue needs dead_letter_exchange")

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
            return tuple(json.loads(stripped))
        return tuple(part.strip() for part in stripped.split(",") if part.strip())
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
    #: Flush a batch once its bodies add up to this many bytes (``None``: no limit).
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
