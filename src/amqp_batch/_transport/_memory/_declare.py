"""Declaration rules: argument validation and the equivalence check RabbitMQ
applies when something is declared again (sans-IO)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..._exceptions import ChannelClosed
from .._base import ExchangeSpec, QueueSpec

__all__ = [
    "channel_error",
    "check_exchange_equivalent",
    "check_queue_arguments",
    "check_queue_equivalent",
]

#: Queue arguments RabbitMQ compares on a redeclare (others are ignored).
_COMPARED_QUEUE_ARGUMENTS = (
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-single-active-consumer",
    "x-queue-type",
    "x-delivery-limit",
)
_NON_NEGATIVE_INT_ARGUMENTS = (
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
)
_OVERFLOW = ("drop-head", "reject-publish", "reject-publish-dlx")


def channel_error(code: int, text: str) -> ChannelClosed:
    """The error a broker-side ``channel.close`` turns into (as the native
    transport reports it)."""
    return ChannelClosed(
        f"the broker closed channel 1: {code} {text}",
        reply_code=code,
        reply_text=text,
    )


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b if isinstance(a, bool | str) else a == b


def _inequivalent(what: str, name: str, key: str, new: Any, old: Any) -> ChannelClosed:
    return channel_error(
        406,
        f"PRECONDITION_FAILED - inequivalent arg '{key}' for {what} '{name}' in vhost "
        f"'/': received {'none' if new is None else repr(new)} but current is "
        f"{'none' if old is None else repr(old)}",
    )


def check_exchange_equivalent(existing: ExchangeSpec, spec: ExchangeSpec) -> None:
    """Raise the 406 RabbitMQ sends when ``spec`` differs from ``existing``."""
    pairs = (
        ("type", spec.type, existing.type),
        ("durable", spec.durable, existing.durable),
        ("auto_delete", spec.auto_delete, existing.auto_delete),
        ("internal", spec.internal, existing.internal),
        (
            "alternate-exchange",
            (spec.arguments or {}).get("alternate-exchange"),
            (existing.arguments or {}).get("alternate-exchange"),
        ),
    )
    for key, new, old in pairs:
        if not _same(new, old):
            raise _inequivalent("exchange", spec.name, key, new, old)


def _queue_argument(arguments: Mapping[str, Any] | None, key: str) -> Any:
    value = (arguments or {}).get(key)
    if key == "x-queue-type" and value is None:
        return "classic"
    return value


def check_queue_equivalent(existing: QueueSpec, spec: QueueSpec) -> None:
    """Raise the 406 RabbitMQ sends when ``spec`` differs from ``existing``."""
    for key, new, old in (
        ("durable", spec.durable, existing.durable),
        ("auto_delete", spec.auto_delete, existing.auto_delete),
        ("exclusive", spec.exclusive, existing.exclusive),
    ):
        if new is not old:
            raise _inequivalent("queue", spec.name, key, new, old)
    for key in _COMPARED_QUEUE_ARGUMENTS:
        new = _queue_argument(spec.arguments, key)
        old = _queue_argument(existing.arguments, key)
        if not _same(new, old):
            raise _inequivalent("queue", spec.name, key, new, old)


def check_queue_arguments(spec: QueueSpec) -> None:
    """Raise the 406 RabbitMQ sends for an invalid argument value."""
    arguments = spec.arguments or {}

    def invalid(key: str, why: str) -> ChannelClosed:
        return channel_error(
            406,
            f"PRECONDITION_FAILED - invalid arg '{key}' for queue '{spec.name}' in "
            f"vhost '/': {why}",
        )

    for key in _NON_NEGATIVE_INT_ARGUMENTS:
        value = arguments.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise invalid(key, f"{value!r} is not a non-negative integer")
    for key in ("x-dead-letter-exchange", "x-dead-letter-routing-key"):
        value = arguments.get(key)
        if value is not None and not isinstance(value, str):
            raise invalid(key, f"{value!r} is not a string")
    if (
        "x-dead-letter-routing-key" in arguments
        and "x-dead-letter-exchange" not in arguments
    ):
        raise invalid(
            "x-dead-letter-routing-key",
            "x-dead-letter-routing-key defined, but x-dead-letter-exchange missing",
        )
    overflow = arguments.get("x-overflow")
    if overflow is not None and overflow not in _OVERFLOW:
        raise invalid("x-overflow", f"{overflow!r} is not one of {_OVERFLOW}")
