"""Retry-count rules and the properties of republished and dead-lettered copies.

Sans-IO: nothing here talks to the broker. The acker decides with these functions
and publishes through a :class:`~amqp_batch._transport._base.PublisherSession`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import attrs

from ._delays import delay_queue_for
from ._transport._base import Delivery, Properties

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "MAX_RETRY_COUNT",
    "ORIGINAL_EXCHANGE_HEADER",
    "ORIGINAL_ROUTING_KEY_HEADER",
    "ORIGINAL_SIGNATURE_HEADER",
    "RETRY_COUNT_HEADER",
    "InvalidRetryCount",
    "RetryPolicy",
    "dead_letter_properties",
    "original_destination",
    "parse_retry_count",
    "requeue_properties",
    "sign_original",
    "trusted_original",
]

RETRY_COUNT_HEADER = "x-retry-count"
ORIGINAL_EXCHANGE_HEADER = "x-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-original-routing-key"
DEAD_LETTER_REASON_HEADER = "x-dead-letter-reason"
#: HMAC-SHA256 (hex) over the original exchange, routing key and message id,
#: set on copies when ``header_signing_key`` is configured.
ORIGINAL_SIGNATURE_HEADER = "x-original-signature"
#: AMQP exchange names and routing keys are short strings: at most 255 bytes.
_MAX_NAME_BYTES = 255
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

    #: Key of the ``x-original-signature`` HMAC (``None``: copies unsigned).
    signing_key: bytes | None = attrs.field(default=None, repr=False)
    #: Seconds before each retry (the last repeating); ``()``: retry at once.
    retry_delays: tuple[float, ...] = ()
    #: ``"publish"``: dead-letter by a confirmed publish to the DLX, then ack,
    #: whenever the DLX is known; ``"broker"``: ``basic.reject`` originals.
    dead_letter_strategy: str = "broker"

    def is_copy(self, delivery: Delivery) -> bool:
        """True for a copy this library republished: default exchange, our
        queue, and trusted ``x-original-*`` headers (signed, with a key)."""
        return self.trusted_original(delivery) is not None

    def trusted_original(self, delivery: Delivery) -> tuple[str, str] | None:
        """The ``x-original-*`` destination of a copy this library republished
        to this queue (see :func:`trusted_original`); ``None`` otherwise."""
        return trusted_original(
            delivery, queue=self.queue, signing_key=self.signing_key
        )

    def original_destination(self, delivery: Delivery) -> tuple[str, str]:
        """Where ``delivery`` was first published (its own destination unless
        it is a trusted copy)."""
        return original_destination(
            delivery, queue=self.queue, signing_key=self.signing_key
        )

    def requeue_properties(
        self,
        delivery: Delivery,
        new_retry_count: int,
        *,
        original: tuple[str, str] | None = None,
    ) -> Properties:
        """The properties of the copy with ``new_retry_count`` (see
        :func:`requeue_properties`; ``original``: its
        :meth:`original_destination`, when the caller has it)."""
        return requeue_properties(
            delivery,
            new_retry_count,
            queue=self.queue,
            signing_key=self.signing_key,
            original=original,
        )

    def dead_letter_properties(
        self,
        delivery: Delivery,
        reason: str,
        headers: Mapping[str, Any] | None = None,
        *,
        original: tuple[str, str] | None = None,
    ) -> Properties:
        """The properties of a library dead letter (see
        :func:`dead_letter_properties`; ``original`` as for
        :meth:`requeue_properties`)."""
        return dead_letter_properties(
            delivery,
            reason,
            queue=self.queue,
            signing_key=self.signing_key,
            headers=headers,
            original=original,
        )

    def dead_letter_destination(
        self, delivery: Delivery, original: tuple[str, str] | None = None
    ) -> tuple[str, str] | None:
        """Where the library publishes ``delivery``'s dead letter: the DLX
        and the original routing key (or the queue's fixed dead-letter key);
        ``None`` when the DLX is unknown. ``original``: the delivery's
        :meth:`original_destination`, when the caller has it."""
        if self.dead_letter_exchange is None:
            return None
        _, routing_key = original or self.original_destination(delivery)
        if self.dead_letter_routing_key is not None:
            routing_key = self.dead_letter_routing_key
        return self.dead_letter_exchange, routing_key

    def retry_destination(self, new_retry_count: int) -> str:
        """The routing key (on the default exchange) of the copy with
        ``new_retry_count``: the delay queue of that attempt, or the work queue
        itself without delays."""
        target = delay_queue_for(self.queue, self.retry_delays, new_retry_count)
        return self.queue if target is None else target


def sign_original(
    key: bytes, exchange: str, routing_key: str, message_id: str | None
) -> str:
    """The ``x-original-signature`` of a copy: HMAC-SHA256 over its original
    exchange, routing key and message id (length-prefixed, so no two triples
    share an input)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (exchange, routing_key, message_id or ""):
        data = part.encode("utf-8", "surrogatepass")
        mac.update(len(data).to_bytes(4, "big") + data)
    return mac.hexdigest()


def _fits(name: str) -> bool:
    return len(name.encode("utf-8", "surrogatepass")) <= _MAX_NAME_BYTES


def _signed(delivery: Delivery, key: bytes, exchange: str, routing_key: str) -> bool:
    signature = (delivery.properties.headers or {}).get(ORIGINAL_SIGNATURE_HEADER)
    if not isinstance(signature, str) or len(signature) != 64:
        return False
    expected = sign_original(key, exchange, routing_key, delivery.properties.message_id)
    return hmac.compare_digest(signature.encode("ascii", "replace"), expected.encode())


def trusted_original(
    delivery: Delivery, *, queue: str | None = None, signing_key: bytes | None = None
) -> tuple[str, str] | None:
    """The ``x-original-*`` destination of ``delivery`` if it may be trusted,
    else ``None``.

    Producer headers are untrusted. They are believed only on what can be a
    copy the library made: delivered through the default exchange (``""``,
    where copies and expired delayed copies arrive) with the work queue's name
    as routing key (when ``queue`` is given); both headers short strings (at
    most 255 bytes, as AMQP names are); and, when ``signing_key`` is set, a
    valid ``x-original-signature``.
    """
    if delivery.exchange != "" or (queue is not None and delivery.routing_key != queue):
        return None
    headers = delivery.properties.headers
    if not headers:
        return None
    exchange = headers.get(ORIGINAL_EXCHANGE_HEADER)
    routing_key = headers.get(ORIGINAL_ROUTING_KEY_HEADER)
    if not (isinstance(exchange, str) and isinstance(routing_key, str)):
        return None
    if not (_fits(exchange) and _fits(routing_key)):
        return None
    if signing_key is not None and not _signed(
        delivery, signing_key, exchange, routing_key
    ):
        return None
    return exchange, routing_key


def original_destination(
    delivery: Delivery, *, queue: str | None = None, signing_key: bytes | None = None
) -> tuple[str, str]:
    """The exchange and routing key the message was first published with: the
    trusted ``x-original-*`` headers of a copy (see :func:`trusted_original`),
    otherwise the delivery's own."""
    trusted = trusted_original(delivery, queue=queue, signing_key=signing_key)
    if trusted is not None:
        return trusted
    return delivery.exchange, delivery.routing_key


def _with_headers(
    delivery: Delivery,
    extra: Mapping[str, Any],
    *,
    queue: str | None = None,
    signing_key: bytes | None = None,
    original: tuple[str, str] | None = None,
) -> Properties:
    headers = dict(delivery.properties.headers or {})
    exchange, routing_key = original or original_destination(
        delivery, queue=queue, signing_key=signing_key
    )
    # Set, not kept: untrusted x-original-* headers are replaced by the truth.
    headers[ORIGINAL_EXCHANGE_HEADER] = exchange
    headers[ORIGINAL_ROUTING_KEY_HEADER] = routing_key
    if signing_key is None:
        headers.pop(ORIGINAL_SIGNATURE_HEADER, None)
    else:
        headers[ORIGINAL_SIGNATURE_HEADER] = sign_original(
            signing_key, exchange, routing_key, delivery.properties.message_id
        )
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


def requeue_properties(
    delivery: Delivery,
    new_retry_count: int,
    *,
    queue: str | None = None,
    signing_key: bytes | None = None,
    original: tuple[str, str] | None = None,
) -> Properties:
    """Every property and header kept, the count set, the first destination noted
    (and signed when ``signing_key`` is set). ``original``: that destination
    (:func:`original_destination` with ``queue`` and ``signing_key``), when the
    caller has worked it out already."""
    return _with_headers(
        delivery,
        {RETRY_COUNT_HEADER: new_retry_count},
        queue=queue,
        signing_key=signing_key,
        original=original,
    )


def dead_letter_properties(
    delivery: Delivery,
    reason: str,
    *,
    queue: str | None = None,
    signing_key: bytes | None = None,
    headers: Mapping[str, Any] | None = None,
    original: tuple[str, str] | None = None,
) -> Properties:
    """Properties for a copy the library dead-letters itself, with the reason
    (and ``headers``, when given; ``original`` as for :func:`requeue_properties`)."""
    return _with_headers(
        delivery,
        {**(headers or {}), DEAD_LETTER_REASON_HEADER: reason},
        queue=queue,
        signing_key=signing_key,
        original=original,
    )
