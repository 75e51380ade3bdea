"""The transport contract on the native connection: consuming sessions and
confirmed publishers."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..._exceptions import Phase, TransportError, recording_phase
from .._base import (
    BindingSpec,
    Delivery,
    ExchangeSpec,
    PublishOptions,
    QueueSpec,
    SessionSpec,
)
from .._common import SessionBase, declare_topology, topology
from .._url import ConnectionParameters
from ._channel import Channel, Waiter
from ._connection import connect
from ._network import NetworkBackend

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["NativePublisher", "NativeSession", "NativeTransport"]

_consumer_numbers = itertools.count(1)


def _consumer_tag(prefix: str) -> str:
    return f"{prefix or 'amqp-batch'}.{os.getpid()}.{next(_consumer_numbers)}"


class NativeSession(SessionBase):
    """A consuming session: one connection, one channel, one consumer."""

    def __init__(
        self,
        channel: Channel,
        consumer_tag: str,
        deliveries: MemoryObjectReceiveStream[Delivery],
    ) -> None:
        super().__init__(consumer_tag, deliveries)
        self._channel = channel

    def __repr__(self) -> str:
        return f"<NativeSession consumer={self.consumer_tag} {self._channel!r}>"

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        """True once the broker sent ``basic.cancel`` for our consumer."""
        return self.consumer_tag in self._channel.cancelled_by_broker

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """``basic.ack`` on this session's channel."""
        self._channel.ack(delivery_tag, multiple=multiple)

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        """``basic.nack`` on this session's channel."""
        self._channel.nack(delivery_tag, multiple=multiple, requeue=requeue)

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        """``basic.reject`` on this session's channel."""
        self._channel.reject(delivery_tag, requeue=requeue)

    async def cancel(self) -> None:
        """Stop deliveries: ``basic.cancel`` and wait for ``cancel-ok``."""
        await self._channel.basic_cancel(self.consumer_tag)


class NativePublisher:
    """A confirm-mode channel on a connection of its own."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    @property
    def channel(self) -> Channel:
        """The underlying channel (for declarations and inspection)."""
        return self._channel

    def start_publish(self, body: bytes, **options: Unpack[PublishOptions]) -> Waiter:
        """Queue a publish now; return the :class:`Waiter` of its confirm."""
        waiter = self._channel.start_publish(body, **options)
        assert waiter is not None, "a publisher channel is in confirm mode"
        return waiter

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """A passive ``queue.declare``: (ready messages, consumers). A missing
        queue closes this channel (:class:`~amqp_batch.ChannelClosed`, 404)."""
        info = await self._channel.queue_declare(queue, passive=True)
        return info.message_count, info.consumer_count

    async def publish(self, body: bytes, **options: Unpack[PublishOptions]) -> None:
        """Publish and return after the broker's confirm."""
        await self._channel.publish(body, **options)


#: Declare exchanges, queues and bindings on a native channel, in the order given.
declare = declare_topology


class _SessionWatch:
    """Cancels the session body when the channel fails, remembering why."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.error: TransportError | None = None

    def __call__(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
        self.scope.cancel()


@asynccontextmanager
async def open_session(
    spec: SessionSpec, *, network: NetworkBackend | None = None
) -> AsyncIterator[NativeSession]:
    """Connect, declare the topology, set qos, consume; yield the session.

    ``network`` opens the byte stream (see :func:`~._connection.connect`).

    A broker-side channel close (e.g. a 406 after ``consumer_timeout``) is raised out
    of the ``async with`` as :class:`~amqp_batch.ChannelClosed`; a lost connection
    as :class:`~amqp_batch.ConnectionLost`.
    """
    buffer = spec.delivery_buffer or max(spec.prefetch_count, 1) + 16
    async with (
        connect(spec.parameters, network=network) as connection,
        connection.channel() as channel,
    ):
        with recording_phase(Phase.SETUP):
            await declare(channel, topology(spec))
        await channel.basic_qos(spec.prefetch_count)
        send, receive = anyio.create_memory_object_stream[Delivery](buffer)
        tag = spec.consumer_tag or _consumer_tag("amqp-batch")
        with send, receive:
            await channel.basic_consume(spec.queue, tag, send)
            with anyio.CancelScope() as scope:
                watch = _SessionWatch(scope)
                channel.on_close(watch)
                yield NativeSession(channel, tag, receive)
            if watch.error is not None and scope.cancelled_caught:
                raise watch.error
            if channel.close_error is not None and connection.is_open:
                raise channel.close_error


@asynccontextmanager
async def open_publisher(
    parameters: ConnectionParameters,
    *,
    declare_items: Sequence[ExchangeSpec | QueueSpec | BindingSpec] = (),
    network: NetworkBackend | None = None,
) -> AsyncIterator[NativePublisher]:
    """Connect, open a confirm-mode channel, declare ``declare_items``."""
    async with (
        connect(parameters, network=network) as connection,
        connection.channel() as channel,
    ):
        await channel.confirm_select()
        await declare(channel, declare_items)
        yield NativePublisher(channel)


class NativeTransport:
    """The native AMQP 0-9-1 transport (pamqp frames over anyio streams).

    ``network`` opens the byte streams its connections run on; the default is TCP
    (and TLS for ``amqps``). Tests pass one that hands back an in-memory stream
    with a scripted broker on the other end.
    """

    def __init__(self, *, network: NetworkBackend | None = None) -> None:
        self.network = network

    def __repr__(self) -> str:
        if self.network is None:
            return "NativeTransport()"
        return f"NativeTransport(network={self.network!r})"

    def open_session(
        self, spec: SessionSpec
    ) -> AbstractAsyncContextManager[NativeSession]:
        """See :func:`open_session`."""
        return open_session(spec, network=self.network)

    def open_publisher(
        self,
        parameters: ConnectionParameters,
        *,
        declare: Sequence[ExchangeSpec | QueueSpec | BindingSpec] = (),
    ) -> AbstractAsyncContextManager[NativePublisher]:
        """See :func:`open_publisher`."""
        return open_publisher(parameters, declare_items=declare, network=self.network)
