"""The read-only message view handlers receive."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Generic

from typing_extensions import TypeVar

from ._transport._base import Delivery, Properties

__all__ = ["Message"]

_EMPTY_HEADERS: Mapping[str, Any] = MappingProxyType({})

#: The type of a decoded body (:attr:`Message.value`); ``Message`` alone is
#: ``Message[Any]``.
BodyT_co = TypeVar("BodyT_co", covariant=True, default=Any)

_NOT_DECODED: Any = object()


class Message(Generic[BodyT_co]):
    """One delivered message, read-only.

    Settling is not the handler's business: it returns a
    :class:`~amqp_batch.MessageResult` and the library acks, rejects or republishes.
    ``retry_count`` is ``x-retry-count`` (0 when absent). With a decoder
    (``batch_consumer(..., decoder=...)``), ``value`` is the decoded body: a
    handler for ``Message[Order]`` gets ``message.value`` typed as ``Order``.
    """

    __slots__ = ("_delivery", "_headers", "_retry_count", "_value")

    def __init__(
        self,
        delivery: Delivery,
        *,
        retry_count: int = 0,
        value: BodyT_co = _NOT_DECODED,
    ) -> None:
        self._delivery = delivery
        self._retry_count = retry_count
        self._headers: Mapping[str, Any] | None = None
        self._value = value

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
    def value(self) -> BodyT_co:
        """The body as the consumer's decoder decoded it.

        Raises :class:`LookupError` when the consumer has no decoder (read
        :attr:`body` then).
        """
        value = self._value
        if value is _NOT_DECODED:
            raise LookupError(
                "this message was not decoded: give the consumer a decoder "
                "(batch_consumer(..., decoder=...)), or read message.body"
            )
        return value

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
