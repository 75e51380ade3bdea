"""Tests of the fault-injecting TCP proxy, against in-process anyio servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from tests.support.fault_proxy import FaultProxy

Handler = Callable[[SocketStream], Awaitable[None]]
TALK = bytes(range(256)) * 2  # what the talker server sends on connect


async def echo(stream: SocketStream) -> None:
    """Send back everything received, until EOF."""
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except anyio.BrokenResourceError:
            pass


async def talker(stream: SocketStream) -> None:
    """Send ``TALK`` and then wait for the peer to close."""
    async with stream:
        try:
            await stream.send(TALK)
            async for _ in stream:
                pass
        except anyio.BrokenResourceError:
            pass


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    """Run ``handler`` for each connection on a free local port; yield the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield listener.extra(SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@asynccontextmanager
async def proxied(handler: Handler) -> AsyncIterator[FaultProxy]:
    """A proxy in front of a server running ``handler``."""
    async with server(handler) as port, FaultProxy("127.0.0.1", port) as proxy:
        yield proxy


async def receive_exactly(stream: SocketStream, size: int) -> bytes:
    """Read until ``size`` bytes arrived (EndOfStream if the peer closes first)."""
    data = b""
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return data


async def receive_until_closed(stream: SocketStream) -> bytes:
    """Read everything until EOF."""
    data = b""
    try:
        while True:
            data += await stream.receive()
    except anyio.EndOfStream:
        return data


async def test_forwards_both_ways_and_counts() -> None:
    async with proxied(echo) as proxy:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                await client.send(b"hello")
                assert await receive_exactly(client, 5) == b"hello"
                await client.send(b"world!")
                assert await receive_exactly(client, 6) == b"world!"
                await client.send_eof()
                assert await receive_until_closed(client) == b""
            await proxy.wait_closed()
    assert proxy.connections_accepted == 1
    assert proxy.bytes_to_server == 11
    assert proxy.bytes_to_client == 11
    assert proxy.connections_open == 0


async def test_cut_closes_with_fin() -> None:
    async with proxied(echo) as proxy:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                await client.send(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
                assert proxy.cut() == 1
                with pytest.raises(anyio.EndOfStream):
                    await client.receive()
            await proxy.wait_closed()


async def test_cut_with_rst_resets() -> None:
    async with proxied(echo) as proxy:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                await client.send(b"ping")
                assert await receive_exactly(client, 4) == b"ping"
                assert proxy.cut(rst=True) == 1
                with pytest.raises(anyio.BrokenResourceError):
                    await client.receive()


async def test_stall_stops_bytes_until_resume() -> None:
    async with proxied(echo) as proxy:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                proxy.stall()
                await client.send(b"held")
                # Asserting an absence needs a window; 0.3 s is plenty on loopback.
                with anyio.move_on_after(0.3) as window:
                    await client.receive()
                assert window.cancelled_caught
                assert proxy.bytes_to_server == 0
                proxy.resume()
                assert await receive_exactly(client, 4) == b"held"
    assert proxy.bytes_to_client == 4


async def test_cut_after_truncates_to_client() -> None:
    async with proxied(talker) as proxy:
        proxy.cut_after(100, connections=1)
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                assert await receive_until_closed(client) == TALK[:100]
            # Only one connection was to be cut: the next one gets everything.
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                assert await receive_exactly(client, len(TALK)) == TALK
    assert proxy.connections_accepted == 2


async def test_cut_after_counts_client_bytes() -> None:
    received = bytearray()
    server_done = anyio.Event()

    async def record(stream: SocketStream) -> None:
        async with stream:
            try:
                async for chunk in stream:
                    received.extend(chunk)
            except anyio.BrokenResourceError:
                pass
        server_done.set()

    async with proxied(record) as proxy:
        proxy.cut_after(3, direction="to_server")
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                await client.send(b"abcdef")
                assert await receive_until_closed(client) == b""
            await server_done.wait()
    assert bytes(received) == b"abc"
    assert proxy.bytes_to_server == 3


async def test_delay_slows_each_direction() -> None:
    async with proxied(echo) as proxy:
        proxy.set_delay(0.2)
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                started = anyio.current_time()
                await client.send(b"x")
                assert await receive_exactly(client, 1) == b"x"
                assert anyio.current_time() - started >= 0.4


async def test_unreachable_target_closes_the_client() -> None:
    async with server(echo) as port:
        pass  # the port is free again: nothing listens there now
    async with FaultProxy("127.0.0.1", port) as proxy:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", proxy.port) as client:
                assert await receive_until_closed(client) == b""
            await proxy.wait_closed()
    assert proxy.connect_failures == 1


async def test_exit_closes_open_connections() -> None:
    async with server(echo) as port:
        with anyio.fail_after(5):
            async with FaultProxy("127.0.0.1", port) as proxy:
                client = await anyio.connect_tcp("127.0.0.1", proxy.port)
                try:
                    await proxy.wait_connections(1)
                    await client.send(b"a")
                    assert await receive_exactly(client, 1) == b"a"
                    assert proxy.connections_open == 1
                except BaseException:
                    await client.aclose()
                    raise
            async with client:
                assert await receive_until_closed(client) == b""
    assert proxy.connections_open == 0


def test_url_for() -> None:
    proxy = FaultProxy("127.0.0.1", 5672)
    proxy.port = 4242
    assert proxy.url_for() == "amqp://guest:guest@127.0.0.1:4242/"
    assert proxy.url_for("u", "p@ss", "v/h") == "amqp://u:p%40ss@127.0.0.1:4242/v%2Fh"
