"""A scripted AMQP broker on an in-memory byte stream, for offline transport tests.

:class:`ScriptedNetwork` is a :class:`~amqp_batch._transport._native.NetworkBackend`:
its ``open()`` returns one end of an in-memory byte-stream pair and runs a *script*
(an ``async def script(peer: BrokerPeer)``) on the other end. The script plays the
broker, frame by frame: it reads what the client wrote (:meth:`BrokerPeer.expect`)
and answers with frames encoded by the project's own encoder (``marshal_method``)
and pamqp (content headers and bodies). When the script returns, the broker hangs
up (its end of the stream is closed), so a script that should outlive the client
ends with :meth:`BrokerPeer.serve_close` or :meth:`BrokerPeer.wait_closed`.
Nothing touches a socket, so a test can make the broker do what a real one does
only rarely (a ``basic.return`` before the ack, a ``channel.close`` crossing an
ack, a silent peer, garbage on the wire).

:func:`converse` runs a script against a client coroutine: the client's own
failure is raised (after the script finished: a script that expected more frames
than the client sent fails the test), the script's failure cancels the client,
and the whole exchange is bounded by a timeout so that no test can hang.
"""

from __future__ import annotations

import math
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from anyio.abc import ByteStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.base import Frame as MethodFrame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from amqp_batch._transport._native._framing import marshal_method

__all__ = [
    "BrokerPeer",
    "MemoryByteStream",
    "ScriptedNetwork",
    "byte_stream_pair",
    "converse",
]

T = TypeVar("T")
Script = Callable[["BrokerPeer"], Awaitable[None]]

_FRAME_HEADER = struct.Struct(">BHI")
PROTOCOL_HEADER = ProtocolHeader().marshal()


class MemoryByteStream(ByteStream):
    """One end of an in-memory byte stream pair (unbounded buffer, like a socket
    whose peer always reads fast enough)."""

    def __init__(
        self,
        send: MemoryObjectSendStream[bytes],
        receive: MemoryObjectReceiveStream[bytes],
    ) -> None:
        self._send = send
        self._receive = receive
        self._rest = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._rest:
            try:
                self._rest = await self._receive.receive()
            except anyio.EndOfStream:
                raise anyio.EndOfStream from None
        data, self._rest = self._rest[:max_bytes], self._rest[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        self._send.close()

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()


def byte_stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected in-memory byte streams: what one sends, the other receives."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](math.inf)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](math.inf)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)


def content_frames(channel: int, body: bytes, frame_max: int = 131072) -> bytes:
    """A content header and the body frames of ``body`` on ``channel``."""
    data = pamqp_frame.marshal(
        ContentHeader(0, len(body), commands.Basic.Properties()), channel
    )
    step = frame_max - 8
    for start in range(0, len(body), step):
        data += pamqp_frame.marshal(ContentBody(body[start : start + step]), channel)
    return data


def deliver_frames(
    channel: int, consumer_tag: str, delivery_tag: int, body: bytes
) -> bytes:
    """``basic.deliver`` with its content, as the broker writes it."""
    deliver = commands.Basic.Deliver(consumer_tag, delivery_tag, False, "", "q")
    return marshal_method(deliver, channel) + content_frames(channel, body)


class BrokerPeer:
    """The broker's end of the stream: read the client's frames, write ours."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        #: Every frame the client sent, in order, as ``(channel, frame)``.
        self.received: list[tuple[int, Any]] = []
        self.heartbeats = 0
        self._buffer = b""

    # Reading what the client wrote

    def _take_frame(self) -> tuple[int, Any] | None:
        buffer = self._buffer
        if buffer[:4] == b"AMQP":
            needed = 8
        elif len(buffer) >= 7:
            needed = 8 + _FRAME_HEADER.unpack_from(buffer)[2]
        else:
            return None
        if len(buffer) < needed:
            return None
        consumed, channel, frame = pamqp_frame.unmarshal(buffer[:needed])
        self._buffer = buffer[consumed:]
        return channel, frame

    async def receive(self) -> tuple[int, Any]:
        """The client's next frame (heartbeats are counted, not returned)."""
        while True:
            taken = self._take_frame()
            if taken is None:
                self._buffer += await self.stream.receive()
                continue
            self.received.append(taken)
            if isinstance(taken[1], Heartbeat):
                self.heartbeats += 1
                continue
            return taken

    async def expect(self, kind: type[Any], channel: int | None = None) -> Any:
        """The next frame, asserted to be a ``kind`` (on ``channel``)."""
        got_channel, frame = await self.receive()
        assert isinstance(frame, kind), f"expected {kind.__name__}, got {frame!r}"
        if channel is not None:
            assert got_channel == channel, f"{frame!r} on channel {got_channel}"
        return frame

    async def wait_closed(self) -> None:
        """Read (and record) until the client closes the stream."""
        try:
            while True:
                await self.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return

    def frames_on(self, channel: int) -> list[Any]:
        """Every frame the client sent on ``channel`` so far, in order."""
        return [frame for number, frame in self.received if number == channel]

    # Writing

    async def send(self, *methods: MethodFrame, channel: int = 0) -> None:
        """Write ``methods`` on ``channel`` in one write."""
        await self.send_raw(b"".join(marshal_method(m, channel) for m in methods))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are."""
        await self.stream.send(data)

    # The usual conversations

    async def handshake(
        self,
        *,
        heartbeat: int = 0,
        frame_max: int = 131072,
        channel_max: int = 2047,
        server_properties: dict[str, Any] | None = None,
    ) -> commands.Connection.TuneOk:
        """Play the broker's part of the opening handshake; return the tune-ok."""
        header = await self.expect(ProtocolHeader)
        assert (header.major_version, header.minor_version) == (0, 9)
        await self.send(
            commands.Connection.Start(server_properties=_server(server_properties))
        )
        await self.expect(commands.Connection.StartOk)
        await self.send(commands.Connection.Tune(channel_max, frame_max, heartbeat))
        tune_ok = await self.expect(commands.Connection.TuneOk)
        await self.expect(commands.Connection.Open)
        await self.send(commands.Connection.OpenOk())
        return tune_ok  # type: ignore[no-any-return]

    async def open_channel(self) -> int:
        """Answer ``channel.open``; return the channel number."""
        channel, frame = await self.receive()
        assert isinstance(frame, commands.Channel.Open), frame
        await self.send(commands.Channel.OpenOk(), channel=channel)
        return channel

    async def answer(self, kind: type[Any], reply: MethodFrame, channel: int) -> Any:
        """Expect a ``kind`` on ``channel`` and answer it with ``reply``."""
        frame = await self.expect(kind, channel)
        await self.send(reply, channel=channel)
        return frame

    async def serve_close(self) -> None:
        """Answer channel and connection closes until the client closed its
        connection; then read until it hangs up."""
        while True:
            channel, frame = await self.receive()
            if isinstance(frame, commands.Channel.Close):
                await self.send(commands.Channel.CloseOk(), channel=channel)
            elif isinstance(frame, commands.Connection.Close):
                await self.send(commands.Connection.CloseOk())
                await self.wait_closed()
                return


def _server(properties: dict[str, Any] | None) -> dict[str, Any]:
    if properties is not None:
        return properties
    return {
        "product": "ScriptedBroker",
        "capabilities": {
            "authentication_failure_close": True,
            "publisher_confirms": True,
            "basic.nack": True,
            "connection.blocked": True,
        },
    }


class ScriptedNetwork:
    """A network backend whose every ``open()`` runs the next script on the
    broker's end of a fresh in-memory stream pair.

    Once the scripts are used up, ``open()`` raises :class:`ConnectionRefusedError`
    as a closed port would. ``opened`` records the arguments of every ``open()``.
    """

    def __init__(self, *scripts: Script) -> None:
        self._scripts = list(scripts)
        self._task_group: TaskGroup | None = None
        self.opened: list[dict[str, Any]] = []
        self.peers: list[BrokerPeer] = []

    def __repr__(self) -> str:
        return f"ScriptedNetwork({len(self._scripts)} scripts left)"

    def attach(self, task_group: TaskGroup) -> None:
        """Run scripts in ``task_group`` (done by :func:`converse`)."""
        self._task_group = task_group

    async def open(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None
    ) -> ByteStream:
        """Hand out the client end; the next script plays the broker."""
        self.opened.append({"host": host, "port": port, "ssl_context": ssl_context})
        if not self._scripts:
            raise ConnectionRefusedError(f"nothing scripted for {host}:{port}")
        assert self._task_group is not None, "run the client with converse()"
        client, server = byte_stream_pair()
        peer = BrokerPeer(server)
        self.peers.append(peer)
        self._task_group.start_soon(_play, self._scripts.pop(0), peer)
        return client


async def _play(script: Script, peer: BrokerPeer) -> None:
    """Run a script; when it ends (or fails) the broker hangs up."""
    try:
        await script(peer)
    finally:
        await peer.stream.aclose()


async def converse(
    network: ScriptedNetwork,
    client: Callable[[], Awaitable[T]],
    *,
    timeout: float = 5.0,
) -> T:
    """Run ``client()`` against the scripts of ``network``; return its result.

    The client's exception is raised once every script has finished; a script's
    exception cancels the client and is raised instead. Bounded by ``timeout``.
    """
    failure: Exception | None = None
    result: Any = None
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as group:
            network.attach(group)
            try:
                result = await client()
            except Exception as exc:  # raised below, after the broker side
                failure = exc
    if failure is not None:
        raise failure
    return result  # type: ignore[no-any-return]
