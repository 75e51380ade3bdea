"""Sessions and publishers on a memory broker (the transport contract)."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from ..._exceptions import (
    ChannelClosed,
    MessageNacked,
    MessageReturned,
    Phase,
    recording_phase,
)
from .._base import (
    BindingSpec,
    Confirmation,
    Delivery,
    ExchangeSpec,
    Properties,
    PublisherSession,
    PublishOptions,
    QueueSpec,
    Session,
    SessionSpec,
    publish_arguments,
)
from .._common import SessionBase, topology
from .._url import ConnectionParameters
from ._core import Settle
from ._declare import channel_error
from ._model import Channel, Consumer

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._core import BrokerCore

__all__ = [
    "MemoryConfirmation",
    "MemoryPublisher",
    "MemorySession",
    "open_publisher",
    "open_session",
]

_consumer_numbers = itertools.count(1)

#: The arguments of one publish: body, exchange, routing key, properties, mandatory.
_Publish = tuple[bytes, str, str, Properties | None, bool]


class MemorySession(SessionBase, Session):
    """A consuming session on a :class:`~amqp_batch.testing.MemoryBroker`."""

    def __init__(
        self,
        core: BrokerCore,
        channel: Channel,
        consumer: Consumer,
        deliveries: MemoryObjectReceiveStream[Delivery],
    ) -> None:
        super().__init__(consumer.tag, deliveries)
        self._core = core
        self._channel = channel
        self._consumer = consumer

    def __repr__(self) -> str:
        return (
            f"<MemorySession consumer={self._consumer.tag} "
            f"connection={self._channel.connection_name!r}>"
        )

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        return self._consumer.cancelled_by_broker

    async def _settle(self, tag: int, *, multiple: bool, how: Settle) -> None:
        self._core.settle(self._channel, tag, multiple=multiple, how=how)
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
        how: Settle = "requeue" if requeue else "reject"
        await self._settle(delivery_tag, multiple=multiple, how=how)

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        how: Settle = "requeue" if requeue else "reject"
        await self._settle(delivery_tag, multiple=False, how=how)

    async def cancel(self) -> None:
        await anyio.lowlevel.checkpoint()
        self._core.remove_consumer(self._consumer)


class MemoryConfirmation(Confirmation):
    """A publish started on a :class:`MemoryPublisher`: routed at once, or when
    the broker unblocks publishers; :meth:`wait` gives its outcome."""

    def __init__(
        self, route: Callable[[], None], unblocked: Callable[[], Awaitable[None]]
    ) -> None:
        self._unblocked = unblocked
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

    @property
    def done(self) -> bool:
        """True once the message was routed (its outcome is known)."""
        return self._route is None

    async def wait(self) -> None:
        if self._route is not None:
            await self._unblocked()
        await anyio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error


class MemoryPublisher(PublisherSession):
    """A confirm-mode publisher on a :class:`~amqp_batch.testing.MemoryBroker`."""

    def __init__(self, core: BrokerCore, channel: Channel) -> None:
        self._core = core
        self._channel = channel
        #: Started while publishers were blocked; routed in order on unblock.
        self._started: deque[MemoryConfirmation] = deque()

    def __repr__(self) -> str:
        return f"<MemoryPublisher connection={self._channel.connection_name!r}>"

    def start_publish(
        self, body: bytes, **options: Unpack[PublishOptions]
    ) -> MemoryConfirmation:
        """Route the message now and return its confirmation (already decided).

        While the broker blocks publishers, the message is routed when they are
        unblocked, in the order the publishes were started (as RabbitMQ reads a
        blocked connection's frames once it unblocks). Raises
        :class:`~amqp_batch.ChannelClosed` at once if this publisher's channel is
        closed.
        """
        self._core.check_open(self._channel)
        arguments = (body, *publish_arguments(options))
        confirmation = MemoryConfirmation(
            partial(self._route, arguments), self._wait_unblocked
        )
        self._started.append(confirmation)
        if not self._core.gate.blocked:
            self._route_started()
        return confirmation

    def _route(self, arguments: _Publish) -> None:
        try:
            self._core.publish(*arguments)
        except ChannelClosed as exc:  # RabbitMQ closes the publisher's channel
            self._core.fail(self._channel, exc)
            raise

    def _route_started(self) -> None:
        while self._started:
            self._started.popleft().settle()

    async def _wait_unblocked(self) -> None:
        # Then route, in order, what was started while publishers were blocked.
        await self._core.gate.wait_unblocked()
        self._route_started()

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """A passive ``queue.declare``: (ready messages, consumers). A missing
        queue closes this publisher's channel (:class:`~amqp_batch.ChannelClosed`,
        404), as on RabbitMQ."""
        await anyio.lowlevel.checkpoint()
        self._core.check_open(self._channel)
        found = self._core.queues.get(queue)
        if found is None:
            error = channel_error(404, f"NOT_FOUND - no queue '{queue}'")
            self._core.fail(self._channel, error)
            raise error
        self._core.expire(found)
        return len(found.ready), len(found.consumers)

    async def publish(self, body: bytes, **options: Unpack[PublishOptions]) -> None:
        """Route the message and return (the confirm is immediate).

        Raises :class:`~amqp_batch.MessageReturned` (312 NO_ROUTE) for an
        unroutable ``mandatory`` message, :class:`~amqp_batch.MessageNacked` when a
        queue with ``x-overflow: reject-publish`` is full, and
        :class:`~amqp_batch.ChannelClosed` (404) for a missing exchange, after
        which this publisher's channel is closed. Waits while the broker blocks
        publishers.
        """
        await self._wait_unblocked()
        self._core.check_open(self._channel)
        try:
            self._route((body, *publish_arguments(options)))
        finally:
            await anyio.lowlevel.checkpoint()


def _buffer(spec: SessionSpec) -> float:
    if spec.prefetch_count <= 0:
        return math.inf  # no prefetch limit: the broker pushes everything
    return max(spec.delivery_buffer or spec.prefetch_count + 16, spec.prefetch_count)


@asynccontextmanager
async def open_session(
    core: BrokerCore, spec: SessionSpec
) -> AsyncIterator[MemorySession]:
    """Connect, declare the topology, consume; yield the session.

    Leaving the block closes the channel: unacknowledged deliveries go back to
    their queue in order, marked redelivered. A forced close
    (:meth:`MemoryBroker.disconnect`) is raised out of the block as
    :class:`~amqp_batch.ConnectionLost`; a broker-side channel close (an unknown
    delivery tag) as :class:`~amqp_batch.ChannelClosed`.
    """
    channel = await core.connect(spec.parameters)
    try:
        with recording_phase(Phase.SETUP):
            core.declare(topology(spec), channel.connection_id)
        send, receive = anyio.create_memory_object_stream[Delivery](_buffer(spec))
        with send, receive:
            tag = spec.consumer_tag or f"amq.ctag-memory-{next(_consumer_numbers)}"
            consumer = Consumer(
                tag=tag,
                queue=core.queue_named(spec.queue),
                channel=channel,
                prefetch=max(spec.prefetch_count, 0),
                sink=send,
            )
            core.consume(channel, consumer)
            async with anyio.create_task_group() as timers:
                timers.start_soon(core.expire_on_time)
                with anyio.CancelScope() as scope:
                    channel.on_failure = scope.cancel
                    yield MemorySession(core, channel, consumer, receive)
                timers.cancel_scope.cancel()
    finally:
        channel.on_failure = None
        core.close_channel(channel)
    error = channel.connection_error or channel.error
    if error is not None:
        raise error


@asynccontextmanager
async def open_publisher(
    core: BrokerCore,
    parameters: ConnectionParameters,
    declare: Sequence[ExchangeSpec | QueueSpec | BindingSpec] = (),
) -> AsyncIterator[MemoryPublisher]:
    """Connect, declare ``declare`` in order, yield a publisher.

    A forced close is raised out of the block as :class:`~amqp_batch.ConnectionLost`.
    """
    channel = await core.connect(parameters)
    try:
        core.declare(declare, channel.connection_id)
        with anyio.CancelScope() as scope:
            channel.on_failure = lambda: (
                scope.cancel() if channel.connection_error is not None else None
            )
            yield MemoryPublisher(core, channel)
    finally:
        channel.on_failure = None
        core.close_channel(channel)
    if channel.connection_error is not None:
        raise channel.connection_error
