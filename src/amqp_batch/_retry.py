"""Retry-count rules and the properties of republished and dead-lettered copies.

Sans-IO: nothing here talks to the broker. The acker decides with these functions
and publishes through a :class:`~amqp_batch._transport._base.PublisherSession`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ._transport._base import Delivery, Properties

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "MAX_RETRY_COUNT",
    "ORIGINAL_EXCHANGE_HEADER",
    "ORIGINAL_ROUTING_KEY_HEADER",
    "RETRY_COUNT_HEADER",
    "InvalidRetryCount",
    "RetryPolicy",
    "dead_letter_properties",
    "original_destination",
    "parse_retry_count",
    "requeue_properties",
]

RETRY_COUNT_HEADER = "x-retry-count"
ORIGINAL_EXCHANGE_HEADER = "x-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-original-routing-key"
DEAD_LETTER_REASON_HEADER = "x-dead-letter-reason"
#: The largest ``x-retry-count`` taken at face value; above it the header is
#: treated as forged or corrupt rather than as "retried very often".
MAX_RETRY_COUNT = 2**31 - 1


class InvalidRetryCount(ValueError):
    """``x-retry-count`` is present but not a plain non-negative integer."""


def parse_retry_count(headers: Mapping[str, Any] | None) -> int:
    """Return the retry count in ``headers``; a missing header counts as 0.

    Raises :class:`InvalidRetryCount` for anything but a plain ``int`` in
    ``0..MAX_RETRY_COUNT``: a string, float, bool, negative or huge value, list,
    table or bytes is never silently read as 0 (that would reset the count).
    """
    if not headers or RETRY_COUNT_HEADER not in headers:
        return 0
    value = headers[RETRY_COUNT_HEADER]
    if type(value) is not int:
        raise InvalidRetryCount(
            f"{RETRY_COUNT_HEADER} is a {type(value).__name__}, not an integer"
        )
    if not 0 <= value <= MAX_RETRY_COUNT:
        raise InvalidRetryCount(f"{RETRY_COUNT_HEADER}={value} is out of range")
    return value


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """What the acker needs to requeue and dead-letter for one queue."""

    queue: str
    max_requeue_attempts: int
    #: The queue's dead-letter exchange when the settings name it (directly or via
    #: ``x-dead-letter-exchange`` in ``queue_arguments``); ``None`` when unknown.
    dead_letter_exchange: str | None = None
    #: ``x-dead-letter-routing-key`` from the queue arguments, which the broker
    #: would use instead of the message's own key.
    dead_letter_routing_key: str | None = None

    def is_exhausted(self, retry_count: int) -> bool:
        """True when a REQUEUE must dead-letter instead of republishing."""
        return retry_count >= self.max_requeue_attempts

    def is_copy(self, delivery: Delivery) -> bool:
        """True for a copy this library republished (default exchange, our queue)."""
        headers = delivery.properties.headers or {}
        return (
            delivery.exchange == ""
            and delivery.routing_key == self.queue
            and isinstance(headers.get(ORIGINAL_ROUTING_KEY_HEADER), str)
        )


def original_destination(delivery: Delivery) -> tuple[str, str]:
    """The exchange and routing key the message was first published with."""
    headers = delivery.properties.headers or {}
    exchange = headers.get(ORIGINAL_EXCHANGE_HEADER)
    routing_key = headers.get(ORIGINAL_ROUTING_KEY_HEADER)
    if isinstance(exchange, str) and isinstance(routing_key, str):
        return exchange, routing_key
    return delivery.exchange, delivery.routing_key


def _with_headers(delivery: Delivery, extra: Mapping[str, Any]) -> Properties:
    headers = dict(delivery.properties.headers or {})
    exchange, routing_key = original_destination(delivery)
    headers.setdefault(ORIGINAL_EXCHANGE_HEADER, exchange)
    headers.setdefault(ORIGINAL_ROUTING_KEY_HEADER, routing_key)
    headers.update(extra)
    # user_id must match the publishing connection's user or the broker refuses
    # the message, so a copy never carries it. (Spelled out: attrs.evolve costs
    # twice as much, once per republish.)
    old = delivery.properties
    return Properties(
        content_type=old.content_type,
        content_encoding=old.content_encoding,
        headers=headers,
        delivery_mode=old.delivery_mode,
        priority=old.priority,
        correlation_id=old.correlation_id,
        reply_to=old.reply_to,
        expiration=old.expiration,
        message_id=old.message_id,
        timestamp=old.timestamp,
        type=old.type,
        user_id=None,
        app_id=old.app_id,
    )


def requeue_properties(delivery: Delivery, new_retry_count: int) -> Properties:
    """Every property and header kept, the count set, the first destination noted."""
    return _with_headers(delivery, {RETRY_COUNT_HEADER: new_retry_count})


def dead_letter_properties(
    delivery: Delivery, reason: str, headers: Mapping[str, Any] | None = None
) -> Properties:
    """Properties for a copy the library dead-letters itself, with the reason
    (and ``headers``, when given)."""
    return _with_headers(
        delivery, {**(headers or {}), DEAD_LETTER_REASON_HEADER: reason}
    )
