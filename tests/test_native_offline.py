"""The native transport against a scripted broker, offline, on asyncio and trio.

Each test hands ``connect()`` (or ``NativeTransport``) a :class:`ScriptedNetwork`:
the client runs unchanged on an in-memory byte stream, and a script plays the
broker's side frame by frame (``tests/support/scripted_broker.py``). So the rare
broker behaviours (a return before its ack, a channel.close crossing our acks, a
silent or garbled peer) are reproduced exactly, and no test needs RabbitMQ. The
broker tests in ``test_transport.py`` check the same client against the real thing.
"""

from __future__ import annotations

import functools
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from pamqp import commands
from pamqp.header import ContentHeader
from tests.support.scripted_broker import (
    BrokerPeer,
    Script,
    ScriptedNetwork,
    content_frames,
    converse,
    deliver_frames,
)

from amqp_batch import (
    AuthenticationError,
    ChannelClosed,
    ConnectionLost,
    ConnectionRefused,
    MessageNacked,
    MessageReturned,
    ProtocolError,
    UnknownVirtualHost,
)
from amqp_batch._transport._base import Delivery, SessionSpec
from amqp_batch._transport._native import (
    Channel,
    Connection,
    NativeTransport,
    NetworkBackend,
    connect,
)
from amqp_batch._transport._native._framing import marshal_method
from amqp_batch._transport._url import ConnectionParameters, parse_url

pytestmark = pytest.mark.anyio

PARAMS = ConnectionParameters(host="broker.test", password="s3cret-MARKER")


async def connected(
    broker: Script,
    body: Callable[[Connection], Awaitable[Any]],
    params: ConnectionParameters = PARAMS,
) -> ScriptedNetwork:
    """Run ``body(connection)`` inside ``connect()`` against the script ``broker``."""
    network = ScriptedNetwork(broker)

    async def client() -> None:
        async with connect(params, network=network) as connection:
            await body(connection)

    await converse(network, client)
    return network


async def on_channel(broker: Script, body: Callable[[Channel], Awaitable[Any]]) -> None:
    """Like :func:`connected`, with one channel open for ``body(channel)``."""

    async def with_channel(connection: Connection) -> None:
        async with connection.channel() as channel:
            await body(channel)

    await connected(broker, with_channel)


async def forever(connection: Connection) -> None:
    """A client body that waits until the connection fails."""
    await anyio.sleep_forever()


def peer_method(method: Any, channel: int) -> bytes:
    """One method frame, encoded by the client's own encoder."""
    return marshal_method(method, channel)


async def skip_content(peer: BrokerPeer) -> None:
    """Read a one-frame message's content header and body."""
    await peer.expect(ContentHeader)
    await peer.receive()


async def nothing(connection: Connection) -> None:
    """A client body that does nothing."""


def test_the_scripted_network_is_a_network_backend() -> None:
    assert isinstance(ScriptedNetwork(), NetworkBackend)


# Handshake failures ----------------------------------------------------------------


async def test_access_refused_is_an_authentication_error_without_the_password() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.receive()  # the protocol header
        await peer.send(commands.Connection.Start(server_properties={}))
        start_ok = await peer.expect(commands.Connection.StartOk)
        assert start_ok.mechanism == "PLAIN"
        await peer.send(
            commands.Connection.Close(403, "ACCESS_REFUSED - Login refused", 0, 0)
        )

    with pytest.raises(AuthenticationError) as info:
        await connected(broker, nothing)
    assert "'guest'" in str(info.value) and "vhost" in str(info.value)
    assert "s3cret-MARKER" not in str(info.value)
    assert info.value.reply_code == 403
    assert not info.value.retryable


@pytest.mark.parametrize(
    ("capabilities", "error"),
    [
        ({}, AuthenticationError),
        ({"authentication_failure_close": True}, ConnectionRefused),
    ],
)
async def test_hang_up_during_authentication(
    capabilities: dict[str, bool], error: type[Exception]
) -> None:
    """Only a broker that cannot say "access refused" hangs up on bad credentials;
    one that can and still hangs up failed for another reason (retried)."""

    async def broker(peer: BrokerPeer) -> None:
        await peer.receive()  # protocol header
        properties = {"capabilities": capabilities}
        await peer.send(commands.Connection.Start(server_properties=properties))
        await peer.expect(commands.Connection.StartOk)

    with pytest.raises(error):
        await connected(broker, nothing)


async def test_a_protocol_header_reply_is_a_protocol_error() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.receive()
        await peer.send_raw(b"AMQP\x00\x00\x09\x01")  # RabbitMQ: "not that one"

    with pytest.raises(ProtocolError, match="does not speak AMQP 0-9-1"):
        await connected(broker, nothing)


async def test_unknown_vhost_is_530() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.receive()
        await peer.send(commands.Connection.Start(server_properties={}))
        await peer.expect(commands.Connection.StartOk)
        await peer.send(commands.Connection.Tune(2047, 131072, 60))
        await peer.expect(commands.Connection.TuneOk)
        opened = await peer.expect(commands.Connection.Open)
        assert opened.virtual_host == "no-such"
        await peer.send(
            commands.Connection.Close(530, "NOT_ALLOWED - vhost not found", 0, 0)
        )

    params = attrs.evolve(PARAMS, virtual_host="no-such")
    with pytest.raises(UnknownVirtualHost, match="no-such") as info:
        await connected(broker, nothing, params)
    assert not info.value.retryable


async def test_a_broker_without_plain_is_refused() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.receive()
        start = commands.Connection.Start(server_properties={}, mechanisms="EXTERNAL")
        await peer.send(start)
        await peer.wait_closed()

    with pytest.raises(ProtocolError, match="PLAIN"):
        await connected(broker, nothing)


async def test_a_silent_peer_times_out_as_connection_refused() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.wait_closed()

    params = attrs.evolve(PARAMS, connection_timeout=0.2)
    with pytest.raises(ConnectionRefused, match=r"timed out after 0\.2 s") as info:
        await connected(broker, nothing, params)
    assert info.value.retryable


async def test_an_opener_failure_is_connection_refused() -> None:
    with pytest.raises(ConnectionRefused, match="cannot connect") as info:
        await connected_without_scripts()
    assert info.value.retryable


async def connected_without_scripts() -> None:
    network = ScriptedNetwork()
    async with connect(PARAMS, network=network):
        pass  # pragma: no cover - the opener fails


@pytest.mark.parametrize("url", ["amqp://broker.test/", "amqps://broker.test/"])
async def test_the_opener_gets_tls_only_for_amqps(url: str) -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        await peer.serve_close()

    network = await connected(broker, nothing, parse_url(url))
    tls = url.startswith("amqps")
    (opened,) = network.opened
    assert (opened["host"], opened["port"]) == ("broker.test", 5671 if tls else 5672)
    if tls:
        assert isinstance(opened["ssl_context"], ssl.SSLContext)
    else:
        assert opened["ssl_context"] is None


async def test_a_connection_runs_once() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        await peer.serve_close()

    async def body(connection: Connection) -> None:
        with pytest.raises(RuntimeError, match="already running"):
            async with connection.running():
                pass  # pragma: no cover - refused
        assert connection.is_open

    await connected(broker, body)


# Tune negotiation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "agreed"),
    [
        # (heartbeat, frame_max, channel_max) from the client, the broker, agreed
        ((7, 0, 2047), (60, 131072, 0), (7, 131072, 2047)),
        ((0, 8192, 0), (60, 4096, 100), (60, 4096, 100)),
        ((30, 0, 0), (0, 0, 0), (30, 131072, 65535)),
        ((0, 0, 2047), (0, 131072, 2047), (0, 131072, 2047)),
    ],
)
async def test_tune_takes_the_smaller_non_zero_value(
    ours: tuple[int, int, int],
    theirs: tuple[int, int, int],
    agreed: tuple[int, int, int],
) -> None:
    sent: list[commands.Connection.TuneOk] = []

    async def broker(peer: BrokerPeer) -> None:
        heartbeat, frame_max, channel_max = theirs
        sent.append(
            await peer.handshake(
                heartbeat=heartbeat, frame_max=frame_max, channel_max=channel_max
            )
        )
        await peer.serve_close()

    async def body(connection: Connection) -> None:
        got = (connection.heartbeat, connection.frame_max, connection.channel_max)
        assert got == agreed

    heartbeat, frame_max, channel_max = ours
    params = attrs.evolve(
        PARAMS, heartbeat=heartbeat, frame_max=frame_max, channel_max=channel_max
    )
    await connected(broker, body, params)
    assert (sent[0].heartbeat, sent[0].frame_max, sent[0].channel_max) == agreed


async def test_a_publish_is_split_at_the_negotiated_frame_max() -> None:
    body = bytes(range(256)) * 40  # 10240 bytes

    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake(frame_max=4096)
        channel = await peer.open_channel()
        await peer.expect(commands.Basic.Publish, channel)
        await peer.expect(ContentHeader, channel)
        parts = [(await peer.receive())[1].value for _ in range(3)]
        assert [len(p) for p in parts] == [4088, 4088, 2064]
        assert b"".join(parts) == body
        await peer.serve_close()

    async def publish(channel: Channel) -> None:
        await channel.publish(body, routing_key="q")

    await on_channel(broker, publish)


# Confirms and returns --------------------------------------------------------------


async def confirm_channel(peer: BrokerPeer) -> int:
    """Handshake, channel.open and confirm.select; return the channel number."""
    await peer.handshake()
    channel = await peer.open_channel()
    await peer.answer(commands.Confirm.Select, commands.Confirm.SelectOk(), channel)
    return channel


async def test_ack_multiple_and_nack_settle_the_right_publishes() -> None:
    async def broker(peer: BrokerPeer) -> None:
        channel = await confirm_channel(peer)
        for _ in range(3):
            await peer.expect(commands.Basic.Publish, channel)
            await skip_content(peer)
        await peer.send(
            commands.Basic.Ack(2, multiple=True),
            commands.Basic.Nack(3),
            channel=channel,
        )
        await peer.serve_close()

    async def publish(channel: Channel) -> None:
        await channel.confirm_select()
        waiters = [channel.start_publish(b"%d" % i, routing_key="q") for i in range(3)]
        assert None not in waiters
        assert await waiters[0].wait() is None  # type: ignore[union-attr]
        assert await waiters[1].wait() is None  # type: ignore[union-attr]
        with pytest.raises(MessageNacked):
            await waiters[2].wait()  # type: ignore[union-attr]

    await on_channel(broker, publish)


async def test_a_return_before_the_ack_fails_only_its_mandatory_publish() -> None:
    async def broker(peer: BrokerPeer) -> None:
        channel = await confirm_channel(peer)
        for _ in range(3):
            await peer.expect(commands.Basic.Publish, channel)
            await skip_content(peer)
        returned = commands.Basic.Return(312, "NO_ROUTE", "", "nowhere")
        await peer.send_raw(
            peer_method(returned, channel)
            + content_frames(channel, b"lost")
            + peer_method(commands.Basic.Ack(3, multiple=True), channel)
        )
        await peer.serve_close()

    async def publish(channel: Channel) -> None:
        await channel.confirm_select()
        first = channel.start_publish(b"kept", routing_key="q", mandatory=True)
        lost = channel.start_publish(b"lost", routing_key="nowhere", mandatory=True)
        last = channel.start_publish(b"kept", routing_key="q", mandatory=True)
        assert await first.wait() is None  # type: ignore[union-attr]
        with pytest.raises(MessageReturned) as info:
            await lost.wait()  # type: ignore[union-attr]
        assert (info.value.reply_code, info.value.routing_key) == (312, "nowhere")
        assert await last.wait() is None  # type: ignore[union-attr]

    await on_channel(broker, publish)


# Close races -----------------------------------------------------------------------


def assert_nothing_after_close_ok(peer: BrokerPeer, channel: int) -> None:
    """RabbitMQ answers a frame behind our close-ok with 504 and closes the
    connection: on ``channel`` the close-ok must be the last frame we wrote."""
    frames = peer.frames_on(channel)
    assert isinstance(frames[-1], commands.Channel.CloseOk), frames[-3:]
    assert sum(isinstance(f, commands.Channel.CloseOk) for f in frames) == 1


async def test_acks_racing_a_broker_channel_close_stop_at_our_close_ok() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        channel = await peer.open_channel()
        await peer.expect(commands.Basic.Ack, channel)
        await peer.send(
            commands.Channel.Close(406, "PRECONDITION_FAILED", 0, 0), channel=channel
        )
        await peer.serve_close()
        assert_nothing_after_close_ok(peer, channel)

    async def hammer(channel: Channel) -> None:
        with pytest.raises(ChannelClosed, match="406"):
            for tag in range(1, 100_000):
                channel.ack(tag)
                await anyio.lowlevel.checkpoint()
        assert channel.close_error is not None
        assert channel.close_error.reply_code == 406

    await on_channel(broker, hammer)


async def test_a_delivery_behind_channel_close_is_never_acked() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        channel = await peer.open_channel()
        await peer.answer(
            commands.Basic.Consume, commands.Basic.ConsumeOk("c"), channel
        )
        await peer.send_raw(
            deliver_frames(channel, "c", 1, b"one")
            + peer_method(
                commands.Channel.Close(406, "PRECONDITION_FAILED", 0, 0), channel
            )
        )
        await peer.serve_close()
        assert_nothing_after_close_ok(peer, channel)
        assert not any(isinstance(f, commands.Basic.Ack) for _, f in peer.received)

    async def consume(channel: Channel) -> None:
        send, receive = anyio.create_memory_object_stream[Delivery](10)
        await channel.basic_consume("q", "c", send)
        async with receive:
            deliveries = [d async for d in receive]
        assert [d.body for d in deliveries] == [b"one"]
        with pytest.raises(ChannelClosed):
            channel.ack(1)

    await on_channel(broker, consume)


async def test_our_channel_close_ignores_frames_that_crossed_it() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        channel = await peer.open_channel()
        await peer.answer(
            commands.Basic.Consume, commands.Basic.ConsumeOk("c"), channel
        )
        await peer.expect(commands.Channel.Close, channel)
        await peer.send_raw(
            deliver_frames(channel, "c", 1, b"late")
            + peer_method(commands.Basic.Ack(1), channel)
            + peer_method(commands.Channel.CloseOk(), channel)
        )
        await peer.serve_close()
        # nothing answered the late delivery or the late ack
        assert isinstance(peer.frames_on(channel)[-1], commands.Channel.Close)

    async def body(connection: Connection) -> None:
        async with connection.channel() as channel:
            send, receive = anyio.create_memory_object_stream[Delivery](10)
            await channel.basic_consume("q", "c", send)
        assert connection.is_open
        with receive, pytest.raises(anyio.EndOfStream):
            receive.receive_nowait()  # the late delivery was dropped

    await connected(broker, body)


async def test_a_broker_connection_close_is_connection_lost_and_answered() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        await peer.send(
            commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)
        )
        await peer.expect(commands.Connection.CloseOk)
        await peer.wait_closed()

    with pytest.raises(ConnectionLost, match="320") as info:
        await connected(broker, forever)
    assert info.value.retryable


# Heartbeats, garbage, blocking -----------------------------------------------------


async def test_a_silent_broker_is_lost_after_two_heartbeats() -> None:
    peers: list[BrokerPeer] = []

    async def broker(peer: BrokerPeer) -> None:
        peers.append(peer)
        await peer.handshake(heartbeat=1)
        await peer.wait_closed()

    async def body(connection: Connection) -> None:
        assert connection.heartbeat == 1
        started = anyio.current_time()
        with anyio.fail_after(4):
            try:
                await anyio.sleep_forever()
            finally:
                assert anyio.current_time() - started >= 1.9

    with pytest.raises(ConnectionLost, match="2 x heartbeat") as info:
        await connected(broker, body)
    assert info.value.retryable
    assert peers[0].heartbeats >= 2  # we sent one every half interval meanwhile


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (b"\x09\x00\x00\x00\x00\x00\x00\xce", "unknown frame type"),
        (b"\x01\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x33\x00", "frame-end"),
        (
            b"\x03\x00\x01" + struct.pack(">I", 70000),
            "exceeds the negotiated frame_max",
        ),
    ],
)
async def test_garbage_from_the_broker_is_a_protocol_error(
    garbage: bytes, message: str
) -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake(frame_max=65536)
        await peer.send_raw(garbage)
        await peer.wait_closed()

    with pytest.raises(ProtocolError, match=message):
        await connected(broker, forever)


async def test_garbage_instead_of_connection_start() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.receive()
        await peer.send_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await peer.wait_closed()

    with pytest.raises(ProtocolError, match="does not speak AMQP"):
        await connected(broker, nothing)


async def test_publish_waits_while_the_connection_is_blocked() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        channel = await peer.open_channel()
        await peer.expect(commands.Confirm.Select, channel)
        await peer.send(commands.Connection.Blocked("low on memory"))
        await peer.send(commands.Confirm.SelectOk(), channel=channel)
        for _ in range(2):  # two round trips while blocked: no publish meanwhile
            probe = commands.Queue.DeclareOk("probe", 0, 0)
            await peer.answer(commands.Queue.Declare, probe, channel)
        await peer.send(commands.Connection.Unblocked())
        await peer.expect(commands.Basic.Publish, channel)
        await skip_content(peer)
        await peer.send(commands.Basic.Ack(1), channel=channel)
        await peer.serve_close()

    async def publish(channel: Channel, connection: Connection) -> None:
        await channel.confirm_select()
        assert connection.blocked
        async with anyio.create_task_group() as group:
            group.start_soon(
                functools.partial(channel.publish, b"held", routing_key="q")
            )
            await channel.queue_declare("probe", passive=True)
            await channel.queue_declare("probe", passive=True)
        assert not connection.blocked

    async def body(connection: Connection) -> None:
        async with connection.channel() as channel:
            await publish(channel, connection)

    await connected(broker, body)


async def test_a_stray_consume_ok_is_ignored_but_other_stray_replies_are_not() -> None:
    """A consume-ok nothing waits for (RabbitMQ sent one during a rolling
    restart) is logged and ignored: the channel goes on with the next call. A
    stray reply of another kind is still a protocol error."""

    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        channel = await peer.open_channel()
        await peer.send(commands.Basic.ConsumeOk("stray"), channel=channel)
        await peer.answer(commands.Basic.Qos, commands.Basic.QosOk(), channel)
        await peer.send(commands.Basic.QosOk(), channel=channel)
        await peer.wait_closed()

    async def body(connection: Connection) -> None:
        async with connection.channel() as channel:
            await channel.basic_qos(10)
            await anyio.sleep_forever()

    with pytest.raises(ProtocolError, match=r"unexpected Basic\.QosOk"):
        await connected(broker, body)


# Sessions through NativeTransport(network=...) --------------------------------------


async def test_deliveries_right_behind_consume_ok_are_not_dropped() -> None:
    async def broker(peer: BrokerPeer) -> None:
        await peer.handshake()
        channel = await peer.open_channel()
        await peer.answer(commands.Basic.Qos, commands.Basic.QosOk(), channel)
        consume = await peer.expect(commands.Basic.Consume, channel)
        tag = consume.consumer_tag
        await peer.send_raw(
            peer_method(commands.Basic.ConsumeOk(tag), channel)
            + b"".join(deliver_frames(channel, tag, n, b"m%d" % n) for n in (1, 2, 3))
        )
        ack = await peer.expect(commands.Basic.Ack, channel)
        assert (ack.delivery_tag, ack.multiple) == (3, True)
        await peer.serve_close()

    network = ScriptedNetwork(broker)
    transport = NativeTransport(network=network)
    spec = SessionSpec(parameters=PARAMS, queue="q", prefetch_count=10)

    async def client() -> None:
        async with transport.open_session(spec) as session:
            bodies = [(await session.deliveries.receive()).body for _ in range(3)]
            assert bodies == [b"m1", b"m2", b"m3"]
            await session.ack(3, multiple=True)

    await converse(network, client)
    assert "network=ScriptedNetwork" in repr(transport)


async def test_a_publisher_through_the_transport_is_confirmed() -> None:
    async def broker(peer: BrokerPeer) -> None:
        channel = await confirm_channel(peer)
        await peer.expect(commands.Basic.Publish, channel)
        await skip_content(peer)
        await peer.send(commands.Basic.Ack(1), channel=channel)
        await peer.serve_close()

    network = ScriptedNetwork(broker)

    async def client() -> None:
        opener = NativeTransport(network=network).open_publisher(PARAMS)
        async with opener as publisher:
            await publisher.publish(b"x", routing_key="q")

    await converse(network, client)
