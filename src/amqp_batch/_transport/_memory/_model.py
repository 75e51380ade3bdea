"""The memory broker's state: messages, queues, exchanges, channels, consumers.

Plain records only; the rules that change them live in ``_core``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import attrs
from anyio.streams.memory import MemoryObjectSendStream

from ..._exceptions import TransportError
from .._base import Delivery, ExchangeSpec, FieldTable, Properties, QueueSpec

__all__ = [
    "BrokerMessage",
    "Channel",
    "Consumer",
    "Exchange",
    "Published",
    "Queue",
    "StoredMessage",
    "Unacked",
]


@attrs.frozen(kw_only=True)
class BrokerMessage:
    """A snapshot of one message sitting in a queue of a
    :class:`~amqp_batch.testing.MemoryBroker`."""

    body: bytes
    properties: Properties
    #: The exchange and routing key it was last published (or dead-lettered) with.
    exchange: str
    routing_key: str
    #: True once it was requeued (nack/reject with requeue, or a closed session).
    redelivered: bool

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers (empty if none)."""
        return dict(self.properties.headers or {})


@attrs.frozen(kw_only=True)
class Published:
    """One publish a client made on a :class:`~amqp_batch.testing.MemoryBroker`."""

    body: bytes
    properties: Properties
    exchange: str
    routing_key: str
    mandatory: bool
    #: The queues it was routed to (empty: unroutable).
    queues: tuple[str, ...]


@attrs.define(eq=False, kw_only=True)
class StoredMessage:
    """A message in one queue. ``seq`` is its place: requeued messages go back
    to where they were, as in a RabbitMQ classic queue."""

    seq: int
    body: bytes
    properties: Properties
    exchange: str
    routing_key: str
    redelivered: bool = False
    expires_at: float | None = None

    def __lt__(self, other: StoredMessage) -> bool:
        return self.seq < other.seq

    def _view(self) -> dict[str, Any]:
        # Every field of BrokerMessage is a field of this class; a Delivery has
        # them all too, with its tags.
        return {name: getattr(self, name) for name in _VIEW_FIELDS}

    def snapshot(self) -> BrokerMessage:
        """A public, immutable view."""
        return BrokerMessage(**self._view())

    def delivery(self, delivery_tag: int, consumer_tag: str) -> Delivery:
        """This message as delivered with ``delivery_tag`` to ``consumer_tag``."""
        return Delivery(
            delivery_tag=delivery_tag, consumer_tag=consumer_tag, **self._view()
        )


_VIEW_FIELDS = tuple(field.name for field in attrs.fields(BrokerMessage))


@attrs.define(eq=False, kw_only=True)
class Binding:
    """A queue bound to an exchange."""

    queue: str
    routing_key: str
    arguments: FieldTable | None


@attrs.define(eq=False, kw_only=True)
class Exchange:
    """An exchange, as it was declared, and its bindings."""

    spec: ExchangeSpec
    bindings: list[Binding] = attrs.field(factory=list)


@attrs.define(eq=False, kw_only=True)
class Queue:
    """A queue, as it was declared: ready messages in order, unacknowledged ones,
    its consumers."""

    spec: QueueSpec
    #: The connection that owns an exclusive queue.
    owner: int | None = None
    ready: list[StoredMessage] = attrs.field(factory=list)  # a heap by seq
    unacked: dict[int, StoredMessage] = attrs.field(factory=dict)
    consumers: list[Consumer] = attrs.field(factory=list)
    deleted: bool = False

    @property
    def name(self) -> str:
        """The queue's name."""
        return self.spec.name

    def argument(self, key: str) -> Any:
        """One ``x-`` argument, or None."""
        return (self.spec.arguments or {}).get(key)

    def push(self, message: StoredMessage) -> None:
        """Put a message at its place (by ``seq``)."""
        heapq.heappush(self.ready, message)

    def pop(self) -> StoredMessage:
        """Take the head."""
        return heapq.heappop(self.ready)

    def in_order(self) -> list[StoredMessage]:
        """Ready messages, head first."""
        return sorted(self.ready)

    def ready_bytes(self) -> int:
        """Total body size of the ready messages."""
        return sum(len(m.body) for m in self.ready)


@attrs.define(eq=False, kw_only=True)
class Consumer:
    """One ``basic.consume`` on a channel."""

    tag: str
    queue: Queue
    channel: Channel
    prefetch: int
    sink: MemoryObjectSendStream[Delivery]
    unacked: int = 0
    active: bool = True
    cancelled_by_broker: bool = False

    def has_capacity(self) -> bool:
        """Whether the broker may deliver one more message to it now."""
        if not self.active or (self.prefetch and self.unacked >= self.prefetch):
            return False
        stats = self.sink.statistics()
        return stats.current_buffer_used < stats.max_buffer_size


class Unacked(NamedTuple):
    """A delivery waiting for its ack, nack or reject."""

    queue: Queue
    message: StoredMessage
    consumer: Consumer


@attrs.define(eq=False, kw_only=True)
class Channel:
    """The one channel of a memory connection."""

    connection_id: int
    connection_name: str
    last_tag: int = 0
    unacked: dict[int, Unacked] = attrs.field(factory=dict)  # in tag order
    consumers: dict[str, Consumer] = attrs.field(factory=dict)
    #: Why it closed, when the broker closed it (``None`` while open).
    error: TransportError | None = None
    #: The connection's failure (a forced close), if any.
    connection_error: TransportError | None = None
    closed: bool = False
    #: Called once when the broker closes the channel or the connection.
    on_failure: Callable[[], None] | None = None

    def next_tag(self) -> int:
        """The next delivery tag: they grow by one per channel."""
        self.last_tag += 1
        return self.last_tag

    def tags_up_to(self, tag: int) -> Iterator[int]:
        """Unacked tags up to and including ``tag`` (all of them for 0)."""
        return iter([t for t in self.unacked if tag == 0 or t <= tag])
