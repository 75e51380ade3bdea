"""The batch consumer against a real broker, on asyncio and trio."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from amqp_batch import (
    BatchConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
)
from amqp_batch._transport._native import NativeTransport
from consumer_support import (
    CountingTransport,
    admin_channel,
    cleanup,
    drain,
    ids_of,
    publish_ids,
    take,
    unique_name,
)

pytestmark = pytest.mark.anyio


def make_settings(url: str, queue: str, **overrides: object) -> BatchConsumerSettings:
    values: dict[str, object] = {
        "url": url,
        "queue_name": queue,
        "prefetch_count": 200,
        "batch_size": 10,
        "batch_timeout": 30.0,
        "shutdown_timeout": 10.0,
        "connection_name": queue,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def queue(broker_url: str) -> AsyncIterator[str]:
    name = unique_name()
    yield name
    await cleanup(broker_url, queues=[name])


async def test_batches_flush_at_batch_size(broker_url: str, queue: str) -> None:
    batches: list[list[str]] = []
    seen = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        batches.append([m.message_id or "" for m in messages])
        for _ in messages:
            yield MessageResult.ACK
        if sum(map(len, batches)) == 30:
            seen.set()

    settings = make_settings(broker_url, queue, batch_size=10, batch_timeout=3600)
    async with batch_consumer(settings, handle):
        async with admin_channel(broker_url) as channel:
            ids = await publish_ids(channel, range(30), routing_key=queue)
        with anyio.fail_after(20):
            await seen.wait()
    assert [len(b) for b in batches] == [10, 10, 10]
    assert [i for b in batches for i in b] == ids
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


async def test_batch_flushes_at_timeout_after_first_message(
    broker_url: str, queue: str
) -> None:
    batches: list[list[str]] = []
    seen = anyio.Event()

    async def handle(messages: Sequence[Message]) -> list[MessageResult]:
        batches.append([m.message_id or "" for m in messages])
        seen.set()
        return [MessageResult.ACK] * len(messages)

    settings = make_settings(broker_url, queue, batch_size=100, batch_timeout=0.3)
    async with batch_consumer(settings, handle):
        async with admin_channel(broker_url) as channel:
            ids = await publish_ids(channel, range(3), routing_key=queue)
        started = anyio.current_time()
        with anyio.fail_after(10):
            await seen.wait()
        waited = anyio.current_time() - started
    assert batches == [ids]
    assert waited < 5
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


async def test_one_batch_of_acks_is_one_ack_frame(broker_url: str, queue: str) -> None:
    transport = CountingTransport(NativeTransport())
    done = anyio.Event()
    count = 0

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        nonlocal count
        for _ in messages:
            yield MessageResult.ACK
        count += len(messages)
        if count == 100:
            done.set()

    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(queue, durable=True)
        await publish_ids(channel, range(100), routing_key=queue)
    settings = make_settings(broker_url, queue, batch_size=100, prefetch_count=100)
    async with batch_consumer(settings, handle, transport=transport):
        with anyio.fail_after(20):
            await done.wait()
    assert transport.frames == [("ack", 100, True)]
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


async def test_results_ack_nack_requeue_and_immediate(
    broker_url: str, queue: str
) -> None:
    """ACK acks; NACK and exhausted REQUEUE reach a topic DLX bound on orders.#
    with the original routing key; REQUEUE republishes with x-retry-count + 1;
    REQUEUE_IMMEDIATE comes back redelivered."""
    exchange, dlx, dlq = unique_name("ex"), unique_name("dlx"), unique_name("dlq")
    plan = {str(i): list(MessageResult)[i % 4] for i in range(40)}
    seen: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    final: set[str] = set()
    done = anyio.Event()

    def result_for(message: Message) -> MessageResult:
        wanted = plan[message.message_id or ""]
        seen[message.message_id or ""].append(
            (message.retry_count, message.redelivered)
        )
        if wanted is MessageResult.REQUEUE_IMMEDIATE and message.redelivered:
            final.add(message.message_id or "")
            return MessageResult.ACK
        if wanted is MessageResult.REQUEUE and message.retry_count < 2:
            return wanted
        if wanted is not MessageResult.REQUEUE_IMMEDIATE:
            final.add(message.message_id or "")
        return wanted

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            yield result_for(message)
        if len(final) == len(plan):
            done.set()

    async with admin_channel(broker_url) as channel:
        await channel.exchange_declare(dlx, "topic", durable=False, auto_delete=False)
        await channel.queue_declare(dlq, durable=False)
        await channel.queue_bind(dlq, dlx, "orders.#")
    settings = make_settings(
        broker_url,
        queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        exchange_durable=False,
        dead_letter_exchange=dlx,
        max_requeue_attempts=2,
        batch_size=7,
        batch_timeout=0.2,
    )
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                await publish_ids(
                    channel, plan, exchange=exchange, routing_key="orders.created"
                )
            with anyio.fail_after(30):
                await done.wait()
        dead = await take(broker_url, dlq, 20)
    finally:
        await cleanup(broker_url, queues=[dlq], exchanges=[exchange, dlx])

    nacked = {i for i, r in plan.items() if r is MessageResult.NACK}
    requeued = {i for i, r in plan.items() if r is MessageResult.REQUEUE}
    assert sorted(ids_of(dead)) == sorted(nacked | requeued)
    for delivery in dead:
        assert delivery.routing_key == "orders.created"
        headers = delivery.properties.headers or {}
        if delivery.properties.message_id in requeued:
            assert headers["x-retry-count"] == 2
            assert headers["x-original-exchange"] == exchange
            assert headers["x-dead-letter-reason"] == "max-requeue-attempts"
        else:
            # dead_letter_strategy="publish" (the default): the library
            # publishes the dead letter with a confirm, then acks.
            assert headers["x-dead-letter-reason"] == "rejected"
            assert headers["x-original-exchange"] == exchange
    for message_id in requeued:
        assert [count for count, _ in seen[message_id]] == [0, 1, 2]
    for message_id, result in plan.items():
        if result is MessageResult.REQUEUE_IMMEDIATE:
            assert seen[message_id] == [(0, False), (0, True)]
        elif result in (MessageResult.ACK, MessageResult.NACK):
            assert seen[message_id] == [(0, False)]
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


BAD_RETRY_COUNTS: list[object] = [
    "3",
    -1,
    3.5,
    True,
    2**63 - 1,
    [1],
    bytearray(b"\xff"),
    {"a": 1},
    None,
]


async def test_bad_retry_header_is_dead_lettered_with_reason(
    broker_url: str, queue: str
) -> None:
    dlx, dlq = unique_name("dlx"), unique_name("dlq")
    handled: list[tuple[str, int]] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append((message.message_id or "", message.retry_count))
            yield MessageResult.ACK
        if len(handled) == 2:
            done.set()

    settings = make_settings(
        broker_url,
        queue,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        batch_timeout=0.1,
    )
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                for index, value in enumerate(BAD_RETRY_COUNTS):
                    await publish_ids(
                        channel,
                        [f"bad{index}"],
                        routing_key=queue,
                        headers={"x-retry-count": value},
                    )
                await publish_ids(channel, ["absent"], routing_key=queue)
                await publish_ids(
                    channel, ["good"], routing_key=queue, headers={"x-retry-count": 1}
                )
            with anyio.fail_after(20):
                await done.wait()
        dead = await take(broker_url, dlq, len(BAD_RETRY_COUNTS))
    finally:
        await cleanup(broker_url, queues=[dlq], exchanges=[dlx])
    assert sorted(handled) == [("absent", 0), ("good", 1)]
    assert sorted(ids_of(dead)) == sorted(
        f"bad{i}" for i in range(len(BAD_RETRY_COUNTS))
    )
    for delivery in dead:
        headers = delivery.properties.headers or {}
        assert str(headers["x-dead-letter-reason"]).startswith("invalid-retry-count")
        assert delivery.routing_key == queue


async def test_every_delivery_settled_exactly_once(broker_url: str, queue: str) -> None:
    """Too few results, a non-result, an exception and extra results: the
    unsettled ones get unhandled_exception_action (NACK here, so they land in the
    DLQ where we can see them); extra results are never applied."""
    dlx, dlq = unique_name("dlx"), unique_name("dlq")
    calls = 0
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        nonlocal calls
        calls += 1
        try:
            kind = messages[0].message_id or ""
            if kind.startswith("short"):
                yield MessageResult.ACK  # one result for four messages
            elif kind.startswith("junk"):
                yield MessageResult.ACK
                yield "ack"  # type: ignore[misc]
            elif kind.startswith("boom"):
                yield MessageResult.ACK
                raise RuntimeError("handler bug")
            else:
                for _ in messages:
                    yield MessageResult.ACK
                yield MessageResult.NACK  # extra: ignored
                yield MessageResult.NACK
        finally:
            if calls == 4:
                done.set()

    settings = make_settings(
        broker_url,
        queue,
        batch_size=4,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        unhandled_exception_action="NACK",
    )
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                for kind in ("short", "junk", "boom", "extra"):
                    await publish_ids(
                        channel, [f"{kind}{i}" for i in range(4)], routing_key=queue
                    )
            with anyio.fail_after(20):
                await done.wait()
        dead = await take(broker_url, dlq, 9)
    finally:
        await cleanup(broker_url, queues=[dlq], exchanges=[dlx])
    assert sorted(ids_of(dead)) == sorted(
        [
            "short1",
            "short2",
            "short3",
            "junk1",
            "junk2",
            "junk3",
            "boom1",
            "boom2",
            "boom3",
        ]
    )
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


async def test_num_workers_each_own_connection_hooks_once(
    broker_url: str, queue: str
) -> None:
    from amqp_batch import BatchConsumer

    events: list[str] = []
    handled: Counter[str] = Counter()
    done = anyio.Event()

    class Ingest(BatchConsumer[BatchConsumerSettings]):
        async def on_start(self) -> None:
            events.append("start")

        async def on_stop(self) -> None:
            events.append("stop")

        async def process_messages(
            self, messages: Sequence[Message]
        ) -> AsyncIterator[MessageResult]:
            await anyio.lowlevel.checkpoint()  # let other workers interleave
            for message in messages:
                handled[message.message_id or ""] += 1
                yield MessageResult.ACK
            if len(handled) == 60:
                done.set()

    consumer = Ingest(
        make_settings(
            broker_url,
            queue,
            num_workers=3,
            prefetch_count=10,
            batch_size=5,
            batch_timeout=0.1,
        )
    )
    async with consumer:
        assert consumer.is_running
        assert consumer.is_healthy
        health = consumer.health()
        assert [h.state.value for h in health] == ["consuming"] * 3
        async with admin_channel(broker_url) as channel:
            await publish_ids(channel, range(60), routing_key=queue)
        with anyio.fail_after(20):
            await done.wait()
    assert events == ["start", "stop"]
    assert not consumer.is_running
    assert not consumer.is_healthy
    assert set(handled.values()) == {1}
    assert sum(h.results.get("ack", 0) for h in consumer.health()) == 60
    assert [h.state.value for h in consumer.health()] == ["stopped"] * 3


class _InFlightTransport:
    """Wraps a transport; tracks how many republishes are in flight at once."""

    def __init__(self, inner: NativeTransport) -> None:
        self.inner = inner
        self.in_flight = 0
        self.max_in_flight = 0

    def open_session(self, spec: Any) -> Any:
        return self.inner.open_session(spec)

    def open_publisher(self, parameters: Any, *, declare: Any = ()) -> Any:
        transport = self

        @asynccontextmanager
        async def wrapped() -> AsyncIterator[Any]:
            async with transport.inner.open_publisher(
                parameters, declare=declare
            ) as publisher:
                yield _InFlightPublisher(publisher, transport)

        return wrapped()


class _InFlightPublisher:
    def __init__(self, inner: Any, counter: _InFlightTransport) -> None:
        self._inner = inner
        self._counter = counter

    def start_publish(self, body: bytes, **kwargs: Any) -> _InFlightConfirmation:
        counter = self._counter
        counter.in_flight += 1
        counter.max_in_flight = max(counter.max_in_flight, counter.in_flight)
        try:
            inner = self._inner.start_publish(body, **kwargs)
        except BaseException:
            counter.in_flight -= 1
            raise
        return _InFlightConfirmation(inner, counter)

    async def publish(self, body: bytes, **kwargs: Any) -> None:
        await self.start_publish(body, **kwargs).wait()


class _InFlightConfirmation:
    def __init__(self, inner: Any, counter: _InFlightTransport) -> None:
        self._inner = inner
        self._counter = counter

    @property
    def done(self) -> bool:
        return bool(self._inner.done)

    async def wait(self) -> None:
        try:
            await self._inner.wait()
        finally:
            self._counter.in_flight -= 1


async def test_requeue_heavy_batch_republishes_are_pipelined(
    broker_url: str, queue: str
) -> None:
    """A batch of 50 REQUEUEs has its copies in flight together (not one confirm
    round trip each); every copy arrives with x-retry-count 1, and once exhausted
    every one reaches the DLX under its original key. Nothing is lost."""
    exchange, dlx, dlq = unique_name("ex"), unique_name("dlx"), unique_name("dlq")
    seen: dict[str, list[int]] = defaultdict(list)
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen[message.message_id or ""].append(message.retry_count)
            yield MessageResult.REQUEUE
        if sum(map(len, seen.values())) == 100:
            done.set()

    transport = _InFlightTransport(NativeTransport())
    settings = make_settings(
        broker_url,
        queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        exchange_durable=False,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        max_requeue_attempts=1,
        batch_size=50,
        prefetch_count=100,
        batch_timeout=0.5,
    )
    try:
        async with admin_channel(broker_url) as channel:
            await channel.exchange_declare(exchange, "topic", durable=False)
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            async with admin_channel(broker_url) as channel:
                ids = await publish_ids(
                    channel, range(50), exchange=exchange, routing_key="orders.created"
                )
            with anyio.fail_after(30):
                await done.wait()
        dead = await take(broker_url, dlq, 50)
    finally:
        await cleanup(broker_url, queues=[dlq], exchanges=[exchange, dlx])
    assert transport.max_in_flight > 1
    assert {i: counts for i, counts in seen.items()} == {i: [0, 1] for i in ids}
    assert sorted(ids_of(dead), key=int) == ids
    for delivery in dead:
        assert delivery.routing_key == "orders.created"
        headers = delivery.properties.headers or {}
        assert headers["x-dead-letter-reason"] == "max-requeue-attempts"
        assert headers["x-retry-count"] == 1
    assert consumer.health()[0].results == {"requeue": 100, "dead_lettered": 50}
    async with admin_channel(broker_url) as channel:
        assert await drain(channel, queue) == []


async def test_a_copy_too_big_for_one_frame_is_dead_lettered_and_consuming_goes_on(
    broker_url: str, queue: str
) -> None:
    """A message whose headers nearly fill the broker's frame_max is REQUEUEd: its
    copy (with the retry headers added) no longer fits in one frame. The
    broker would close the publisher connection (501) on such a frame, so the
    copy is refused before it is sent and the original is dead-lettered; the
    consumer goes on with the next messages without reconnecting."""
    from pamqp import frame, header

    from amqp_batch._transport._base import Properties
    from pamqp_reference import properties_to_pamqp

    dlx, dlq = unique_name("dlx"), unique_name("dlq")
    frame_max = 131072  # RabbitMQ's default, which the client adopts

    def header_size(padding: int) -> int:
        props = Properties(message_id="big", headers={"pad": "x" * padding})
        return len(
            frame.marshal(header.ContentHeader(0, 1, properties_to_pamqp(props)), 1)
        )

    padding = frame_max - 40 - header_size(0)
    assert header_size(padding) == frame_max - 40
    seen: list[tuple[str, int]] = []
    all_seen = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen.append((message.message_id or "", message.retry_count))
            yield (
                MessageResult.REQUEUE
                if message.message_id == "big"
                else MessageResult.ACK
            )
        if len(seen) == 3:
            all_seen.set()

    settings = make_settings(
        broker_url,
        queue,
        batch_size=1,
        batch_timeout=0.05,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
    )
    try:
        async with batch_consumer(settings, handle) as consumer:
            async with admin_channel(broker_url) as channel:
                await channel.publish(
                    b"1",
                    routing_key=queue,
                    properties=Properties(
                        message_id="big", headers={"pad": "x" * padding}
                    ),
                )
                await publish_ids(channel, ["after-1", "after-2"], routing_key=queue)
            dead = await take(broker_url, dlq, 1)
            with anyio.fail_after(20):
                await all_seen.wait()
            health = consumer.health()
        assert ids_of(dead) == ["big"]
        assert seen == [("big", 0), ("after-1", 0), ("after-2", 0)]
        assert [h.reconnect_count for h in health] == [0]
        async with admin_channel(broker_url) as channel:
            assert await drain(channel, queue) == []
    finally:
        await cleanup(broker_url, queues=[dlq], exchanges=[dlx])
