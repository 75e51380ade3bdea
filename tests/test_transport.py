"""The transport contract against a real RabbitMQ, on asyncio and trio.

Non-destructive tests use ``broker_url`` (the private node, or AMQP_BATCH_TEST_URL);
tests that break things (closing connections, alarms, TLS) use the private node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import attrs
import pytest
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    AuthenticationError,
    ChannelClosed,
    ConnectionLost,
    ConnectionRefused,
    MessageReturned,
    ProtocolError,
    UnknownVirtualHost,
)
from amqp_batch._transport._base import Delivery, Properties, QueueSpec, SessionSpec
from amqp_batch._transport._native import Channel, connect
from amqp_batch._transport._url import ConnectionParameters, parse_url

pytestmark = pytest.mark.anyio


@pytest.fixture
def transport(transport_kind: str) -> object:
    """The transport under test (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


@pytest.fixture
def opens(transport_kind: str) -> object:
    """Opens a connection of the transport under test: the native ``connect``,
    or an aiormq publisher (connection + channel) for the handshake rows."""
    if transport_kind == "native":
        return connect
    return make_transport(transport_kind).open_publisher


@pytest.fixture
def free_port() -> int:
    """A local TCP port with nothing listening on it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def channel_on(url: str, **options: object) -> AsyncIterator[Channel]:
    """A connection and one channel on it."""
    params = attrs.evolve(parse_url(url), **options)  # type: ignore[arg-type]
    async with connect(params) as connection, connection.channel() as channel:
        yield channel


async def fresh_queue(channel: Channel, name: str, **arguments: object) -> str:
    """Declare ``name`` empty (deleting what was there)."""
    await channel.queue_delete(name)
    await channel.queue_declare(name, arguments=arguments or None)
    return name


async def publish_ids(channel: Channel, queue: str, count: int) -> None:
    """Publish message ids 0..count-1 to ``queue`` with confirms."""
    await channel.confirm_select()
    waiters = [
        channel.start_publish(
            str(i).encode(), routing_key=queue, properties=Properties(message_id=str(i))
        )
        for i in range(count)
    ]
    for waiter in waiters:
        assert waiter is not None
        await waiter.wait()


async def receive(session_deliveries: object, count: int) -> list[Delivery]:
    """Receive exactly ``count`` deliveries (bounded wait)."""
    received: list[Delivery] = []
    with anyio.fail_after(15):
        async for delivery in session_deliveries:  # type: ignore[attr-defined]
            received.append(delivery)
            if len(received) == count:
                break
    return received


# Handshake and connection errors ---------------------------------------------------


async def test_handshake_negotiates_and_names_the_connection(
    private_node, unique_name
) -> None:
    params = attrs.evolve(
        parse_url(private_node.url), connection_name=unique_name, heartbeat=7
    )
    async with connect(params) as connection:
        assert connection.heartbeat == 7  # smaller non-zero of ours (7) and 60
        assert connection.frame_max == 131072
        assert connection.server_properties["product"] == "RabbitMQ"
        names = await anyio.to_thread.run_sync(private_node.list_connections)
        assert unique_name in [c["name"] for c in names]


@over_transports
async def test_wrong_password_names_user_and_vhost_not_password(
    opens,
    broker_url,
) -> None:
    secret = "WRONG-pass-MARKER"
    params = attrs.evolve(parse_url(broker_url), password=secret)
    with pytest.raises(AuthenticationError) as info:
        async with opens(params):
            pass
    text = str(info.value)
    assert "'guest'" in text
    assert "vhost" in text
    assert secret not in text
    assert not info.value.retryable


@over_transports
async def test_unknown_vhost(opens, broker_url) -> None:
    params = attrs.evolve(parse_url(broker_url), virtual_host="no-such-vhost")
    with pytest.raises(UnknownVirtualHost, match="no-such-vhost") as info:
        async with opens(params):
            pass
    assert not info.value.retryable


@over_transports
async def test_refused_port_is_connection_refused(opens, free_port) -> None:
    params = ConnectionParameters(host="127.0.0.1", port=free_port)
    with pytest.raises(ConnectionRefused, match="cannot connect") as info:
        async with opens(params):
            pass
    assert info.value.retryable


@over_transports
async def test_non_amqp_peer_is_a_protocol_error(
    opens,
) -> None:
    async def http_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, http_server)
        params = ConnectionParameters(host="127.0.0.1", port=port)
        with pytest.raises(ProtocolError, match="does not speak AMQP"):
            async with opens(params):
                pass
        group.cancel_scope.cancel()


@over_transports
async def test_silent_peer_times_out(
    opens,
) -> None:
    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, silent)
        params = ConnectionParameters(
            host="127.0.0.1", port=port, connection_timeout=0.5
        )
        with pytest.raises(ConnectionRefused, match="timed out"):
            async with opens(params):
                pass
        group.cancel_scope.cancel()


# Channels and declarations ---------------------------------------------------------


async def test_declare_bind_purge_delete(broker_url, unique_name) -> None:
    async with channel_on(broker_url) as channel:
        exchange = f"{unique_name}.x"
        await channel.exchange_declare(exchange, "topic", auto_delete=False)
        queue = await fresh_queue(channel, unique_name)
        await channel.queue_bind(queue, exchange, "orders.#")
        await channel.confirm_select()
        await channel.publish(b"a", exchange=exchange, routing_key="orders.created")
        await channel.publish(b"b", exchange=exchange, routing_key="users.created")
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count == 1  # only the orders.# message was routed
        assert await channel.queue_purge(queue) == 1
        assert await channel.queue_delete(queue) == 0
        await channel.exchange_delete(exchange)
        with pytest.raises(ChannelClosed) as info_missing:
            await channel.queue_declare(queue, passive=True)
        assert info_missing.value.reply_code == 404


async def test_channel_error_leaves_the_connection_usable(
    broker_url, unique_name
) -> None:
    params = parse_url(broker_url)
    async with connect(params) as connection:
        async with connection.channel() as channel:
            await fresh_queue(channel, unique_name)
        async with connection.channel() as channel:
            with pytest.raises(ChannelClosed) as info:
                await channel.queue_declare(unique_name, arguments={"x-max-length": 10})
            assert info.value.reply_code == 406
            assert not channel.is_open
        async with connection.channel() as channel:
            info_ok = await channel.queue_declare(unique_name, passive=True)
            assert info_ok.queue == unique_name
            await channel.queue_delete(unique_name)
        assert connection.is_open


# Publishing ------------------------------------------------------------------------


async def test_mandatory_unroutable_publish_raises_returned(
    broker_url, unique_name
) -> None:
    async with channel_on(broker_url) as channel:
        await channel.confirm_select()
        with pytest.raises(MessageReturned) as info:
            await channel.publish(
                b"lost?", routing_key=f"{unique_name}.nowhere", mandatory=True
            )
        assert info.value.reply_code == 312
        # the channel is fine afterwards, and routable publishes confirm
        queue = await fresh_queue(channel, unique_name)
        await channel.publish(b"ok", routing_key=queue, mandatory=True)
        assert (await channel.queue_declare(queue, passive=True)).message_count == 1
        await channel.queue_delete(queue)


async def test_many_pipelined_publishes_all_confirm(broker_url, unique_name) -> None:
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
        await publish_ids(channel, queue, 2000)
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count == 2000
        await channel.queue_delete(queue)


async def test_returns_match_their_own_publish_among_many(
    broker_url, unique_name
) -> None:
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
        await channel.confirm_select()
        waiters = []
        for i in range(200):
            key = queue if i % 3 else f"{unique_name}.unroutable"
            waiters.append(
                (
                    i,
                    channel.start_publish(
                        str(i).encode(), routing_key=key, mandatory=True
                    ),
                )
            )
        returned = []
        for i, waiter in waiters:
            assert waiter is not None
            try:
                await waiter.wait()
            except MessageReturned:
                returned.append(i)
        assert returned == [i for i in range(200) if i % 3 == 0]
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count == 200 - len(returned)
        await channel.queue_delete(queue)


# Consuming -------------------------------------------------------------------------


@over_transports
async def test_deliveries_right_behind_consume_ok_are_not_dropped(
    transport, broker_url, unique_name
) -> None:
    """Regression: registering the consumer after consume-ok lost messages that the
    broker sends immediately behind it."""
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
        await publish_ids(channel, queue, 500)
    spec = SessionSpec(
        parameters=parse_url(broker_url), queue=queue, prefetch_count=1000
    )
    async with transport.open_session(spec) as session:
        received = await receive(session.deliveries, 500)
        assert [d.body for d in received] == [str(i).encode() for i in range(500)]
        await session.ack(received[-1].delivery_tag, multiple=True)
    async with channel_on(broker_url) as channel:
        assert (await channel.queue_declare(queue, passive=True)).message_count == 0
        await channel.queue_delete(queue)


@over_transports
async def test_one_mebibyte_body_across_many_frames(
    transport, broker_url, unique_name
) -> None:
    body = bytes(range(256)) * 4096
    async with channel_on(broker_url, frame_max=4096) as channel:
        queue = await fresh_queue(channel, unique_name)
        await channel.confirm_select()
        await channel.publish(body, routing_key=queue)
    params = attrs.evolve(parse_url(broker_url), frame_max=4096)
    spec = SessionSpec(parameters=params, queue=queue, prefetch_count=10)
    async with transport.open_session(spec) as session:
        (delivery,) = await receive(session.deliveries, 1)
        assert delivery.body == body
        await session.ack(delivery.delivery_tag)
    async with channel_on(broker_url) as channel:
        await channel.queue_delete(queue)


@over_transports
async def test_ack_nack_reject_with_multiple(
    transport, broker_url, unique_name
) -> None:
    async with channel_on(broker_url) as channel:
        dead = await fresh_queue(channel, f"{unique_name}.dlq")
        queue = await fresh_queue(
            channel,
            unique_name,
            **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead},
        )
        await publish_ids(channel, queue, 10)
    spec = SessionSpec(parameters=parse_url(broker_url), queue=queue, prefetch_count=10)
    async with transport.open_session(spec) as session:
        d = await receive(session.deliveries, 10)
        await session.ack(d[3].delivery_tag, multiple=True)  # 0..3 acked
        await session.reject(d[4].delivery_tag, requeue=False)  # 4 dead-lettered
        await session.nack(d[6].delivery_tag, multiple=True, requeue=False)  # 5, 6
        await session.nack(d[7].delivery_tag, requeue=True)  # 7 back to the queue
        await session.reject(d[8].delivery_tag, requeue=True)  # 8 back
        await session.ack(d[9].delivery_tag)
        (again, again2) = await receive(session.deliveries, 2)
        assert {again.body, again2.body} == {b"7", b"8"}
        assert again.redelivered and again2.redelivered
        await session.ack(again2.delivery_tag, multiple=True)
    async with channel_on(broker_url) as channel:
        assert (await channel.queue_declare(queue, passive=True)).message_count == 0
        dead_ids = []
        while (got := await channel.basic_get(dead)) is not None:
            dead_ids.append(got.body)
        assert sorted(dead_ids) == [b"4", b"5", b"6"]
        await channel.queue_delete(queue)
        await channel.queue_delete(dead)


@over_transports
async def test_our_cancel_ends_the_stream_and_requeues_the_rest(
    transport, broker_url, unique_name
) -> None:
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
        await publish_ids(channel, queue, 20)
    spec = SessionSpec(parameters=parse_url(broker_url), queue=queue, prefetch_count=5)
    async with transport.open_session(spec) as session:
        first = await receive(session.deliveries, 1)
        await session.ack(first[0].delivery_tag)
        await session.cancel()
        with anyio.fail_after(10):
            rest = [d async for d in session.deliveries]
        assert len(rest) <= 5  # at most the prefetch window
        assert not session.consumer_cancelled_by_broker
    async with channel_on(broker_url) as channel:
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count == 19  # unacked prefetched ones went back
        await channel.queue_delete(queue)


@over_transports
async def test_broker_cancel_when_the_queue_is_deleted(
    transport, broker_url, unique_name
) -> None:
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
    spec = SessionSpec(parameters=parse_url(broker_url), queue=queue, prefetch_count=5)
    async with transport.open_session(spec) as session:
        async with channel_on(broker_url) as other:
            await other.queue_delete(queue)
        with anyio.fail_after(10):
            leftovers = [d async for d in session.deliveries]
        assert leftovers == []
        assert session.consumer_cancelled_by_broker


async def test_a_tag_from_a_closed_channel_is_never_sent(
    broker_url, unique_name
) -> None:
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
        await publish_ids(channel, queue, 1)
    params = parse_url(broker_url)
    async with connect(params) as connection:
        async with connection.channel() as first:
            delivery = await first.basic_get(queue, no_ack=False)
            assert delivery is not None
        with pytest.raises(ChannelClosed):
            first.ack(delivery.delivery_tag)
        async with connection.channel() as second:
            # the message went back when the first channel closed
            again = await second.basic_get(queue, no_ack=True)
            assert again is not None
            assert again.redelivered
            await second.queue_delete(queue)
        assert connection.is_open


async def test_frames_queued_before_a_broker_channel_close_do_not_kill_the_connection(
    broker_url, unique_name
) -> None:
    """Regression (seen under trio): frames queued for a channel that the broker
    closes must never be written after our close-ok (the broker answers 504 and
    closes the whole connection)."""
    params = parse_url(broker_url)
    async with connect(params) as connection:
        for round_ in range(5):
            async with connection.channel() as channel:
                queue = await fresh_queue(channel, f"{unique_name}.{round_}")
                await channel.confirm_select()

                async def hammer(
                    channel: Channel = channel, queue: str = queue
                ) -> None:
                    for i in range(200):
                        if not channel.is_open:
                            return
                        try:
                            channel.start_publish(b"x", routing_key=queue)
                        except ChannelClosed:
                            return
                        if i % 20 == 0:
                            await anyio.lowlevel.checkpoint()

                async with anyio.create_task_group() as group:
                    for _ in range(4):
                        group.start_soon(hammer)
                    # a publish to a missing exchange: the broker closes the channel
                    channel.start_publish(b"boom", exchange=f"{unique_name}.missing")
                assert not channel.is_open or channel.close_error is None
            async with connection.channel() as check:
                await check.queue_delete(queue)
        assert connection.is_open


async def test_cancelled_publishers_never_corrupt_the_stream(
    broker_url, unique_name
) -> None:
    params = parse_url(broker_url)
    async with connect(params) as connection, connection.channel() as channel:
        queue = await fresh_queue(channel, unique_name)
        await channel.confirm_select()
        body = b"y" * 300_000  # several frames each
        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(lambda: channel.publish(body, routing_key=queue))
        await channel.publish(b"after", routing_key=queue)
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count >= 1
        messages = []
        while (got := await channel.basic_get(queue)) is not None:
            messages.append(got.body)
        assert messages[-1] == b"after"
        assert all(m == body for m in messages[:-1])  # each one whole
        await channel.queue_delete(queue)
    assert True


@over_transports
async def test_exit_releases_the_socket_even_when_cancelled(
    opens, private_node, unique_name
) -> None:
    params = attrs.evolve(parse_url(private_node.url), connection_name=unique_name)
    with anyio.CancelScope() as scope:
        async with opens(params):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    with anyio.fail_after(10):
        while unique_name in [  # noqa: ASYNC110 - polling the broker's state
            c["name"]
            for c in await anyio.to_thread.run_sync(private_node.list_connections)
        ]:
            await anyio.sleep(0.1)


# Faults on the private node --------------------------------------------------------


@over_transports
async def test_forced_close_raises_connection_lost_out_of_the_session(
    transport, private_node, unique_name
) -> None:
    params = attrs.evolve(parse_url(private_node.url), connection_name=unique_name)
    spec = SessionSpec(
        parameters=params,
        queue=unique_name,
        prefetch_count=10,
        queues=[QueueSpec(name=unique_name, durable=False, auto_delete=True)],
    )
    with pytest.raises(ConnectionLost) as info:
        async with transport.open_session(spec) as session:
            closed = await anyio.to_thread.run_sync(
                private_node.close_connection, unique_name
            )
            assert closed == 1
            with anyio.fail_after(10):
                async for _ in session.deliveries:
                    pass
                await anyio.sleep_forever()
    assert info.value.reply_code == 320
    assert info.value.retryable


@over_transports
async def test_stalled_peer_is_detected_by_heartbeats(opens, private_node) -> None:
    from tests.support.fault_proxy import FaultProxy

    async with FaultProxy("127.0.0.1", private_node.amqp_port) as proxy:
        params = ConnectionParameters(host="127.0.0.1", port=proxy.port, heartbeat=1)
        started = 0.0
        with pytest.raises(ConnectionLost, match="heartbeat") as info:
            async with opens(params):
                proxy.stall()
                started = anyio.current_time()
                with anyio.fail_after(10):
                    await anyio.sleep_forever()
        detected_after = anyio.current_time() - started
        # aiormq checks for silence once per max(1, heartbeat // 2) s
        assert detected_after <= 2 * 1 + (0.5 if opens is connect else 1.5)
        assert info.value.retryable


async def test_publish_waits_while_the_connection_is_blocked(
    private_node, unique_name
) -> None:
    params = parse_url(private_node.url)
    async with connect(params) as connection, connection.channel() as channel:
        queue = await fresh_queue(channel, unique_name)
        await channel.confirm_select()
        await channel.publish(b"before", routing_key=queue)
        await anyio.to_thread.run_sync(private_node.set_memory_alarm)
        try:
            # RabbitMQ blocks a connection when it next publishes during an alarm;
            # the probes' confirms only come after the alarm, so don't await them.
            with anyio.fail_after(15):
                while not connection.blocked:
                    channel.start_publish(b"probe", routing_key=queue)
                    await anyio.sleep(0.05)
            done = anyio.Event()

            async def publish_blocked() -> None:
                await channel.publish(b"while-blocked", routing_key=queue)
                done.set()

            async with anyio.create_task_group() as group:
                group.start_soon(publish_blocked)
                with anyio.move_on_after(1):
                    await done.wait()
                assert not done.is_set()  # held back while blocked
                await anyio.to_thread.run_sync(private_node.clear_memory_alarm)
                with anyio.fail_after(15):
                    await done.wait()
        finally:
            await anyio.to_thread.run_sync(private_node.clear_memory_alarm)
        assert not connection.blocked
        bodies = []
        while (got := await channel.basic_get(queue)) is not None:
            bodies.append(got.body)
        assert bodies[0] == b"before"
        assert bodies[-1] == b"while-blocked"
        await channel.queue_delete(queue)


# TLS -------------------------------------------------------------------------------


async def test_tls_with_the_right_ca_connects(private_node, unique_name) -> None:
    params = parse_url(
        private_node.tls_url, ssl_context=private_node.client_ssl_context()
    )
    for _ in range(3):  # regression: TLS close raised APPLICATION_DATA_AFTER_CLOSE
        async with connect(params) as connection, connection.channel() as channel:
            queue = await fresh_queue(channel, unique_name)
            await publish_ids(channel, queue, 3)
            got = await channel.basic_get(queue)
            assert got is not None and got.body == b"0"
            await channel.queue_delete(queue)


@over_transports
async def test_tls_forced_close_is_connection_lost(
    opens, private_node, unique_name
) -> None:
    params = attrs.evolve(
        parse_url(private_node.tls_url, ssl_context=private_node.client_ssl_context()),
        connection_name=unique_name,
    )
    with pytest.raises(ConnectionLost) as info:
        async with opens(params):
            await anyio.to_thread.run_sync(private_node.close_connection, unique_name)
            with anyio.fail_after(10):
                await anyio.sleep_forever()
    assert info.value.reply_code == 320


@over_transports
async def test_tls_with_a_wrong_ca_is_refused(opens, private_node) -> None:
    import trustme

    other_ca = trustme.CA()
    import ssl

    context = ssl.create_default_context()
    other_ca.configure_trust(context)
    params = parse_url(private_node.tls_url, ssl_context=context)
    with pytest.raises(ConnectionRefused, match="certificate verif") as info:
        async with opens(params):
            pass
    assert not info.value.retryable


@over_transports
async def test_tls_with_a_wrong_hostname_is_refused(opens, private_node) -> None:
    """The broker's certificate names localhost and 127.0.0.1; reached as 127.0.0.2
    (through a plain TCP forwarder) the right CA must still be refused."""
    from tests.support.fault_proxy import FaultProxy

    async with FaultProxy(
        "127.0.0.1", private_node.amqps_port, listen_host="127.0.0.2"
    ) as proxy:
        params = attrs.evolve(
            parse_url(
                private_node.tls_url, ssl_context=private_node.client_ssl_context()
            ),
            host="127.0.0.2",
            port=proxy.port,
        )
        with pytest.raises(ConnectionRefused, match="certificate verification") as info:
            async with opens(params):
                pass
        assert "127.0.0.2" in str(info.value)
        assert not info.value.retryable


@over_transports
async def test_tls_without_verification_is_explicit_and_logged(
    opens, private_node, caplog
) -> None:
    params = parse_url(private_node.tls_url, verify_tls=False)
    with caplog.at_level(logging.WARNING, logger="amqp_batch.transport"):
        async with opens(params) as connection:
            assert connection.is_open
    assert any("verification is OFF" in r.getMessage() for r in caplog.records)


@over_transports
async def test_publisher_session_confirms(transport, broker_url, unique_name) -> None:
    params = parse_url(broker_url)
    async with transport.open_publisher(
        params, declare=[QueueSpec(name=unique_name, durable=False)]
    ) as publisher:
        await publisher.publish(b"hello", routing_key=unique_name)
        with pytest.raises(MessageReturned):
            await publisher.publish(
                b"x", routing_key=f"{unique_name}.none", mandatory=True
            )
    async with channel_on(broker_url) as channel:
        info = await channel.queue_declare(unique_name, passive=True)
        assert info.message_count == 1
        await channel.queue_delete(unique_name)


@over_transports
async def test_cancelled_session_exits_promptly_and_flushes_queued_acks(
    transport, broker_url, unique_name
) -> None:
    """Cancelling the caller must not wait for close replies that the (cancelled)
    reader can no longer read, and acks queued just before are still written."""
    async with channel_on(broker_url) as channel:
        queue = await fresh_queue(channel, unique_name)
        await publish_ids(channel, queue, 10)
    spec = SessionSpec(parameters=parse_url(broker_url), queue=queue, prefetch_count=10)
    with anyio.fail_after(2):  # well under the 5 s graceful-close bounds
        with anyio.CancelScope() as scope:
            async with transport.open_session(spec) as session:
                received = await receive(session.deliveries, 10)
                await session.ack(received[-1].delivery_tag, multiple=True)
                scope.cancel()
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with channel_on(broker_url) as channel:
        info = await channel.queue_declare(queue, passive=True)
        assert info.message_count == 0  # the acks went out before the socket closed
        await channel.queue_delete(queue)


async def test_exchange_to_exchange_binding(broker_url, unique_name) -> None:
    async with channel_on(broker_url) as channel:
        source, destination = f"{unique_name}.src", f"{unique_name}.dst"
        await channel.exchange_declare(source, "fanout")
        await channel.exchange_declare(destination, "direct")
        await channel.exchange_bind(destination, source)
        queue = await fresh_queue(channel, unique_name)
        await channel.queue_bind(queue, destination, "k")
        await channel.confirm_select()
        await channel.publish(b"via-source", exchange=source, routing_key="k")
        got = await channel.basic_get(queue)
        assert got is not None
        assert (got.body, got.exchange) == (b"via-source", source)
        await channel.queue_delete(queue)
        await channel.exchange_delete(source)
        await channel.exchange_delete(destination)


async def test_we_send_heartbeats_on_an_idle_connection(private_node) -> None:
    """With a 1 s heartbeat the broker closes a client that stays silent for more
    than two intervals; ours must keep the idle connection alive."""
    params = attrs.evolve(parse_url(private_node.url), heartbeat=1)
    async with connect(params) as connection, connection.channel() as channel:
        assert connection.heartbeat == 1
        await anyio.sleep(3.5)  # the workload: be idle for 3.5 heartbeat intervals
        info = await channel.queue_declare("", exclusive=True)
        assert info.queue.startswith("amq.gen-")
        assert connection.is_open


async def test_password_never_reaches_logs_or_errors(private_node, caplog) -> None:
    marker = "PW-MARKER-31337"
    url = f"amqp://guest:{marker}@127.0.0.1:{private_node.amqp_port}/?name=leaky"
    params = parse_url(url)
    texts = [repr(params), str(params)]
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthenticationError) as info:
            async with connect(params):
                pass
        texts += [str(info.value), repr(info.value)]
        import traceback

        texts.append("".join(traceback.format_exception(info.value)))
        good = attrs.evolve(params, password="guest")
        async with connect(good) as connection, connection.channel():
            texts.append(repr(connection))
    texts += [record.getMessage() for record in caplog.records]
    assert caplog.records  # DEBUG logging did capture the connection's life
    assert not [text for text in texts if marker in text]


async def test_channel_numbers_are_not_reused_at_once(broker_url) -> None:
    """A closed channel's number is not handed out again right away, so a frame
    still in flight for it (a close-ok crossing the broker's own channel.close)
    cannot reach a new channel (it would fail the connection)."""
    async with connect(parse_url(broker_url)) as connection:
        numbers = []
        for _ in range(3):
            async with connection.channel() as channel:
                numbers.append(channel.channel_id)
        assert numbers == [1, 2, 3]
        assert connection.is_open


def _tuned_connections(node) -> dict[str, tuple[int, int, int]]:
    """Client connection name -> (heartbeat, frame_max, channel_max), as the
    broker has them for the connection (what both sides agreed in tune-ok)."""
    import re

    output = node.ctl(
        "list_connections",
        "timeout",
        "frame_max",
        "channel_max",
        "client_properties",
        "-q",
        "-s",
    )
    tuned: dict[str, tuple[int, int, int]] = {}
    for line in output.splitlines():
        parts = line.split("\t", 3)
        match = re.search(r'\{"connection_name",(?:longstr,)?"([^"]*)"\}', line)
        if len(parts) == 4 and match is not None:
            heartbeat, frame_max, channel_max = (int(p) for p in parts[:3])
            tuned[match.group(1)] = (heartbeat, frame_max, channel_max)
    return tuned


@over_transports
@pytest.mark.parametrize(
    ("query", "agreed"),
    [
        # ours smaller than the broker's (60 s, 131072, 2047): ours
        ("heartbeat=7&frame_max=8192&channel_max=9", (7, 8192, 9)),
        # ours larger, or 0 (no preference): the broker's
        ("heartbeat=600&frame_max=1048576&channel_max=4000", (60, 131072, 2047)),
        ("heartbeat=0&frame_max=0&channel_max=0", (60, 131072, 2047)),
    ],
    ids=["ours-smaller", "ours-larger", "ours-zero"],
)
async def test_url_heartbeat_frame_max_channel_max_are_negotiated(
    transport, private_node, unique_name, query, agreed
) -> None:
    """Each of heartbeat, frame_max and channel_max is the smaller non-zero of the
    URL's and the broker's, on every transport; the broker reports the agreed
    values for the connection, and a body larger than frame_max crosses it in
    frames of the agreed size (a larger frame would make the broker close the
    connection with 501)."""
    url = f"{private_node.url}?name={unique_name}&{query}"
    body = bytes(range(256)) * 100  # 25,600 bytes: several 8 KiB frames
    async with transport.open_publisher(
        parse_url(url), declare=[QueueSpec(name=unique_name, durable=False)]
    ) as publisher:
        tuned = await anyio.to_thread.run_sync(_tuned_connections, private_node)
        await publisher.publish(body, routing_key=unique_name)
        assert await publisher.queue_counts(unique_name) == (1, 0)
    assert tuned[unique_name] == agreed
    async with channel_on(private_node.url) as channel:
        delivery = await channel.basic_get(unique_name, no_ack=True)
        assert delivery is not None and delivery.body == body
        await channel.queue_delete(unique_name)
