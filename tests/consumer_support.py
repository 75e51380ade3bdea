"""Helpers for the consumer tests: broker admin through the native transport,
and an in-memory fake session for deterministic actor tests."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from amqp_batch._transport._base import Delivery, Properties
from amqp_batch._transport._native import Channel, connect
from amqp_batch._transport._url import parse_url

_numbers = itertools.count()


def unique_name(prefix: str = "q") -> str:
    """A queue or exchange name no other test uses."""
    return (
        f"amqpbatch-test-{prefix}-{os.getpid()}-{next(_numbers)}-{uuid.uuid4().hex[:6]}"
    )


@asynccontextmanager
async def admin_channel(url: str) -> AsyncIterator[Channel]:
    """A confirm-mode channel on its own connection, for setup and inspection."""
    async with connect(parse_url(url)) as connection, connection.channel() as channel:
        await channel.confirm_select()
        yield channel


async def publish_ids(
    channel: Channel,
    ids: Iterable[int | str],
    *,
    exchange: str = "",
    routing_key: str,
    headers: Mapping[str, Any] | None = None,
) -> list[str]:
    """Publish one persistent message per id (``message_id`` and body = id)."""
    published = []
    for message_id in ids:
        text = str(message_id)
        await channel.publish(
            text.encode(),
            exchange=exchange,
            routing_key=routing_key,
            properties=Properties(
                message_id=text,
                delivery_mode=2,
                headers=dict(headers) if headers is not None else None,
            ),
        )
        published.append(text)
    return published


async def drain(channel: Channel, queue: str) -> list[Delivery]:
    """Take (and auto-ack) every message now in ``queue``."""
    deliveries = []
    while (delivery := await channel.basic_get(queue, no_ack=True)) is not None:
        deliveries.append(delivery)
    return deliveries


def ids_of(deliveries: Iterable[Delivery]) -> list[str]:
    """The ``message_id`` of each delivery."""
    return [str(d.properties.message_id) for d in deliveries]


async def message_count(channel: Channel, queue: str) -> int:
    """Ready messages in ``queue`` (passive declare)."""
    info = await channel.queue_declare(queue, passive=True)
    return int(info[1])


async def cleanup(
    url: str, queues: Sequence[str] = (), exchanges: Sequence[str] = ()
) -> None:
    """Delete test queues and exchanges (shielded: runs during teardown)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        async with admin_channel(url) as channel:
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)


class FakeSession:
    """A :class:`~amqp_batch._transport._base.Session` that records settlements."""

    def __init__(self, buffer: int = 1000) -> None:
        self.sender: ObjectSendStream[Delivery]
        self.sender, self._receiver = anyio.create_memory_object_stream[Delivery](
            buffer
        )
        self.frames: list[tuple[str, int, bool]] = []
        self.cancelled = False
        self._tags = itertools.count(1)

    @property
    def deliveries(self) -> MemoryObjectReceiveStream[Delivery]:
        return self._receiver

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        return False

    def deliver(
        self,
        message_id: str,
        *,
        headers: Mapping[str, Any] | None = None,
        body: bytes | None = None,
    ) -> Delivery:
        delivery = Delivery(
            delivery_tag=next(self._tags),
            redelivered=False,
            exchange="",
            routing_key="q",
            consumer_tag="ctag",
            body=body if body is not None else message_id.encode(),
            properties=Properties(message_id=message_id, headers=headers),
        )
        self.sender.send_nowait(delivery)
        return delivery

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        self.frames.append(("nack" if requeue else "nack-drop", delivery_tag, multiple))

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self.frames.append(
            ("reject" if not requeue else "reject-requeue", delivery_tag, False)
        )

    async def cancel(self) -> None:
        self.cancelled = True
        self.sender.close()

    def close(self) -> None:
        self.sender.close()
        self._receiver.close()


class FakePublisher:
    """Records publishes; ``fail`` maps a message_id to an exception to raise."""

    def __init__(
        self,
        fail: Mapping[str, BaseException] | None = None,
        refuse: Mapping[str, Exception] | None = None,
    ) -> None:
        self.published: list[tuple[str, str, Properties | None, bytes]] = []
        self.fail = dict(fail or {})
        #: message_id -> error ``start_publish`` raises at once (cannot encode).
        self.refuse = dict(refuse or {})

    def start_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> FakeConfirmation:
        """Record the publish now (unless it is to fail); confirm on ``wait``."""
        message_id = properties.message_id if properties else None
        if message_id in self.refuse:
            raise self.refuse[message_id]
        error = self.fail.get(message_id) if message_id is not None else None
        if error is None:
            self.published.append((exchange, routing_key, properties, body))
        return FakeConfirmation(error)

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        await self.start_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
        ).wait()


class FakeConfirmation:
    """A confirm that arrives at the next checkpoint, or ``error``."""

    #: Never in before ``wait`` (it always checkpoints).
    done = False

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    async def wait(self) -> None:
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error


@asynccontextmanager
async def consuming(url: str, queue: str, prefetch: int = 1000) -> AsyncIterator[Any]:
    """A plain native session on ``queue`` (for reading dead-letter queues)."""
    from amqp_batch._transport._base import SessionSpec
    from amqp_batch._transport._native import NativeTransport

    spec = SessionSpec(parameters=parse_url(url), queue=queue, prefetch_count=prefetch)
    async with NativeTransport().open_session(spec) as session:
        yield session


async def take(url: str, queue: str, count: int, timeout: float = 20) -> list[Delivery]:
    """Consume exactly ``count`` messages from ``queue`` (acking them), failing if
    they do not arrive within ``timeout``; then check nothing else is ready."""
    taken: list[Delivery] = []
    if count:
        with anyio.fail_after(timeout):
            async with consuming(url, queue, prefetch=count) as session:
                async for delivery in session.deliveries:
                    taken.append(delivery)
                    await session.ack(delivery.delivery_tag)
                    if len(taken) == count:
                        break
                await session.cancel()
    async with admin_channel(url) as channel:
        extra = await drain(channel, queue)
    assert not extra, f"unexpected extra messages in {queue}: {ids_of(extra)}"
    return taken


class CountingTransport:
    """Wraps a transport; counts the settle frames each session sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.frames: list[tuple[str, int, bool]] = []

    def open_session(self, spec: Any) -> Any:
        transport = self

        @asynccontextmanager
        async def wrapped() -> AsyncIterator[Any]:
            async with transport.inner.open_session(spec) as session:
                yield RecordingSession(session, transport.frames)

        return wrapped()

    def open_publisher(self, parameters: Any, *, declare: Any = ()) -> Any:
        return self.inner.open_publisher(parameters, declare=declare)


class RecordingSession:
    """A session that notes every settlement frame (kind, tag, multiple) in
    ``frames`` before passing it on."""

    def __init__(self, inner: Any, frames: list[tuple[str, int, bool]]) -> None:
        self._inner = inner
        self.frames = frames

    @property
    def deliveries(self) -> Any:
        return self._inner.deliveries

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        return bool(self._inner.consumer_cancelled_by_broker)

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))
        await self._inner.ack(delivery_tag, multiple=multiple)

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        self.frames.append(("nack", delivery_tag, multiple))
        await self._inner.nack(delivery_tag, multiple=multiple, requeue=requeue)

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self.frames.append(("reject", delivery_tag, False))
        await self._inner.reject(delivery_tag, requeue=requeue)

    async def cancel(self) -> None:
        await self._inner.cancel()
