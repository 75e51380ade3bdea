"""Riding out a dependency outage, on a real broker, on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest

from amqp_batch import BatchConsumerSettings, Message, MessageResult, batch_consumer
from consumer_support import admin_channel, cleanup, publish_ids, unique_name


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_delivery_count_from_a_quorum_queue(
    broker_url: str, queue_type: str
) -> None:
    """``Message.delivery_count`` is the quorum queue's ``x-delivery-count``:
    0, 1, 2 over two REQUEUE_IMMEDIATEs; a classic queue does not count (0)."""
    queue = unique_name()
    counts: list[int] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            counts.append(message.delivery_count)
            if len(counts) < 3:
                yield MessageResult.REQUEUE_IMMEDIATE
            else:
                done.set()
                yield MessageResult.ACK

    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        queue_arguments={"x-queue-type": queue_type},
        batch_size=1,
        batch_timeout=0.05,
        connection_name=queue,
    )
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["m"], routing_key=queue)
            with anyio.fail_after(20):
                await done.wait()
    finally:
        await cleanup(broker_url, queues=[queue])
    assert counts == ([0, 1, 2] if queue_type == "quorum" else [0, 0, 0])
