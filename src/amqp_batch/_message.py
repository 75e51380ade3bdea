"""The read-only message view handlers receive."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ._transport._base import Delivery, Properties

__all__ = ["Message"]

_EMPTY_HEADERS: Mapping[str, Any] = MappingProxyType({})


class Message:
    """One delivered message, read-only.

    Settling is not the handler's business: it returns a
    :class:`~amqp_batch.MessageResult` and the library acks, rejects or republishes.
    ``retry_count`` is ``x-retry-count`` (0 when absent).
    """

    __slots__ = ("_delivery", "_headers", "_retry_count")

    def __init__(self, delivery: Delivery, *, retry_count: int = 0) -> None:
        self._delivery = delivery
        self._retry_count = retry_count
        self._headers: Mapping[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"Message(delivery_tag={self.delivery_tag}, message_id={self.message_id!r},"
            f" exchange={self.exchange!r}, routing_key={self.routing_key!r},"
            f" retry_count={self.retry_count}, body_size={len(self.body)})"
        )

    @property
    def delivery(self) -> Delivery:
        """The transport's delivery this view wraps."""
        return self._delivery

    @property
    def properties(self) -> Properties:
        """All AMQP basic properties."""
        return self._delivery.properties

    @property
    def body(self) -> bytes:
        """The message body."""
        return self._delivery.body

    @property
    def headers(self) -> Mapping[str, Any]:
        """Application headers (read-only; empty when none were sent)."""
        if self._headers is None:
            # Built on first use: most handlers never look at the headers.
            headers = self._delivery.properties.headers
            self._headers = (
                MappingProxyType(dict(headers)) if headers else _EMPTY_HEADERS
            )
        return self._headers

    @property
    def message_id(self) -> str | None:
        """The ``message_id`` property."""
        return self._delivery.properties.message_id

    @property
    def content_type(self) -> str | None:
        """The ``content_type`` property."""
        return self._delivery.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        """The ``content_encoding`` property."""
        return self._delivery.properties.content_encoding

    @property
    def correlation_id(self) -> str | None:
        """The ``correlation_id`` property."""
        return self._delivery.properties.correlation_id

    @property
    def priority(self) -> int | None:
        """The ``priority`` property."""
        return self._delivery.properties.priority

    @property
    def timestamp(self) -> datetime.datetime | None:
        """The ``timestamp`` property."""
        return self._delivery.properties.timestamp

    @property
    def type(self) -> str | None:
        """The ``type`` property."""
        return self._delivery.properties.type

    @property
    def app_id(self) -> str | None:
        """The ``app_id`` property."""
        return self._delivery.properties.app_id

    @property
    def user_id(self) -> str | None:
        """The ``user_id`` property."""
        return self._delivery.properties.user_id

    @property
    def reply_to(self) -> str | None:
        """The ``reply_to`` property."""
        return self._delivery.properties.reply_to

    @property
    def expiration(self) -> str | None:
        """The ``expiration`` property."""
        return self._delivery.properties.expiration

    @property
    def delivery_mode(self) -> int | None:
        """The ``delivery_mode`` property (2 = persistent)."""
        return self._delivery.properties.delivery_mode

    @property
    def exchange(self) -> str:
        """The exchange this delivery came through."""
        return self._delivery.exchange

    @property
    def routing_key(self) -> str:
        """The routing key of this delivery."""
        return self._delivery.routing_key

    @property
    def redelivered(self) -> bool:
        """True when the broker delivered this message before."""
        return self._delivery.redelivered

    @property
    def retry_count(self) -> int:
        """How often the message was REQUEUEd (``x-retry-count``; 0 when absent)."""
        return self._retry_count

    @property
    def delivery_count(self) -> int:
        """How often a quorum queue delivered this message before
        (``x-delivery-count``, set by the broker on redeliveries; 0 when absent:
        a first delivery, or a classic queue, which does not count). It counts
        redeliveries of *this* message (channel closed, nack with requeue), not
        REQUEUEs: a REQUEUE publishes a new copy, see :attr:`retry_count`."""
        headers = self._delivery.properties.headers
        value = headers.get("x-delivery-count") if headers else None
        return value if type(value) is int and value >= 0 else 0

    @property
    def delivery_tag(self) -> int:
        """The delivery tag on the worker's channel."""
        return self._delivery.delivery_tag
