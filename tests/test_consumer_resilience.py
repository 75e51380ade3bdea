"""Failover URLs, TLS, dropped results of a dead session, health and hooks across a
reconnect — against a private RabbitMQ node, on asyncio and trio."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import pytest
from tests.support.fault_proxy import FaultProxy
from tests.support.rabbit_node import PrivateNode
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageResult,
    WorkerHealth,
    WorkerState,
    batch_consumer,
    parse_url,
)
from consumer_support import admin_channel, cleanup, drain, publish_ids, unique_name

pytestmark = [pytest.mark.anyio, pytest.mark.private_node]

SECRET = "s3cret-MARKER-pw"


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The consumer's transport (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


def _dead_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _settings(url: str, queue: str, **overrides: object) -> BatchConsumerSettings:
    values: dict[str, object] = {
        "url": url,
        "queue_name": queue,
        "prefetch_count": 20,
        "batch_size": 5,
        "batch_timeout": 0.2,
        "shutdown_timeout": 10.0,
        "connection_name": queue,
        "reconnect_backoff_base": 0.05,
        "reconnect_backoff_cap": 0.2,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)  # type: ignore[arg-type]


async def _wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    """Poll ``predicate`` (cheap, in-process state) until true, within ``timeout``."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - health() is a snapshot API
            await anyio.sleep(0.005)


async def _assert_queue_empty(url: str, queue: str) -> None:
    async with admin_channel(url) as channel:
        left = await drain(channel, queue)
    assert [d.properties.message_id for d in left] == []


@pytest.fixture
async def queue(private_node: PrivateNode) -> AsyncIterator[str]:
    name = unique_name()
    yield name
    await cleanup(private_node.url, queues=[name])


def _ack_recording(
    handled: list[str], expected: int, done: anyio.Event
) -> Callable[[Sequence[Message]], AsyncIterator[MessageResult]]:
    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append(message.message_id or "")
            yield MessageResult.ACK
        if len(set(handled)) >= expected:
            done.set()

    return handle


def _no_secret(health: WorkerHealth) -> None:
    assert health.last_error is not None
    assert SECRET not in health.last_error
    assert SECRET not in health.url


# --------------------------------------------------------------------- failover


@pytest.mark.parametrize("url_order", ["primary", "spread"])
@over_transports
async def test_failover_url_used_when_the_first_url_is_dead(
    private_node: PrivateNode, queue: str, url_order: str, transport: Any
) -> None:
    """``url`` points at a dead port. ``primary``: both workers start there,
    back off once and consume on the failover URL (the node); ``spread``:
    worker 1 starts on the failover URL. Every id is acked; health names the
    error without the password. (The dead URL is skipped for
    ``reconnect_backoff_cap`` seconds after it failed; a long cap keeps a busy
    machine's slow back-off from reaching it again, while the back-off itself
    stays short: ``reconnect_backoff_base`` times two.)"""
    dead = f"amqp://guest:{SECRET}@127.0.0.1:{_dead_port()}/"
    handled: list[str] = []
    done = anyio.Event()
    settings = _settings(
        dead,
        queue,
        failover_urls=(private_node.url,),
        num_workers=2,
        url_order=url_order,
        reconnect_backoff_cap=60.0,
    )
    assert SECRET not in repr(settings)
    async with admin_channel(private_node.url) as channel:
        await channel.queue_declare(queue, durable=True)
        ids = await publish_ids(channel, range(50), routing_key=queue)
    with anyio.fail_after(30):
        async with batch_consumer(
            settings, _ack_recording(handled, 50, done), transport=transport
        ) as c:
            health = c.health()
            assert [h.state for h in health] == [WorkerState.CONSUMING] * 2
            assert c.is_healthy
            await done.wait()
    w0, w1 = health
    assert w0.reconnect_count == 1
    assert w0.last_error is not None
    assert w0.last_error.startswith("ConnectionRefused: ")
    _no_secret(w0)
    assert w0.url == w1.url == parse_url(private_node.url).redacted_url
    if url_order == "spread":
        assert (w1.reconnect_count, w1.last_error) == (0, None)
    else:
        assert w1.reconnect_count == 1
        _no_secret(w1)
    assert sorted(handled, key=int) == ids
    assert sum(h.results.get("ack", 0) for h in c.health()) == 50
    await _assert_queue_empty(private_node.url, queue)


@over_transports
async def test_a_url_that_just_failed_is_skipped(
    private_node: PrivateNode, queue: str, transport: Any
) -> None:
    """The primary URL is dead; the worker consumes on the failover URL. When
    that connection is then closed by the broker, the worker reconnects to the
    failover URL straight away instead of trying the primary that failed a
    moment ago (one reconnect, not two); a URL is skipped only for
    ``reconnect_backoff_cap`` seconds."""
    dead = f"amqp://guest:guest@127.0.0.1:{_dead_port()}/"
    handled: list[str] = []
    done = anyio.Event()
    settings = _settings(
        dead, queue, failover_urls=(private_node.url,), reconnect_backoff_cap=60.0
    )
    async with admin_channel(private_node.url) as channel:
        await channel.queue_declare(queue, durable=True)
    with anyio.fail_after(60):
        async with batch_consumer(
            settings, _ack_recording(handled, 20, done), transport=transport
        ) as consumer:
            assert consumer.health()[0].reconnect_count == 1
            private_node.close_connection(f"{queue}-w0")
            await _wait_for(
                lambda: (
                    consumer.health()[0].reconnect_count >= 2 and consumer.is_healthy
                ),
                timeout=50,
            )
            health = consumer.health()[0]
            async with admin_channel(private_node.url) as channel:
                ids = await publish_ids(channel, range(20), routing_key=queue)
            await done.wait()
    assert health.reconnect_count == 2, health
    assert health.url == parse_url(private_node.url).redacted_url
    assert health.last_error is not None
    assert "ConnectionRefused" not in health.last_error
    assert sorted(handled, key=int) == ids
    await _assert_queue_empty(private_node.url, queue)


@over_transports
async def test_failover_when_the_proxied_broker_is_cut(
    private_node: PrivateNode, queue: str, transport: Any
) -> None:
    """The worker consumes through a proxy; the proxy is cut and then refuses
    every new connection: the worker rotates to the failover URL (the node
    directly) and the ids published afterwards are all acked."""
    handled: list[str] = []
    done = anyio.Event()
    async with FaultProxy("127.0.0.1", private_node.amqp_port) as proxy:
        settings = _settings(proxy.url_for(), queue, failover_urls=(private_node.url,))
        with anyio.fail_after(30):
            async with batch_consumer(
                settings, _ack_recording(handled, 30, done), transport=transport
            ) as consumer:
                assert f":{proxy.port}/" in consumer.health()[0].url
                proxy.cut_after(0)  # every later connection through it dies
                assert proxy.cut() == 1
                await _wait_for(
                    lambda: (
                        consumer.health()[0].reconnect_count >= 1
                        and consumer.is_healthy
                    )
                )
                health = consumer.health()[0]
                assert health.url == parse_url(private_node.url).redacted_url
                async with admin_channel(private_node.url) as channel:
                    ids = await publish_ids(channel, range(30), routing_key=queue)
                await done.wait()
    assert health.state is WorkerState.CONSUMING
    assert health.last_error is not None
    assert sorted(handled, key=int) == ids
    assert consumer.health()[0].results["ack"] == 30
    await _assert_queue_empty(private_node.url, queue)


@over_transports
async def test_health_shows_backing_off_then_consuming(
    private_node: PrivateNode, queue: str, transport: Any
) -> None:
    """With its only URL unreachable, the worker is backing_off (not healthy),
    counts reconnects and shows the error without the password; once the broker
    is reachable again it consumes and acks everything."""
    user = unique_name("user")
    await anyio.to_thread.run_sync(private_node.add_user, user, SECRET)
    handled: list[str] = []
    done = anyio.Event()
    async with FaultProxy("127.0.0.1", private_node.amqp_port) as proxy:
        settings = _settings(
            proxy.url_for(user=user, password=SECRET),
            queue,
            reconnect_backoff_base=0.1,
            reconnect_backoff_cap=0.3,
        )
        with anyio.fail_after(30):
            async with batch_consumer(
                settings, _ack_recording(handled, 20, done), transport=transport
            ) as consumer:
                proxy.cut_after(0)
                proxy.cut()
                await _wait_for(
                    lambda: (
                        consumer.health()[0].state is WorkerState.BACKING_OFF
                        and consumer.health()[0].reconnect_count >= 2
                    )
                )
                backing_off = consumer.health()[0]
                assert not consumer.is_healthy
                assert consumer.is_running
                proxy.cut_after(None)
                await _wait_for(lambda: consumer.is_healthy)
                async with admin_channel(private_node.url) as channel:
                    ids = await publish_ids(channel, range(20), routing_key=queue)
                await done.wait()
                consuming = consumer.health()[0]
    _no_secret(backing_off)
    assert SECRET not in str(consumer.health())
    assert consuming.state is WorkerState.CONSUMING
    assert consuming.reconnect_count >= backing_off.reconnect_count >= 2
    assert sorted(handled, key=int) == ids
    assert consumer.health()[0].results == {"ack": 20}
    await _assert_queue_empty(private_node.url, queue)


# --------------------------------------------------------------------- TLS


def _tls_connections(node: PrivateNode) -> dict[str, bool]:
    """Connection name -> whether it uses TLS."""
    output = node.ctl("list_connections", "ssl", "client_properties", "-q", "-s")
    found: dict[str, bool] = {}
    for line in output.splitlines():
        ssl_flag, _, properties = line.partition("\t")
        match = re.search(r'\{"connection_name",(?:longstr,)?"([^"]*)"\}', properties)
        if match is not None:
            found[match.group(1)] = ssl_flag.strip() == "true"
    return found


@over_transports
async def test_tls_consumer_and_its_republish_connection(
    private_node: PrivateNode, queue: str, transport: Any
) -> None:
    """Over ``amqps://`` with the node's CA: every id is REQUEUEd once (the copy is
    republished on the worker's TLS publisher connection) and then acked."""
    handled: list[tuple[str, int]] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append((message.message_id or "", message.retry_count))
            yield MessageResult.ACK if message.retry_count else MessageResult.REQUEUE
        if sum(1 for _, count in handled if count == 1) == 20:
            done.set()

    settings = _settings(
        private_node.tls_url,
        queue,
        ssl_context=private_node.client_ssl_context(),
    )
    with anyio.fail_after(30):
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            async with admin_channel(private_node.url) as channel:
                ids = await publish_ids(channel, range(20), routing_key=queue)
            await done.wait()
            connections = await anyio.to_thread.run_sync(_tls_connections, private_node)
    assert connections[f"{queue}-w0"] is True
    assert connections[f"{queue}-w0-publisher"] is True
    assert sorted(handled, key=lambda h: (h[1], int(h[0]))) == [
        *((i, 0) for i in ids),
        *((i, 1) for i in ids),
    ]
    assert consumer.health()[0].results == {"requeue": 20, "ack": 20}
    await _assert_queue_empty(private_node.url, queue)


# --------------------------------------------------------------------- dead session


@over_transports
async def test_results_of_a_dead_session_are_dropped(
    private_node: PrivateNode, queue: str, transport: Any
) -> None:
    """The worker's connection is closed while a batch is in the handler; the
    handler finishes and yields ACKs *after* the cut. Those results are never
    sent on the new session (whose tags restart at 1: they would ack other
    messages, or the broker would close the channel for an unknown tag). The
    batch is redelivered with ``redelivered=True`` and acked; nothing is lost."""
    seen: list[tuple[str, bool]] = []
    first_batch: list[str] = []
    in_handler = anyio.Event()
    cut_done = anyio.Event()
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        if not in_handler.is_set():
            in_handler.set()
            first_batch.extend(m.message_id or "" for m in messages)
            # Finish this batch even though its session dies meanwhile.
            with anyio.CancelScope(shield=True), anyio.move_on_after(20):
                await cut_done.wait()
        for message in messages:
            seen.append((message.message_id or "", message.redelivered))
            yield MessageResult.ACK
        if {i for i, redelivered in seen if redelivered} >= set(ids):
            done.set()

    async with admin_channel(private_node.url) as channel:
        await channel.queue_declare(queue, durable=True)
        ids = await publish_ids(channel, range(20), routing_key=queue)
    settings = _settings(private_node.url, queue)
    with anyio.fail_after(30):
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            await in_handler.wait()
            # The cut comes once the broker delivered all 20 to this session.
            await _wait_for(lambda: private_node.queue_counts(queue) == (0, 20))
            closed = await anyio.to_thread.run_sync(
                private_node.close_connection, f"{queue}-w0"
            )
            assert closed == 1
            cut_done.set()
            await done.wait()
    health = consumer.health()[0]
    assert len(first_batch) == 5
    # One reconnect only: no "unknown delivery tag" channel error on the new one.
    assert health.reconnect_count == 1, health.last_error
    assert health.last_error is not None
    assert "unknown delivery tag" not in health.last_error.lower()
    # All 20 were prefetched by the dead session, so all come back redelivered.
    redelivered = [i for i, again in seen if again]
    assert sorted(redelivered, key=int) == ids
    # The first batch was in the handler at the cut. A transport that reads the
    # broker's close only later (aiormq, in its own reader) may still hand over
    # the batches collected meanwhile: whole batches, in order, each once.
    fresh = [i for i, again in seen if not again]
    assert fresh[:5] == first_batch == ids[:5]
    assert fresh == ids[: len(fresh)] and len(fresh) % 5 == 0, fresh
    # Acks sent on the dead session may be counted; none on the new one twice.
    assert 20 <= health.results["ack"] <= 20 + len(fresh)
    await _assert_queue_empty(private_node.url, queue)


# --------------------------------------------------------------------- hooks


@over_transports
async def test_hooks_run_once_with_three_workers_across_a_reconnect(
    private_node: PrivateNode, queue: str, transport: Any
) -> None:
    events: list[str] = []
    handled: list[str] = []
    done = anyio.Event()

    class Ingest(BatchConsumer[BatchConsumerSettings]):
        async def on_start(self) -> None:
            events.append("start")

        async def on_stop(self) -> None:
            events.append("stop")

        async def process_messages(
            self, messages: Sequence[Message]
        ) -> AsyncIterator[MessageResult]:
            for message in messages:
                handled.append(message.message_id or "")
                yield MessageResult.ACK
            if len(set(handled)) == 60:
                done.set()

    consumer = Ingest(
        _settings(private_node.url, queue, num_workers=3), transport=transport
    )
    with anyio.fail_after(30):
        async with consumer:
            assert events == ["start"]
            await anyio.to_thread.run_sync(private_node.close_connection, f"{queue}-w1")
            await _wait_for(
                lambda: (
                    consumer.health()[1].reconnect_count == 1 and consumer.is_healthy
                )
            )
            async with admin_channel(private_node.url) as channel:
                ids = await publish_ids(channel, range(60), routing_key=queue)
            await done.wait()
            assert events == ["start"]
    assert events == ["start", "stop"]
    assert [h.reconnect_count for h in consumer.health()] == [0, 1, 0]
    assert sorted(set(handled), key=int) == ids
    assert sum(h.results.get("ack", 0) for h in consumer.health()) >= 60
    await _assert_queue_empty(private_node.url, queue)
