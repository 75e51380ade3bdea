"""Parity: the consumer behaves the same on RabbitMQ and on MemoryBroker.

Every test here runs against both brokers (the ``broker`` fixture) and on asyncio
and trio, and against RabbitMQ through the aiormq transport on asyncio (the rows
are ``tests.support.transports.PARITY_ROWS``). It asserts where each message ends
up: acked, dead-lettered (with which exchange, routing key and headers) or
redelivered. A failure on ``memory`` only is
a MemoryBroker bug; the differences that cannot be removed are listed in
``docs/memory-broker.md``.
"""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from itertools import pairwise
from typing import Any

import anyio
import attrs
import pytest
from tests.support.transports import make_transport, over_brokers

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageResult,
    Publisher,
    batch_consumer,
)
from amqp_batch._delays import delay_queues
from amqp_batch._transport._base import (
    BindingSpec,
    ExchangeSpec,
    Properties,
    QueueSpec,
    Session,
    SessionSpec,
)
from amqp_batch._transport._native import NativeTransport, connect
from amqp_batch._transport._native._session import declare as native_declare
from amqp_batch._transport._url import parse_url
from amqp_batch._worker import topology
from amqp_batch.testing import MemoryBroker
from consumer_support import (
    admin_channel,
    cleanup,
    message_count,
    publish_ids,
    take,
    unique_name,
)

pytestmark = [pytest.mark.anyio, over_brokers]

Declarable = ExchangeSpec | QueueSpec | BindingSpec


@attrs.frozen
class Landed:
    """A message found in a queue, as a consumer of that queue sees it."""

    message_id: str
    exchange: str
    routing_key: str
    redelivered: bool
    headers: Mapping[str, Any]


class SessionWatch:
    """Wraps a transport and counts the consuming sessions it opened, so a test
    can wait for a reconnect without sleeping."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.opened = 0
        self._changed = anyio.Event()

    def open_session(self, spec: SessionSpec) -> Any:
        watch = self

        @asynccontextmanager
        async def opened() -> AsyncIterator[Session]:
            async with watch.inner.open_session(spec) as session:
                watch.opened += 1
                watch._changed.set()
                watch._changed = anyio.Event()
                yield session

        return opened()

    def open_publisher(self, parameters: Any, *, declare: Any = ()) -> Any:
        return self.inner.open_publisher(parameters, declare=declare)

    async def wait_opened(self, count: int) -> None:
        """Wait until ``count`` sessions have been opened in all."""
        with anyio.fail_after(20):
            while self.opened < count:
                await self._changed.wait()


class Broker:
    """What a parity test needs from a broker; one subclass per broker."""

    kind: str
    url: str
    #: Version as (major, minor): RabbitMQ's, or the one MemoryBroker models.
    version: tuple[int, int]

    def __init__(self, inner_transport: Any) -> None:
        self.transport = SessionWatch(inner_transport)
        self._queues: list[str] = []
        self._exchanges: list[str] = []

    def queue_name(self, prefix: str = "q") -> str:
        name = unique_name(f"parity-{prefix}")
        self._queues.append(name)
        return name

    def also_clean_up(self, queues: Iterable[str]) -> None:
        """Delete these queues too at the end (e.g. the library's delay queues)."""
        self._queues.extend(queues)

    def exchange_name(self, prefix: str = "ex") -> str:
        name = unique_name(f"parity-{prefix}")
        self._exchanges.append(name)
        return name

    def settings(self, queue: str, **overrides: Any) -> BatchConsumerSettings:
        values: dict[str, Any] = {
            "url": self.url,
            "queue_name": queue,
            "prefetch_count": 50,
            "batch_size": 10,
            "batch_timeout": 0.1,
            "shutdown_timeout": 10.0,
            "reconnect_backoff_base": 0.01,
            "reconnect_backoff_cap": 0.05,
            "connection_name": queue,
        }
        values.update(overrides)
        return BatchConsumerSettings(**values)

    async def declare_topology(self, settings: BatchConsumerSettings) -> None:
        """Declare what the consumer of ``settings`` declares (to publish first)."""
        exchanges, queues, bindings = topology(settings)
        await self.declare(*exchanges, *queues, *bindings)

    async def declare(self, *items: Declarable) -> None:
        raise NotImplementedError

    async def publish(
        self,
        ids: Iterable[int | str],
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Publish one persistent message per id (``message_id`` and body = id)."""
        raise NotImplementedError

    async def take(self, queue: str, count: int) -> list[Landed]:
        """Exactly ``count`` messages from ``queue`` (waiting for them), after
        which the queue must be empty."""
        raise NotImplementedError

    async def ready(self, queue: str) -> int:
        """How many messages are ready in ``queue``."""
        raise NotImplementedError

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue``: the broker cancels its consumers."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Delete what the test declared."""


class RabbitBroker(Broker):
    kind = "rabbitmq"

    def __init__(self, url: str, transport: Any = None) -> None:
        super().__init__(transport or NativeTransport())
        self.url = url

    async def start(self) -> None:
        async with connect(parse_url(self.url)) as connection:
            version = str(connection.server_properties.get("version", "0.0"))
        major, minor = version.split(".")[:2]
        self.version = (int(major), int(minor))

    async def declare(self, *items: Declarable) -> None:
        async with admin_channel(self.url) as channel:
            await native_declare(channel, items)

    async def publish(
        self,
        ids: Iterable[int | str],
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
    ) -> list[str]:
        async with admin_channel(self.url) as channel:
            return await publish_ids(
                channel,
                ids,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
            )

    async def take(self, queue: str, count: int) -> list[Landed]:
        return [
            Landed(
                message_id=str(d.properties.message_id),
                exchange=d.exchange,
                routing_key=d.routing_key,
                redelivered=d.redelivered,
                headers=dict(d.properties.headers or {}),
            )
            for d in await take(self.url, queue, count)
        ]

    async def ready(self, queue: str) -> int:
        async with admin_channel(self.url) as channel:
            return await message_count(channel, queue)

    async def delete_queue(self, queue: str) -> None:
        async with admin_channel(self.url) as channel:
            await channel.queue_delete(queue)

    async def cleanup(self) -> None:
        await cleanup(self.url, queues=self._queues, exchanges=self._exchanges)


class InMemoryBroker(Broker):
    kind = "memory"
    url = "amqp://guest:guest@localhost:5672/"
    # MemoryBroker writes the dead-letter headers of RabbitMQ 3.13 and later.
    version = (3, 13)

    def __init__(self) -> None:
        self.memory = MemoryBroker()
        super().__init__(self.memory)

    async def declare(self, *items: Declarable) -> None:
        self.memory.declare(*items)

    async def publish(
        self,
        ids: Iterable[int | str],
        *,
        exchange: str = "",
        routing_key: str,
        headers: Mapping[str, Any] | None = None,
    ) -> list[str]:
        published = []
        for message_id in ids:
            text = str(message_id)
            await self.memory.publish(
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

    async def take(self, queue: str, count: int) -> list[Landed]:
        memory = self.memory
        await memory.wait_until(
            lambda: memory.message_count(queue) >= count, timeout=20
        )
        messages = memory.queue_messages(queue)
        assert len(messages) == count, [m.properties.message_id for m in messages]
        memory.purge(queue)
        assert memory.unacked_count(queue) == 0
        return [
            Landed(
                message_id=str(m.properties.message_id),
                exchange=m.exchange,
                routing_key=m.routing_key,
                redelivered=m.redelivered,
                headers=m.headers,
            )
            for m in messages
        ]

    async def ready(self, queue: str) -> int:
        await anyio.lowlevel.checkpoint()
        return self.memory.message_count(queue)

    async def delete_queue(self, queue: str) -> None:
        await anyio.lowlevel.checkpoint()
        self.memory.delete_queue(queue)


@pytest.fixture
async def broker(
    request: pytest.FixtureRequest, broker_kind: str
) -> AsyncIterator[Broker]:
    """The same consumer tests against RabbitMQ (through the native transport,
    and through aiormq on asyncio) and against MemoryBroker."""
    if broker_kind in ("rabbitmq", "aiormq"):
        transport = make_transport("aiormq" if broker_kind == "aiormq" else "native")
        rabbit = RabbitBroker(request.getfixturevalue("broker_url"), transport)
        await rabbit.start()
        try:
            yield rabbit
        finally:
            await rabbit.cleanup()
    else:
        yield InMemoryBroker()


async def wait(event: anyio.Event) -> None:
    with anyio.fail_after(20):
        await event.wait()


def without_time(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` with each ``x-death`` entry's ``time`` left out."""
    result = dict(headers)
    if "x-death" in result:
        result["x-death"] = [
            {k: v for k, v in entry.items() if k != "time"}
            for entry in result["x-death"]
        ]
    return result


def dead_letter_headers(
    broker: Broker, *, queue: str, exchange: str, routing_key: str
) -> dict[str, Any]:
    """The headers RabbitMQ gives a message rejected once from ``queue``."""
    headers: dict[str, Any] = {
        "x-death": [
            {
                "count": 1,
                "reason": "rejected",
                "queue": queue,
                "exchange": exchange,
                "routing-keys": [routing_key],
            }
        ],
        "x-first-death-reason": "rejected",
        "x-first-death-queue": queue,
        "x-first-death-exchange": exchange,
    }
    if broker.version >= (3, 13):  # RabbitMQ 3.13 added the x-last-death-* headers
        headers["x-last-death-reason"] = "rejected"
        headers["x-last-death-queue"] = queue
        headers["x-last-death-exchange"] = exchange
    return headers


# -- the tests ---------------------------------------------------------------------


async def test_ack_settles_each_message_once(broker: Broker) -> None:
    queue = broker.queue_name()
    handled: Counter[str] = Counter()
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled[message.message_id or ""] += 1
            yield MessageResult.ACK
        if len(handled) == 25:
            done.set()

    settings = broker.settings(queue)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        ids = await broker.publish(range(25), routing_key=queue)
        await wait(done)
    assert handled == dict.fromkeys(ids, 1)
    assert consumer.health()[0].results == {"ack": 25}
    assert await broker.take(queue, 0) == []


async def test_nack_dead_letters_under_the_original_exchange_and_key(
    broker: Broker,
) -> None:
    """NACK is ``basic.reject(requeue=False)``: the broker dead-letters the message
    to a topic DLX bound on ``orders.#``, keeping its routing key, with x-death."""
    queue, dlq = broker.queue_name(), broker.queue_name("dlq")
    exchange, dlx = broker.exchange_name(), broker.exchange_name("dlx")
    handled: list[str] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append(message.message_id or "")
            yield (
                MessageResult.NACK
                if message.body.startswith(b"n")
                else (MessageResult.ACK)
            )
        if len(handled) == 6:
            done.set()

    await broker.declare(
        ExchangeSpec(name=dlx, type="topic"),
        QueueSpec(name=dlq),
        BindingSpec(queue=dlq, exchange=dlx, routing_key="orders.#"),
    )
    settings = broker.settings(
        queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        dead_letter_exchange=dlx,
        dead_letter_strategy="broker",
    )
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(
            ["a0", "n1", "a2", "n3", "a4", "n5"],
            exchange=exchange,
            routing_key="orders.created",
        )
        await wait(done)
        dead = await broker.take(dlq, 3)
    assert sorted(handled) == ["a0", "a2", "a4", "n1", "n3", "n5"]
    assert [d.message_id for d in dead] == ["n1", "n3", "n5"]
    expected = dead_letter_headers(
        broker, queue=queue, exchange=exchange, routing_key="orders.created"
    )
    for landed in dead:
        assert (landed.exchange, landed.routing_key) == (dlx, "orders.created")
        assert not landed.redelivered
        assert without_time(landed.headers) == expected
    assert consumer.health()[0].results == {"ack": 3, "nack": 3, "dead_lettered": 3}
    assert await broker.take(queue, 0) == []


async def test_requeue_counts_up_then_dead_letters_under_the_original_key(
    broker: Broker,
) -> None:
    """REQUEUE republishes a copy to the back of the queue with x-retry-count + 1;
    at max_requeue_attempts the library dead-letters it to the DLX with the
    exchange and routing key it was first published with."""
    queue, dlq = broker.queue_name(), broker.queue_name("dlq")
    exchange, dlx = broker.exchange_name(), broker.exchange_name("dlx")
    seen: dict[str, list[tuple[int, str, str, bool]]] = defaultdict(list)
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen[message.message_id or ""].append(
                (
                    message.retry_count,
                    message.exchange,
                    message.routing_key,
                    message.redelivered,
                )
            )
            yield (
                MessageResult.REQUEUE
                if message.body.startswith(b"r")
                else (MessageResult.ACK)
            )
        if sum(map(len, seen.values())) == 2 + 2 * 3:
            done.set()

    await broker.declare(
        ExchangeSpec(name=dlx, type="topic"),
        QueueSpec(name=dlq),
        BindingSpec(queue=dlq, exchange=dlx, routing_key="orders.#"),
    )
    settings = broker.settings(
        queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        dead_letter_exchange=dlx,
        max_requeue_attempts=2,
    )
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(
            ["r0", "a1", "r2", "a3"], exchange=exchange, routing_key="orders.created"
        )
        await wait(done)
        dead = await broker.take(dlq, 2)

    # Copies are new messages (not redelivered), published to the queue by name.
    first = (0, exchange, "orders.created", False)
    copies = [(1, "", queue, False), (2, "", queue, False)]
    assert seen == {
        "a1": [first],
        "a3": [first],
        "r0": [first, *copies],
        "r2": [first, *copies],
    }
    assert sorted(d.message_id for d in dead) == ["r0", "r2"]
    for landed in dead:
        assert (landed.exchange, landed.routing_key) == (dlx, "orders.created")
        assert landed.headers == {
            "x-retry-count": 2,
            "x-original-exchange": exchange,
            "x-original-routing-key": "orders.created",
            "x-dead-letter-reason": "max-requeue-attempts",
        }
    assert consumer.health()[0].results == {
        "ack": 2,
        "requeue": 6,
        "dead_lettered": 2,
    }
    assert await broker.take(queue, 0) == []


async def test_requeue_immediate_is_redelivered(broker: Broker) -> None:
    """REQUEUE_IMMEDIATE is ``basic.nack(requeue=True)``: the same message comes
    back flagged redelivered, with no retry count."""
    queue = broker.queue_name()
    seen: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen[message.message_id or ""].append(
                (message.retry_count, message.redelivered)
            )
            again = message.body.startswith(b"i") and not message.redelivered
            yield MessageResult.REQUEUE_IMMEDIATE if again else MessageResult.ACK
        if sum(map(len, seen.values())) == 6:
            done.set()

    settings = broker.settings(queue)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(["a0", "i1", "a2", "i3"], routing_key=queue)
        await wait(done)
    assert seen == {
        "a0": [(0, False)],
        "a2": [(0, False)],
        "i1": [(0, False), (0, True)],
        "i3": [(0, False), (0, True)],
    }
    assert consumer.health()[0].results == {"ack": 4, "requeue_immediate": 2}
    assert await broker.take(queue, 0) == []


async def test_too_few_results_the_rest_get_the_unhandled_action(
    broker: Broker,
) -> None:
    """A handler that yields one result for four messages: the other three get
    unhandled_exception_action (REQUEUE by default), so they come back with
    x-retry-count 1 and are handled again."""
    queue = broker.queue_name()
    seen: dict[str, list[int]] = defaultdict(list)
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen[message.message_id or ""].append(message.retry_count)
        if all(m.retry_count == 0 for m in messages):
            yield MessageResult.ACK  # one result only
        else:
            for _ in messages:
                yield MessageResult.ACK
        if sum(map(len, seen.values())) == 7:
            done.set()

    settings = broker.settings(queue, batch_size=4)
    await broker.declare_topology(settings)
    ids = await broker.publish(range(4), routing_key=queue)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await wait(done)
    assert seen == {ids[0]: [0], ids[1]: [0, 1], ids[2]: [0, 1], ids[3]: [0, 1]}
    assert consumer.health()[0].results == {"ack": 4, "requeue": 3}
    assert await broker.take(queue, 0) == []


async def test_handler_raises_the_rest_get_the_unhandled_action(
    broker: Broker,
) -> None:
    """A handler that raises after one result: with unhandled_exception_action
    NACK the other messages of the batch are dead-lettered by the broker."""
    queue, dlq = broker.queue_name(), broker.queue_name("dlq")
    dlx = broker.exchange_name("dlx")
    calls = 0
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        nonlocal calls
        calls += 1
        try:
            yield MessageResult.ACK
            raise RuntimeError("handler bug")
        finally:
            if calls == 2:
                done.set()

    settings = broker.settings(
        queue,
        batch_size=3,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        unhandled_exception_action="NACK",
        dead_letter_strategy="broker",
    )
    await broker.declare_topology(settings)
    await broker.publish(range(6), routing_key=queue)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await wait(done)
        dead = await broker.take(dlq, 4)
    assert sorted(d.message_id for d in dead) == ["1", "2", "4", "5"]
    expected = dead_letter_headers(broker, queue=queue, exchange="", routing_key=queue)
    for landed in dead:
        assert (landed.exchange, landed.routing_key) == (dlx, queue)
        assert without_time(landed.headers) == expected
    assert consumer.health()[0].results == {"ack": 2, "nack": 4, "dead_lettered": 4}
    assert await broker.take(queue, 0) == []


async def test_batches_flush_at_batch_size_then_at_timeout(broker: Broker) -> None:
    """25 waiting messages with batch_size 10: two full batches at once, then
    the last 5 once batch_timeout has passed since the batch's first message."""
    queue = broker.queue_name()
    batches: list[tuple[float, list[str]]] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> list[MessageResult]:
        batches.append((anyio.current_time(), [m.message_id or "" for m in messages]))
        if sum(len(ids) for _, ids in batches) == 25:
            done.set()
        return [MessageResult.ACK] * len(messages)

    settings = broker.settings(queue, batch_size=10, batch_timeout=0.3)
    await broker.declare_topology(settings)
    ids = await broker.publish(range(25), routing_key=queue)
    async with batch_consumer(settings, handle, transport=broker.transport):
        await wait(done)
    assert [len(batch) for _, batch in batches] == [10, 10, 5]
    assert [i for _, batch in batches for i in batch] == ids
    # The last batch's first message arrived after the first batch was handed
    # over, and its batch waited the full timeout from there.
    assert batches[2][0] - batches[0][0] >= 0.3
    assert await broker.take(queue, 0) == []


async def test_prefetch_bounds_the_messages_in_the_process(broker: Broker) -> None:
    """With prefetch 5 and the handler stuck on its first batch of 3 (the next
    2 wait in the batcher), the broker keeps every other message: 7 of 12 stay
    ready until the batch is settled."""
    queue = broker.queue_name()
    batches: list[list[str]] = []
    entered, release, done = anyio.Event(), anyio.Event(), anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        batches.append([m.message_id or "" for m in messages])
        entered.set()
        await release.wait()
        for _ in messages:
            yield MessageResult.ACK
        if sum(map(len, batches)) == 12:
            done.set()

    settings = broker.settings(queue, prefetch_count=5, batch_size=3, batch_timeout=0.2)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        ids = await broker.publish(range(12), routing_key=queue)
        await wait(entered)
        assert await broker.ready(queue) == 7
        release.set()
        await wait(done)
    assert batches[0] == ids[:3]
    assert all(len(batch) <= 3 for batch in batches)
    assert [i for batch in batches for i in batch] == ids
    assert consumer.health()[0].results == {"ack": 12}
    assert await broker.take(queue, 0) == []


async def test_broker_cancel_consumer_redeclares_and_goes_on(broker: Broker) -> None:
    """Deleting the queue makes the broker cancel the consumer: the batch in the
    handler still finishes, the worker reconnects, declares the queue again and
    consumes what is published to it next."""
    queue = broker.queue_name()
    handled: list[str] = []
    entered, release, second = anyio.Event(), anyio.Event(), anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        handled.extend(m.message_id or "" for m in messages)
        if handled == ["first"]:
            entered.set()
            await release.wait()
        for _ in messages:
            yield MessageResult.ACK
        if "second" in handled:
            second.set()

    settings = broker.settings(queue, batch_size=1)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(["first"], routing_key=queue)
        await wait(entered)
        await broker.delete_queue(queue)
        release.set()
        await broker.transport.wait_opened(2)
        await broker.publish(["second"], routing_key=queue)
        await wait(second)
    assert handled == ["first", "second"]
    [health] = consumer.health()
    assert health.reconnect_count == 1
    assert health.last_error is not None
    assert health.last_error.startswith("ConsumerCancelled")
    assert health.results == {"ack": 2}
    assert await broker.take(queue, 0) == []


async def test_stop_requeues_prefetched_messages_in_order(broker: Broker) -> None:
    """A graceful stop finishes the batches already formed and settles them;
    what was prefetched but not batched goes back to the queue in its original
    order, flagged redelivered. Nothing is lost or handled twice."""
    queue = broker.queue_name()
    handled: Counter[str] = Counter()
    stop_requested = anyio.Event()

    class StopAfterFirstBatch(BatchConsumer[BatchConsumerSettings]):
        async def process_messages(
            self, messages: Sequence[Message]
        ) -> AsyncIterator[MessageResult]:
            if not handled:
                await self.stop()  # from a handler: only requests the stop
                stop_requested.set()
            for message in messages:
                handled[message.message_id or ""] += 1
                yield MessageResult.ACK

    settings = broker.settings(queue, prefetch_count=10, batch_size=2, batch_timeout=30)
    await broker.declare_topology(settings)
    ids = await broker.publish(range(10), routing_key=queue)
    consumer = StopAfterFirstBatch(settings, transport=broker.transport)
    async with consumer:
        await wait(stop_requested)
    done = [i for i in ids if i in handled]
    assert set(handled.values()) == {1}
    assert done == ids[: len(done)]  # a prefix: the first batches
    assert 2 <= len(done) < len(ids)
    assert consumer.health()[0].results == {"ack": len(done)}
    back = await broker.take(queue, len(ids) - len(done))
    assert [m.message_id for m in back] == ids[len(done) :]
    assert all(m.redelivered for m in back)


async def test_shutdown_timeout_requeues_the_stuck_batch_never_acked(
    broker: Broker,
) -> None:
    """A handler still running when shutdown_timeout passes is cancelled: its
    messages go back to the queue (redelivered), none of them is acked."""
    queue = broker.queue_name()
    entered = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        entered.set()
        await anyio.sleep_forever()  # stuck: only the shutdown timeout ends it
        yield MessageResult.ACK

    settings = broker.settings(
        queue, prefetch_count=10, batch_size=3, shutdown_timeout=0.2
    )
    await broker.declare_topology(settings)
    ids = await broker.publish(range(3), routing_key=queue)
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await wait(entered)
    assert consumer.health()[0].results == {}
    back = await broker.take(queue, 3)
    assert [m.message_id for m in back] == ids
    assert all(m.redelivered for m in back)


async def test_properties_and_headers_arrive_as_amqp_carries_them(
    broker: Broker,
) -> None:
    """What the handler gets is what went through the AMQP encoding: bytes come
    back as bytearray, tuples as lists, datetimes in UTC to the second. A header
    value AMQP cannot carry fails the publish and leaves the publisher usable."""
    queue = broker.queue_name()
    got: list[Message] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        got.extend(messages)
        done.set()
        for _ in messages:
            yield MessageResult.ACK

    stamp = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)  # naive, with micros
    settings = broker.settings(queue, batch_size=1)
    async with (
        batch_consumer(settings, handle, transport=broker.transport),
        Publisher(broker.url, transport=broker.transport) as publisher,
    ):
        with pytest.raises(TypeError):
            await publisher.publish(b"bad", routing_key=queue, headers={"s": {1}})
        await publisher.publish(
            b"{}",
            routing_key=queue,
            headers={
                "bytes": b"\xff",
                "tuple": (1, "a"),
                "when": stamp,
                "nested": {"values": [1.5, None, True, -(2**40)]},
                "decimal": Decimal("1.25"),
            },
            message_id="m",
            timestamp=stamp,
            content_type="application/json",
            priority=3,
            correlation_id="c",
            app_id="app",
        )
        await wait(done)
    [message] = got
    in_utc = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    assert dict(message.headers) == {
        "bytes": bytearray(b"\xff"),
        "tuple": [1, "a"],
        "when": in_utc,
        "nested": {"values": [1.5, None, True, -(2**40)]},
        "decimal": Decimal("1.25"),
    }
    assert type(message.headers["bytes"]) is bytearray
    properties = message.properties
    assert (properties.timestamp, properties.message_id) == (in_utc, "m")
    assert (properties.content_type, properties.priority) == ("application/json", 3)
    assert (properties.correlation_id, properties.app_id) == ("c", "app")
    assert properties.delivery_mode == 2
    assert await broker.take(queue, 0) == []


async def test_a_requeued_copy_keeps_every_header_exactly(broker: Broker) -> None:
    """A REQUEUE copy carries the original's headers unchanged: a float keeps all
    its 64 bits (not rounded to 32), a key longer than 128 bytes keeps its whole
    name, a byte array its bytes."""
    queue = broker.queue_name()
    long_key = "k" * 200
    headers = {
        "ratio": 0.1,
        long_key: "long",
        "raw": b"\x00\xff",
        "nested": {"values": [2.5e-300, -1]},
    }
    seen: list[Message] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen.append(message)
            yield (
                MessageResult.REQUEUE if message.retry_count == 0 else MessageResult.ACK
            )
        if len(seen) == 2:
            done.set()

    settings = broker.settings(queue, batch_size=1)
    async with (
        batch_consumer(settings, handle, transport=broker.transport),
        Publisher(broker.url, transport=broker.transport) as publisher,
    ):
        await publisher.publish(b"x", routing_key=queue, headers=headers)
        await wait(done)
    original, copy = seen
    expected = {**headers, "raw": bytearray(b"\x00\xff")}
    assert dict(original.headers) == expected
    assert original.headers["ratio"] == 0.1
    assert dict(copy.headers) == {
        **expected,
        "x-retry-count": 1,
        "x-original-exchange": "",
        "x-original-routing-key": queue,
    }
    assert await broker.take(queue, 0) == []


async def test_dead_letter_routing_key_argument_is_used_by_both_paths(
    broker: Broker,
) -> None:
    """With ``x-dead-letter-routing-key`` in the queue arguments, a NACK (the
    broker dead-letters) and an exhausted REQUEUE
    of a copy (the library dead-letters) both reach the DLX under that key;
    x-death keeps the original key."""
    queue, dlq = broker.queue_name(), broker.queue_name("dlq")
    exchange, dlx = broker.exchange_name(), broker.exchange_name("dlx")
    done = anyio.Event()
    handled: list[str] = []

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append(message.message_id or "")
            yield (
                MessageResult.NACK
                if message.body.startswith(b"n")
                else (MessageResult.REQUEUE)
            )
        if len(handled) == 3:
            done.set()

    await broker.declare(
        ExchangeSpec(name=dlx, type="topic"),
        QueueSpec(name=dlq),
        BindingSpec(queue=dlq, exchange=dlx, routing_key="dead.#"),
    )
    settings = broker.settings(
        queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        dead_letter_exchange=dlx,
        queue_arguments={"x-dead-letter-routing-key": "dead.letter"},
        max_requeue_attempts=1,
        dead_letter_strategy="broker",
    )
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(
            ["n0", "r1"], exchange=exchange, routing_key="orders.created"
        )
        await wait(done)
        dead = {d.message_id: d for d in await broker.take(dlq, 2)}
    assert sorted(dead) == ["n0", "r1"]
    assert all(d.routing_key == "dead.letter" for d in dead.values())
    assert without_time(dead["n0"].headers) == dead_letter_headers(
        broker, queue=queue, exchange=exchange, routing_key="orders.created"
    )
    assert dead["r1"].headers == {
        "x-retry-count": 1,
        "x-original-exchange": exchange,
        "x-original-routing-key": "orders.created",
        "x-dead-letter-reason": "max-requeue-attempts",
    }
    assert handled == ["n0", "r1", "r1"]
    assert consumer.health()[0].results == {
        "nack": 1,
        "requeue": 2,
        "dead_lettered": 2,
    }
    assert await broker.take(queue, 0) == []


async def test_requeue_copy_refused_by_a_full_queue_dead_letters_the_original(
    broker: Broker,
) -> None:
    """A queue with ``x-max-length: 1`` and ``x-overflow: reject-publish``: the
    copy of a REQUEUE is nacked by the broker while another message waits, so
    the original is dead-lettered instead of lost; the waiting one is acked."""
    queue, dlq = broker.queue_name(), broker.queue_name("dlq")
    dlx = broker.exchange_name("dlx")
    handled: list[tuple[str, int]] = []
    entered, release, done = anyio.Event(), anyio.Event(), anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append((message.message_id or "", message.retry_count))
        if handled == [("first", 0)]:
            entered.set()
            await release.wait()
            yield MessageResult.REQUEUE
        else:
            for _ in messages:
                yield MessageResult.ACK
            done.set()

    settings = broker.settings(
        queue,
        prefetch_count=1,
        batch_size=1,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(["first"], routing_key=queue)
        await wait(entered)
        await broker.publish(["waiting"], routing_key=queue)  # fills the queue
        release.set()
        await wait(done)
        dead = await broker.take(dlq, 1)
    assert handled == [("first", 0), ("waiting", 0)]
    assert [d.message_id for d in dead] == ["first"]
    [health] = consumer.health()
    assert health.results["ack"] == 1
    assert health.results["dead_lettered"] == 1
    assert await broker.take(queue, 0) == []


async def test_single_active_consumer_feeds_one_worker(broker: Broker) -> None:
    """``x-single-active-consumer``: of two workers only one gets messages."""
    queue = broker.queue_name()
    handled: Counter[str] = Counter()
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled[message.message_id or ""] += 1
            yield MessageResult.ACK
        if len(handled) == 30:
            done.set()

    settings = broker.settings(
        queue,
        num_workers=2,
        prefetch_count=5,
        batch_size=5,
        queue_arguments={"x-single-active-consumer": True},
    )
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await broker.publish(range(30), routing_key=queue)
        await wait(done)
    assert set(handled.values()) == {1}
    acks = sorted(worker.results.get("ack", 0) for worker in consumer.health())
    assert acks == [0, 30]
    assert await broker.take(queue, 0) == []


async def test_delayed_retries_wait_in_delay_queues(broker: Broker) -> None:
    """retry_delays=(0.2, 0.4): each REQUEUE copy waits in the delay queue of
    its attempt (no consumer: the TTL expires on the broker's timer) and comes
    back through the default exchange with x-retry-count + 1 and its headers;
    attempts are spaced by at least their delays; the delay queues are left
    empty and in place."""
    queue = broker.queue_name()
    delays = (0.2, 0.4)
    names = [spec.name for spec in delay_queues(queue, delays)]
    broker.also_clean_up(names)
    attempts: dict[str, list[tuple[int, float, str, str, bool]]] = defaultdict(list)
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            attempts[message.message_id or ""].append(
                (
                    message.retry_count,
                    anyio.current_time(),
                    message.exchange,
                    message.routing_key,
                    message.redelivered,
                )
            )
            yield (
                MessageResult.ACK if message.retry_count == 3 else MessageResult.REQUEUE
            )
        if sum(len(a) for a in attempts.values()) == 8:
            done.set()

    settings = broker.settings(queue, retry_delays=delays, max_requeue_attempts=5)
    await broker.declare_topology(settings)
    await broker.publish(["a", "b"], routing_key=queue, headers={"h": "kept"})
    async with batch_consumer(settings, handle, transport=broker.transport) as consumer:
        await wait(done)
    for message_id in ("a", "b"):
        seen = attempts[message_id]
        assert [count for count, *_ in seen] == [0, 1, 2, 3]
        for (count, before, *_), (_, after, exchange, key, again) in pairwise(seen):
            assert after - before >= delays[min(count + 1, len(delays)) - 1]
            assert (exchange, key, again) == ("", queue, False)
    for name in names:
        assert await broker.ready(name) == 0
    assert consumer.health()[0].results == {"requeue": 6, "ack": 2}
    assert await broker.take(queue, 0) == []
