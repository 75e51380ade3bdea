"""Consumer (single-message), Publisher fan-in, serve() in a task group, stop()
from a handler — against a real broker, on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Consumer,
    ConsumerSettings,
    Message,
    MessageResult,
    Publisher,
)
from consumer_support import admin_channel, cleanup, drain, publish_ids, unique_name

pytestmark = pytest.mark.anyio


async def test_fan_in_pipeline_with_single_message_consumers(broker_url: str) -> None:
    """Two source consumers republish through a Publisher to a staging exchange;
    a batch writer consumes the staging queue."""
    sources = [unique_name("src"), unique_name("src")]
    staging_exchange, staging_queue = unique_name("stage-ex"), unique_name("stage")
    written: list[str] = []
    done = anyio.Event()

    class Source(Consumer[ConsumerSettings]):
        def __init__(self, settings: ConsumerSettings, publisher: Publisher) -> None:
            super().__init__(settings)
            self.publisher = publisher

        async def process_message(self, message: Message) -> MessageResult:
            await self.publisher.publish(
                message.body,
                exchange=staging_exchange,
                routing_key="staged",
                headers={"source": self.settings.queue_name},
                message_id=message.message_id,
            )
            return MessageResult.ACK

    class Writer(BatchConsumer[BatchConsumerSettings]):
        async def process_messages(
            self, messages: Sequence[Message]
        ) -> AsyncIterator[MessageResult]:
            for message in messages:
                written.append(f"{message.headers['source']}:{message.message_id}")
                yield MessageResult.ACK
            if len(written) == 20:
                done.set()

    writer = Writer(
        BatchConsumerSettings(
            url=broker_url,
            queue_name=staging_queue,
            exchange_name=staging_exchange,
            routing_key="staged",
            batch_size=8,
            batch_timeout=0.1,
            prefetch_count=20,
        )
    )
    try:
        async with anyio.create_task_group() as group:
            await group.start(writer.serve)
            async with Publisher(broker_url, connection_name="fan-in") as publisher:
                for queue in sources:
                    await group.start(
                        Source(
                            ConsumerSettings(url=broker_url, queue_name=queue),
                            publisher,
                        ).serve
                    )
                async with admin_channel(broker_url) as channel:
                    for queue in sources:
                        await publish_ids(channel, range(10), routing_key=queue)
                with anyio.fail_after(20):
                    await done.wait()
                group.cancel_scope.cancel()
    finally:
        await cleanup(
            broker_url, queues=[*sources, staging_queue], exchanges=[staging_exchange]
        )
    assert sorted(written) == sorted(f"{q}:{i}" for q in sources for i in range(10))


async def test_stop_from_a_handler_finishes_the_batch(broker_url: str) -> None:
    queue = unique_name()
    handled: list[str] = []

    class StopsItself(BatchConsumer[BatchConsumerSettings]):
        async def process_messages(
            self, messages: Sequence[Message]
        ) -> AsyncIterator[MessageResult]:
            await self.stop()  # only requests: this batch still finishes
            for message in messages:
                handled.append(message.message_id or "")
                yield MessageResult.ACK

    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(queue, durable=True)
        ids = await publish_ids(channel, range(3), routing_key=queue)
    consumer = StopsItself(
        BatchConsumerSettings(url=broker_url, queue_name=queue, batch_timeout=0.1)
    )
    try:
        with anyio.fail_after(20):
            await consumer.serve()
        async with admin_channel(broker_url) as channel:
            assert await drain(channel, queue) == []
    finally:
        await cleanup(broker_url, queues=[queue])
    assert handled == ids
    assert not consumer.is_running
    with pytest.raises(RuntimeError, match="only be started once"):
        await consumer.serve()


async def test_publisher_mandatory_unroutable_raises(broker_url: str) -> None:
    from amqp_batch import MessageReturned

    async with Publisher(broker_url) as publisher:
        with pytest.raises(MessageReturned):
            await publisher.publish(
                b"x", routing_key=unique_name("nowhere"), mandatory=True
            )
