"""Fail-fast errors and reconnection, against a real broker, on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import attrs
import pytest
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    AuthenticationError,
    BatchConsumerSettings,
    ChannelClosed,
    Message,
    MessageResult,
    UnknownVirtualHost,
    batch_consumer,
)
from amqp_batch._transport._url import parse_url
from consumer_support import admin_channel, cleanup, drain, publish_ids, unique_name

pytestmark = pytest.mark.anyio


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The consumer's transport (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


async def _ack_all(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    for _ in messages:
        yield MessageResult.ACK


def _url_with(url: str, **changes: object) -> str:
    params = attrs.evolve(parse_url(url), **changes)  # type: ignore[misc]
    from urllib.parse import quote

    return (
        f"amqp://{quote(params.username, safe='')}:{quote(params.password, safe='')}"
        f"@{params.host}:{params.port}/{quote(params.virtual_host, safe='')}"
    )


@over_transports
async def test_bad_credentials_fail_fast(broker_url: str, transport: Any) -> None:
    marker = "MARKER-pw-4711"
    settings = BatchConsumerSettings(
        url=_url_with(broker_url, password=marker),
        queue_name=unique_name(),
        reconnect_backoff_base=0.01,
    )
    with anyio.fail_after(15), pytest.raises(AuthenticationError) as caught:
        async with batch_consumer(settings, _ack_all, transport=transport):
            pytest.fail("consumer must not start")
    assert marker not in str(caught.value)
    assert marker not in repr(settings)


@over_transports
async def test_unknown_vhost_fails_fast(broker_url: str, transport: Any) -> None:
    settings = BatchConsumerSettings(
        url=_url_with(broker_url, virtual_host="amqp-batch-no-such-vhost"),
        queue_name=unique_name(),
    )
    with anyio.fail_after(15), pytest.raises(UnknownVirtualHost):
        async with batch_consumer(settings, _ack_all, transport=transport):
            pytest.fail("consumer must not start")


@over_transports
async def test_queue_redeclared_with_other_arguments_fails_fast(
    broker_url: str, transport: Any
) -> None:
    queue = unique_name()
    async with admin_channel(broker_url) as channel:
        await channel.queue_declare(queue, durable=True, arguments={"x-max-length": 10})
    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        queue_arguments={"x-max-length": 20},
        num_workers=2,
    )
    try:
        with anyio.fail_after(15), pytest.raises(ChannelClosed) as caught:
            async with batch_consumer(settings, _ack_all, transport=transport):
                pytest.fail("consumer must not start")
        assert caught.value.reply_code == 406
    finally:
        await cleanup(broker_url, queues=[queue])


@pytest.mark.private_node
@over_transports
async def test_cut_connection_only_that_worker_reconnects(
    private_node: object, transport: Any
) -> None:
    """Closing one worker's connection on the broker makes that worker back off
    and resume; the other keeps consuming; nothing is lost; results of the dead
    session are never sent on the new channel (the broker would close it)."""
    url: str = private_node.url  # type: ignore[attr-defined]
    queue = unique_name()
    handled: list[str] = []
    first_batch = anyio.Event()
    cut_done = anyio.Event()
    all_seen = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        if not first_batch.is_set():
            first_batch.set()
            # This batch belongs to the session that is about to be cut.
            await cut_done.wait()
        for message in messages:
            handled.append(message.message_id or "")
            yield MessageResult.ACK
        if len(set(handled)) == 40:
            all_seen.set()

    settings = BatchConsumerSettings(
        url=url,
        queue_name=queue,
        num_workers=2,
        prefetch_count=10,
        batch_size=5,
        batch_timeout=0.1,
        connection_name=queue,
        reconnect_backoff_base=0.05,
        reconnect_backoff_cap=0.2,
    )
    try:
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            async with admin_channel(url) as channel:
                ids = await publish_ids(channel, range(40), routing_key=queue)
            with anyio.fail_after(20):
                await first_batch.wait()
                # Which worker holds the blocked batch is not known; cut worker 0.
                await anyio.to_thread.run_sync(
                    private_node.close_connection,
                    f"{queue}-w0",  # type: ignore[attr-defined]
                )
                cut_done.set()
                await all_seen.wait()
                # The other worker may have handled the rest before this one
                # is back: wait for its reconnect.
                while consumer.health()[0].reconnect_count < 1:  # noqa: ASYNC110 - health() is a snapshot API
                    await anyio.sleep(0.01)
            health = consumer.health()
        assert health[0].reconnect_count >= 1
        assert health[1].reconnect_count == 0
        assert health[0].last_error is not None
        assert sorted(set(handled), key=int) == ids
        async with admin_channel(url) as channel:
            assert await drain(channel, queue) == []
    finally:
        await cleanup(url, queues=[queue])
