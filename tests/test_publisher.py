"""The Publisher across broker blips, against a private RabbitMQ node (asyncio and
trio): connection cuts (FIN, RST, the broker's close_connection) and a
stop_app/start_app while many tasks publish; a deadline while the broker is down;
opening with failover URLs and bad credentials.

What must hold: every ``publish()`` that returned is in the queue (at least
once); nothing appears that was never published; a duplicate is a copy published
again after a loss and carries the same ``message_id``.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from tests.support.cluster import declared_queue
from tests.support.fault_proxy import FaultProxy
from tests.support.rabbit_node import PrivateNode
from tests.support.transports import make_transport, over_transports

from amqp_batch import AuthenticationError, ConnectionRefused, Publisher, PublishTimeout
from consumer_support import admin_channel, drain

pytestmark = [pytest.mark.anyio, pytest.mark.private_node]


@pytest.fixture
async def queue(private_node: PrivateNode, unique_name: str) -> AsyncIterator[str]:
    async with declared_queue(private_node.url, unique_name) as name:
        yield name


class Progress:
    """Counts confirmed publishes; lets a task wait for ``n`` more."""

    def __init__(self) -> None:
        self.confirmed: list[str] = []
        self._changed = anyio.Event()

    def add(self, message_id: str) -> None:
        self.confirmed.append(message_id)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_more(self, n: int, timeout: float = 30) -> None:
        target = len(self.confirmed) + n
        with anyio.fail_after(timeout):
            while len(self.confirmed) < target:
                await self._changed.wait()


async def _publish_until(
    publisher: Publisher, queue: str, prefix: str, progress: Progress, done: Any
) -> None:
    """Publish ``prefix-0``, ``prefix-1``... (body = id, no message_id: the
    publisher makes one) until ``done`` is set."""
    number = 0
    while not done.is_set():
        text = f"{prefix}-{number}"
        await publisher.publish(text.encode(), routing_key=queue)
        progress.add(text)
        number += 1


def _copies(deliveries: list[Any]) -> tuple[collections.Counter[str], dict[str, set]]:
    """Copies per id (the body) and the message ids each id was published with."""
    copies: collections.Counter[str] = collections.Counter()
    message_ids: dict[str, set[str]] = collections.defaultdict(set)
    for delivery in deliveries:
        text = delivery.body.decode()
        copies[text] += 1
        message_ids[text].add(delivery.properties.message_id)
    return copies, message_ids


@over_transports
async def test_p1_publishes_survive_cuts_and_a_broker_restart(
    destructive_node: PrivateNode, queue: str, figures: Any, transport_kind: str
) -> None:
    """Two publishers, four tasks each, publish while their connections are cut
    (FIN, RST, the broker's ``close_connection``) and the broker application is
    stopped and started. Every publish that returned is in the queue; duplicates
    are copies published again (same ``message_id``), counted; the tasks never
    see an error; leaving the ``async with`` leaves no connection behind."""
    node = destructive_node
    # One per publisher: a publish it confirmed after a fault means it is back.
    progress = (Progress(), Progress())
    done = anyio.Event()
    recoveries: dict[str, float] = {}
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        publishers = [
            Publisher(
                [proxy.url_for()],
                connection_name=f"{queue}-p{n}",
                reconnect_backoff_base=0.05,
                reconnect_backoff_cap=0.5,
                transport=make_transport(transport_kind),
            )
            for n in range(2)
        ]

        async def restart() -> None:
            await anyio.to_thread.run_sync(node.stop_app)
            await anyio.to_thread.run_sync(node.start_app)

        async def close() -> None:
            await anyio.to_thread.run_sync(node.close_connection, f"{queue}-p0")

        async def cut(rst: bool) -> None:
            assert proxy.cut(rst=rst) == 2

        faults: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("fin", lambda: cut(False)),
            ("rst", lambda: cut(True)),
            ("close", close),
            ("restart", restart),
        ]
        with anyio.fail_after(120):
            async with publishers[0] as first, publishers[1] as second:
                async with anyio.create_task_group() as group:
                    for n in range(8):
                        group.start_soon(
                            _publish_until,
                            (first, second)[n % 2],
                            queue,
                            f"t{n}",
                            progress[n % 2],
                            done,
                        )
                    for name, fault in faults:
                        await progress[0].wait_more(20)
                        await progress[1].wait_more(20)
                        at = anyio.current_time()
                        await fault()
                        await progress[0].wait_more(4)
                        await progress[1].wait_more(4)
                        recoveries[name] = round(anyio.current_time() - at, 3)
                    done.set()
                republished = first.republished + second.republished
                opened = [first.connections_opened, second.connections_opened]
        left = await anyio.to_thread.run_sync(node.list_connections)
    assert not [c for c in left if (c["name"] or "").startswith(queue)]
    async with admin_channel(node.url) as channel:
        copies, message_ids = _copies(await drain(channel, queue))
    confirmed = progress[0].confirmed + progress[1].confirmed
    returned = set(confirmed)
    assert len(returned) == len(confirmed)
    lost = returned - set(copies)
    assert not lost, sorted(lost)[:20]
    # Only the one publish per task that was cut short may be there unreturned.
    unexpected = set(copies) - returned
    assert len(unexpected) <= 8, sorted(unexpected)
    duplicates = sum(n - 1 for n in copies.values())
    assert duplicates <= republished
    assert all(len(ids) == 1 and None not in ids for ids in message_ids.values())
    # Both publishers reconnected after every fault that reached them.
    assert opened[0] >= 1 + len(faults)
    assert opened[1] >= 1 + len(faults) - 1  # close_connection cuts only p0
    figures.record(
        "P1",
        faults=",".join(name for name, _ in faults),
        recovery_s=recoveries,
        confirmed=len(returned),
        republished=republished,
        duplicates=duplicates,
        lost=len(lost),
    )


async def test_deadline_while_the_broker_is_down_raises_a_clear_error(
    destructive_node: PrivateNode, queue: str
) -> None:
    """With the broker application stopped, a publish raises ``PublishTimeout``
    once ``publish_timeout`` passed (not before), naming the redacted URL and the
    last error; the publisher keeps trying and publishes again after start_app."""
    node = destructive_node
    timeout = 1.5
    async with Publisher(
        node.url,
        connection_name=queue,
        publish_timeout=timeout,
        reconnect_backoff_base=0.05,
        reconnect_backoff_cap=0.3,
    ) as publisher:
        await publisher.publish(b"before", routing_key=queue, message_id="before")
        await anyio.to_thread.run_sync(node.stop_app)
        started = anyio.current_time()
        with pytest.raises(PublishTimeout) as caught:
            await publisher.publish(b"during", routing_key=queue, message_id="during")
        waited = anyio.current_time() - started
        await anyio.to_thread.run_sync(node.start_app)
        await publisher.publish(b"after", routing_key=queue, message_id="after")
    assert timeout <= waited < timeout + 1.0
    error = caught.value
    text = str(error)
    assert f"127.0.0.1:{node.amqp_port}" in text
    assert "guest:***@" in text and "guest:guest" not in text
    assert isinstance(error.last_error, ConnectionRefused), repr(error.last_error)
    assert "ConnectionRefused" in text
    assert error.urls == (f"amqp://guest:***@127.0.0.1:{node.amqp_port}/%2F",)
    assert error.__cause__ is error.last_error
    async with admin_channel(node.url) as channel:
        ids = [d.properties.message_id for d in await drain(channel, queue)]
    assert ids == ["before", "after"]


async def test_opening_tries_each_url_once(
    private_node: PrivateNode, queue: str
) -> None:
    """A dead first URL is skipped at opening; when every URL is dead the last
    connection error is raised at once, and bad credentials are never retried."""
    with anyio.fail_after(30):
        dead = [f"amqp://guest:guest@127.0.0.1:{FaultProxyFree.port()}/"] * 2
        async with Publisher([*dead, private_node.url]) as publisher:
            await publisher.publish(b"x", routing_key=queue, message_id="x")
            assert "connected" in repr(publisher) and "guest:guest" not in repr(
                publisher
            )
        with pytest.raises(ConnectionRefused):
            async with Publisher(dead):
                pytest.fail("must not connect")
        wrong = private_node.url.replace("guest:guest", "guest:wrong")
        with pytest.raises(AuthenticationError):
            async with Publisher([wrong, private_node.url]):
                pytest.fail("must not connect")
    async with admin_channel(private_node.url) as channel:
        assert [d.body for d in await drain(channel, queue)] == [b"x"]


class FaultProxyFree:
    """A TCP port nothing listens on."""

    @staticmethod
    def port() -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        return port


async def test_leaving_while_reconnecting_does_not_hang(
    destructive_node: PrivateNode, queue: str
) -> None:
    """Leaving the ``async with`` while the publisher is reconnecting (stuck in
    a handshake that gets no answer) returns at once, leaving no task behind."""
    node = destructive_node
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        with anyio.fail_after(20):
            async with Publisher(proxy.url_for(), connection_name=queue) as publisher:
                await publisher.publish(b"x", routing_key=queue)
                proxy.stall()  # new connections hang in the handshake
                proxy.cut()
                await proxy.wait_connections(2)  # reconnecting: stuck connecting
                left_at = anyio.current_time()
            assert anyio.current_time() - left_at < 2.0
            assert "not connected" in repr(publisher)
            proxy.resume()
