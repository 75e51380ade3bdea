"""``max_concurrent_batches`` against a real broker, on asyncio and trio: at most N
batches of a worker in the handler at once, results still settled in tag order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from tests.support.rabbit_node import PrivateNode

from amqp_batch import BatchConsumerSettings, Message, MessageResult, batch_consumer
from amqp_batch._transport._native import NativeTransport
from consumer_support import (
    CountingTransport,
    admin_channel,
    cleanup,
    drain,
    publish_ids,
    unique_name,
)

pytestmark = [pytest.mark.anyio, pytest.mark.private_node]

BATCH = 5
BATCHES = 6


async def _all_delivered(node: PrivateNode, queue: str, count: int) -> None:
    """Wait until the broker has delivered every message (none ready, all
    unacknowledged): the batches the handler has not taken are in the worker."""
    with anyio.fail_after(20):
        while await anyio.to_thread.run_sync(node.queue_counts, queue) != (0, count):  # noqa: ASYNC110 - polling the broker
            await anyio.sleep(0.05)


@pytest.mark.parametrize("limit", [1, 2])
async def test_at_most_max_concurrent_batches_in_the_handler(
    private_node: PrivateNode, limit: int
) -> None:
    queue = unique_name()
    url = private_node.url
    active = 0
    max_active = 0
    # Held batches, by their first delivery tag (1, 6, ... in the one session).
    release = {1 + BATCH * i: anyio.Event() for i in range(limit)}
    all_held = anyio.Event()
    held = 0
    handled: list[str] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        nonlocal active, max_active, held
        active += 1
        max_active = max(max_active, active)
        try:
            gate = release.get(messages[0].delivery_tag)
            if gate is not None:
                held += 1
                if held == limit:
                    all_held.set()
                with anyio.fail_after(20):
                    await gate.wait()
            for message in messages:
                handled.append(message.message_id or "")
                yield MessageResult.ACK
        finally:
            active -= 1
        if len(handled) == BATCH * BATCHES:
            done.set()

    transport = CountingTransport(NativeTransport())
    settings = BatchConsumerSettings(
        url=url,
        queue_name=queue,
        prefetch_count=BATCH * BATCHES,
        batch_size=BATCH,
        batch_timeout=30,
        max_concurrent_batches=limit,
        connection_name=queue,
    )
    try:
        async with admin_channel(url) as channel:
            await channel.queue_declare(queue, durable=True)
            ids = await publish_ids(channel, range(BATCH * BATCHES), routing_key=queue)
        with anyio.fail_after(40):
            async with batch_consumer(settings, handle, transport=transport) as c:
                await all_held.wait()
                await _all_delivered(private_node, queue, BATCH * BATCHES)
                # Every other batch is ready in the worker; none may enter.
                await wait_all_tasks_blocked()
                assert active == limit
                if limit == 2:
                    # The later batch finishes first: its acks must wait for the
                    # earlier batch (tag order), so nothing is sent yet.
                    # The other runner then handles every remaining batch.
                    release[1 + BATCH].set()
                    expected = BATCH * (BATCHES - 1)
                    while len(handled) < expected:  # noqa: ASYNC110 - set by the handler
                        await anyio.sleep(0.005)
                    await wait_all_tasks_blocked()
                    assert transport.frames == []
                    # Health counts a result once its frame is sent: none yet.
                    assert c.health()[0].results == {}
                    assert active == 1
                for gate in release.values():
                    gate.set()
                await done.wait()
        assert max_active == limit
        assert sorted(handled, key=int) == ids
        if limit == 1:
            # One batch at a time: one coalesced ack per batch, in tag order.
            assert transport.frames == [
                ("ack", BATCH * (i + 1), True) for i in range(BATCHES)
            ]
        else:
            # Nothing was acked past the held first batch; once it finished, one
            # frame settled all of them.
            assert transport.frames == [("ack", BATCH * BATCHES, True)]
        async with admin_channel(url) as channel:
            assert await drain(channel, queue) == []
    finally:
        await cleanup(url, queues=[queue])
