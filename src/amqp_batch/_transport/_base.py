"""The transport contract.

The consumer core depends only on what is defined here, never on pamqp. A transport
(native, or the in-memory one for tests) provides :class:`Transport`:

* ``open_session(spec)``: an async context manager that connects, opens a channel,
  declares ``spec``'s topology, sets ``basic.qos``, registers the consumer *before*
  sending ``basic.consume``, and yields a :class:`Session`. Its internal tasks live
  in a task group it owns; a lost connection is raised out of it as a
  :class:`~amqp_batch.ConnectionLost` (never as a bare cancellation).
* ``open_publisher(params)``: an async context manager yielding a
  :class:`PublisherSession` on a connection of its own, with publisher confirms.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from ._url import ConnectionParameters

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "BindingSpec",
    "Confirmation",
    "Delivery",
    "ExchangeSpec",
    "Properties",
    "PublishOptions",
    "PublisherSession",
    "QueueSpec",
    "Session",
    "SessionSpec",
    "Transport",
    "publish_arguments",
]

FieldTable = Mapping[str, Any]


@attrs.frozen(slots=True, kw_only=True)
class Properties:
    """AMQP basic properties of a message. ``None`` means "not set"."""

    content_type: str | None = None
    content_encoding: str | None = None
    headers: FieldTable | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime.datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None


EMPTY_PROPERTIES = Properties()


@attrs.frozen(slots=True, kw_only=True)
class Delivery:
    """One message delivered to our consumer on one channel.

    ``delivery_tag`` is only meaningful on the session that produced it; a session
    never sends a tag that belongs to a session that has ended.
    """

    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    consumer_tag: str
    body: bytes
    properties: Properties = EMPTY_PROPERTIES


@attrs.frozen(kw_only=True)
class ExchangeSpec:
    """An exchange to declare on every session."""

    name: str
    type: str = "direct"
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: FieldTable | None = None


@attrs.frozen(kw_only=True)
class QueueSpec:
    """A queue to declare on every session."""

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: FieldTable | None = None


@attrs.frozen(kw_only=True)
class BindingSpec:
    """A queue binding to declare on every session."""

    queue: str
    exchange: str
    routing_key: str = ""
    arguments: FieldTable | None = None


@attrs.frozen(kw_only=True)
class SessionSpec:
    """Everything a consuming session needs; the topology is re-declared (idempotently)
    every time a session opens."""

    parameters: ConnectionParameters
    queue: str
    prefetch_count: int
    exchanges: Sequence[ExchangeSpec] = ()
    queues: Sequence[QueueSpec] = ()
    bindings: Sequence[BindingSpec] = ()
    consumer_tag: str = ""
    #: Buffer of the deliveries stream; at least ``prefetch_count`` so the frame
    #: reader never blocks on it.
    delivery_buffer: int | None = None


class Session(Protocol):
    """A consuming session: one connection, one channel, one consumer."""

    @property
    def deliveries(self) -> MemoryObjectReceiveStream[Delivery]:
        """Deliveries in arrival order. Ends (``EndOfStream``) after
        :meth:`cancel` completes or when the broker cancels the consumer."""
        ...

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        """True when the broker sent ``basic.cancel`` (e.g. the queue was deleted)."""
        ...

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Acknowledge ``delivery_tag`` (and every earlier one if ``multiple``)."""
        ...

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        """Negatively acknowledge; ``requeue=False`` dead-letters."""
        ...

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        """Reject one delivery; ``requeue=False`` dead-letters."""
        ...

    async def cancel(self) -> None:
        """Send ``basic.cancel`` and wait for ``cancel-ok``; no new deliveries after."""
        ...


class Confirmation(Protocol):
    """The broker's answer to one publish started with
    :meth:`PublisherSession.start_publish`."""

    @property
    def done(self) -> bool:
        """True once the outcome is in: :meth:`wait` then returns (or raises)
        without waiting for the broker."""
        ...

    async def wait(self) -> None:
        """Return once the broker confirmed the publish.

        Raises :class:`~amqp_batch.MessageNacked` on a nack and
        :class:`~amqp_batch.MessageReturned` when a ``mandatory`` message was
        unroutable; a transport error if the connection is lost first.
        """
        ...


class PublishOptions(TypedDict, total=False):
    """The keywords of every publish method of a transport."""

    #: The exchange (default ``""``, the default exchange).
    exchange: str
    #: The routing key (default ``""``).
    routing_key: str
    #: The message's properties (default none).
    properties: Properties | None
    #: Return the message if no queue takes it (default ``False``).
    mandatory: bool


def publish_arguments(
    options: PublishOptions,
) -> tuple[str, str, Properties | None, bool]:
    """``(exchange, routing_key, properties, mandatory)``, defaults filled in."""
    return (
        options.get("exchange", ""),
        options.get("routing_key", ""),
        options.get("properties"),
        options.get("mandatory", False),
    )


class PublisherSession(Protocol):
    """A connection with a confirm-mode channel for publishing."""

    def start_publish(
        self, body: bytes, **options: Unpack[PublishOptions]
    ) -> Confirmation:
        """Queue a publish now, without waiting; return its :class:`Confirmation`.

        Publishes started one after another reach the broker in that order, so a
        caller can pipeline many of them and wait for the confirms afterwards.
        It does not wait while the connection is blocked (the frames wait in the
        connection's buffer instead). Raises a transport error at once if the
        channel is already closed, and ``ValueError``/``TypeError`` for a body or
        properties that cannot be encoded.
        """
        ...

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """A passive ``queue.declare``: (ready messages, consumers) of ``queue``.

        Raises :class:`~amqp_batch.ChannelClosed` (404) when the queue does not
        exist; the channel is closed then, so open a new publisher session.
        """
        ...

    async def publish(self, body: bytes, **options: Unpack[PublishOptions]) -> None:
        """Publish and return once the broker confirmed it.

        Raises :class:`~amqp_batch.MessageNacked` on a nack and
        :class:`~amqp_batch.MessageReturned` when a ``mandatory`` message was
        unroutable. Waits while the connection is blocked.
        """
        ...


class Transport(Protocol):
    """What the consumer core needs from a transport."""

    def open_session(self, spec: SessionSpec) -> AbstractAsyncContextManager[Session]:
        """Connect, declare ``spec``'s topology, consume; yield the session."""
        ...

    def open_publisher(
        self,
        parameters: ConnectionParameters,
        *,
        declare: Sequence[ExchangeSpec | QueueSpec | BindingSpec] = (),
    ) -> AbstractAsyncContextManager[PublisherSession]:
        """Connect and yield a confirm-mode publisher."""
        ...


def default_ssl_context() -> ssl.SSLContext:
    """A client TLS context that verifies certificates and host names."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
