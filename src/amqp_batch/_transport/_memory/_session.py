"""Sessions and publishers on a memory broker (the transport contract)."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from ..._exceptions import ChannelClosed, MessageNacked, MessageReturned
from .._base import (
    BindingSpec,
    Delivery,
    ExchangeSpec,
    Properties,
    QueueSpec,
    SessionSpec,
)
from .._url import ConnectionParameters
from ._core import Settle
from ._declare import channel_error
from ._model import Channel, Consumer

if TYPE_CHECKING:
    from ._broker import MemoryBroker

__all__ = [
    "MemoryConfirmation",
    "MemoryPublisher",
    "MemorySession",
    "open_publisher",
    "open_session",
]

_consumer_numbers = itertools.count(1)


class MemorySession:
    """A consuming session on a :class:`~amqp_batch.testing.MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        channel: Channel,
        consumer: Consumer,
        deliveries: MemoryObjectReceiveStream[Delivery],
    ) -> None:
        self._broker = broker
        self._channel = channel
        self._consumer = consumer
        self._deliveries = deliveries

    def __repr__(self) -> str:
        return (
            f"<MemorySession consumer={self._consumer.tag} "
            f"connection={self._channel.connection_name!r}>"
        )

    @property
    def consumer_tag(self) -> str:
        """This session's consumer tag."""
        return self._consumer.tag

    @property
    def deliveries(self) -> MemoryObjectReceiveStream[Delivery]:
        """Deliveries in arrival order; ends after cancel or a broker cancel."""
        return self._deliveries

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        """True once the broker cancelled the consumer (e.g. its queue was
        deleted)."""
        return self._consumer.cancelled_by_broker

    async def _settle(self, tag: int, *, multiple: bool, how: Settle) -> None:
        self._broker._settle(self._channel, tag, multiple=multiple, how=how)
        if self._channel.closed:
            # Like the broker's channel.close arriving: the session body is
            # cancelled here and the error is raised out of ``open_session``.
            await anyio.lowlevel.checkpoint()

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Acknowledge ``delivery_tag`` (and every earlier one if ``multiple``).

        An unknown or already settled tag closes the session with
        :class:`~amqp_batch.ChannelClosed` (406), as RabbitMQ does.
        """
        await self._settle(delivery_tag, multiple=multiple, how="ack")

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        """Negatively acknowledge; ``requeue=False`` dead-letters."""
        how: Settle = "requeue" if requeue else "reject"
        await self._settle(delivery_tag, multiple=multiple, how=how)

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        """Reject one delivery; ``requeue=False`` dead-letters."""
        how: Settle = "requeue" if requeue else "reject"
        await self._settle(delivery_tag, multiple=False, how=how)

    async def cancel(self) -> None:
        """Stop deliveries; the stream ends after what it already holds.
        Unacknowledged deliveries can still be settled."""
        await anyio.lowlevel.checkpoint()
        self._broker._remove_consumer(self._consumer)


class MemoryConfirmation:
    """A publish started on a :class:`MemoryPublisher`: routed at once, or when
    the broker unblocks publishers; :meth:`wait` gives its outcome."""

    def __init__(self, publisher: MemoryPublisher, route: Callable[[], None]) -> None:
        self._publisher = publisher
        self._route: Callable[[], None] | None = route
        self._error: BaseException | None = None

    def settle(self) -> None:
        """Route the message now (once) and keep the outcome."""
        route, self._route = self._route, None
        if route is None:
            return
        try:
            route()
        except (MessageNacked, MessageReturned, ChannelClosed) as exc:
            self._error = exc

    async def wait(self) -> None:
        """Return once the message is routed; raise what routing it raised."""
        if self._route is not None:
            await self._publisher._broker._wait_unblocked()
            self._publisher._route_started()
        await anyio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error


class MemoryPublisher:
    """A confirm-mode publisher on a :class:`~amqp_batch.testing.MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, channel: Channel) -> None:
        self._broker = broker
        self._channel = channel
        #: Started while publishers were blocked; routed in order on unblock.
        self._started: deque[MemoryConfirmation] = deque()

    def __repr__(self) -> str:
        return f"<MemoryPublisher connection={self._channel.connection_name!r}>"

    def start_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> MemoryConfirmation:
        """Route the message now and return its confirmation (already decided).

        While the broker blocks publishers, the message is routed when they are
        unblocked, in the order the publishes were started (as RabbitMQ reads a
        blocked connection's frames once it unblocks). Raises
        :class:`~amqp_batch.ChannelClosed` at once if this publisher's channel is
        closed.
        """
        self._broker._check_open(self._channel)
        confirmation = MemoryConfirmation(
            self,
            lambda: self._route(body, exchange, routing_key, properties, mandatory),
        )
        self._started.append(confirmation)
        if not self._broker._blocked:
            self._route_started()
        return confirmation

    def _route(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Properties | None,
        mandatory: bool,
    ) -> None:
        try:
            self._broker._publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
            )
        except ChannelClosed as exc:
            self._broker._fail(self._channel, exc)
            raise

    def _route_started(self) -> None:
        while self._started:
            self._started.popleft().settle()

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """A passive ``queue.declare``: (ready messages, consumers). A missing
        queue closes this publisher's channel (:class:`~amqp_batch.ChannelClosed`,
        404), as on RabbitMQ."""
        await anyio.lowlevel.checkpoint()
        self._broker._check_open(self._channel)
        if not self._broker.has_queue(queue):
            error = channel_error(404, f"NOT_FOUND - no queue '{queue}'")
            self._broker._fail(self._channel, error)
            raise error
        return self._broker.message_count(queue), self._broker.consumer_count(queue)

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Route the message and return (the confirm is immediate).

        Raises :class:`~amqp_batch.MessageReturned` (312 NO_ROUTE) for an
        unroutable ``mandatory`` message, :class:`~amqp_batch.MessageNacked` when a
        queue with ``x-overflow: reject-publish`` is full, and
        :class:`~amqp_batch.ChannelClosed` (404) for a missing exchange, after
        which this publisher's channel is closed. Waits while the broker blocks
        publishers.
        """
        await self._broker._wait_unblocked()
        self._route_started()
        self._broker._check_open(self._channel)
        try:
            self._route(body, exchange, routing_key, properties, mandatory)
        finally:
            await anyio.lowlevel.checkpoint()


def _buffer(spec: SessionSpec) -> float:
    if spec.prefetch_count <= 0:
        return math.inf  # no prefetch limit: the broker pushes everything
    return max(spec.delivery_buffer or spec.prefetch_count + 16, spec.prefetch_count)


@asynccontextmanager
async def open_session(
    broker: MemoryBroker, spec: SessionSpec
) -> AsyncIterator[MemorySession]:
    """Connect, declare the topology, consume; yield the session.

    Leaving the block closes the channel: unacknowledged deliveries go back to
    their queue in order, marked redelivered. A forced close
    (:meth:`MemoryBroker.disconnect`) is raised out of the block as
    :class:`~amqp_batch.ConnectionLost`; a broker-side channel close (an unknown
    delivery tag) as :class:`~amqp_batch.ChannelClosed`.
    """
    channel = await broker._connect(spec.parameters)
    try:
        try:
            broker._declare(
                [*spec.exchanges, *spec.queues, *spec.bindings], channel.connection_id
            )
        except ChannelClosed as exc:
            exc.retryable = exc.reply_code not in (403, 406)
            raise
        send, receive = anyio.create_memory_object_stream[Delivery](_buffer(spec))
        with send, receive:
            tag = spec.consumer_tag or f"amq.ctag-memory-{next(_consumer_numbers)}"
            consumer = Consumer(
                tag=tag,
                queue=broker._queue(spec.queue),
                channel=channel,
                prefetch=max(spec.prefetch_count, 0),
                sink=send,
            )
            broker._consume(channel, consumer)
            with anyio.CancelScope() as scope:
                channel.on_failure = scope.cancel
                yield MemorySession(broker, channel, consumer, receive)
    finally:
        channel.on_failure = None
        broker._close_channel(channel)
    error = channel.connection_error or channel.error
    if error is not None:
        raise error


@asynccontextmanager
async def open_publisher(
    broker: MemoryBroker,
    parameters: ConnectionParameters,
    declare: Sequence[ExchangeSpec | QueueSpec | BindingSpec] = (),
) -> AsyncIterator[MemoryPublisher]:
    """Connect, declare ``declare`` in order, yield a publisher.

    A forced close is raised out of the block as :class:`~amqp_batch.ConnectionLost`.
    """
    channel = await broker._connect(parameters)
    try:
        broker._declare(declare, channel.connection_id)
        with anyio.CancelScope() as scope:
            channel.on_failure = lambda: (
                scope.cancel() if channel.connection_error is not None else None
            )
            yield MemoryPublisher(broker, channel)
    finally:
        channel.on_failure = None
        broker._close_channel(channel)
    if channel.connection_error is not None:
        raise channel.connection_error
