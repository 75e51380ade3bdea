"""amqp-batch on a three-node RabbitMQ cluster with quorum queues (rows C1-C4).

One cluster of private nodes (``tests/support/cluster.py``) serves every test of
this module; each test puts it back together (every node running) at the end. A
:class:`~tests.support.fault_proxy.FaultProxy` stands in front of each node, and
the consumer's settings list the three proxies (``url`` + ``failover_urls``).
The work queue is a quorum queue declared through node 1 (so its leader usually
lives there, while the consumer's first connection goes to node 0), with a
dead-letter exchange and a quorum dead-letter queue.

Every fault test checks the total-queue invariant (``tests/support/invariant.py``):
every confirmed id ends acked or dead-lettered (ids divisible by 7 are REQUEUEd
until the library dead-letters them), duplicates counted, and records its
figures for ``docs/reliability.md``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import pytest
from tests.support.cluster import Cluster, cluster_proxies, declared_queue
from tests.support.fault_proxy import FaultProxy
from tests.support.invariant import Recorder, Report, check, publish_numbered
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageNacked,
    MessageResult,
    Publisher,
    WorkerHealth,
    WorkerState,
)
from consumer_support import admin_channel, cleanup

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.private_node]

QUORUM = {"x-queue-type": "quorum"}
HEARTBEAT = 2
BACKOFF_CAP = 0.5
PREFETCH = 20
MAX_REQUEUE = 2
#: How far the C3 publisher may run ahead of the consumer (ids).
LAG = 40


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three private nodes joined into one cluster; stopped at the end, always."""
    nodes = Cluster(3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def healed(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, with every node running again after the test."""
    try:
        yield cluster
    finally:
        cluster.heal()


def _decide(message: Message) -> MessageResult:
    """REQUEUE traffic: ids divisible by 7 are requeued until dead-lettered."""
    number = int(message.message_id or message.body)
    return MessageResult.REQUEUE if number % 7 == 0 else MessageResult.ACK


class Watched(BatchConsumer[BatchConsumerSettings]):
    """A consumer that remembers when (and to which URL) its worker consumed."""

    def __init__(
        self,
        settings: BatchConsumerSettings,
        handler: Callable[[Sequence[Message]], AsyncIterator[MessageResult]],
        transport: Any,
    ) -> None:
        super().__init__(settings, transport=transport)
        self._handle = handler
        #: (time, url) of every entry into CONSUMING.
        self.consuming: list[tuple[float, str]] = []
        self._changed = anyio.Event()

    def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        return self._handle(messages)

    def on_worker_state_change(
        self, health: WorkerHealth, previous: WorkerState
    ) -> None:
        if health.state is WorkerState.CONSUMING:
            self.consuming.append((anyio.current_time(), health.url))
        self._changed.set()
        self._changed = anyio.Event()

    async def consuming_since(
        self, since: float, timeout: float = 60
    ) -> tuple[float, str]:
        """The first entry into CONSUMING after ``since``: (time, url)."""
        with anyio.fail_after(timeout):
            while True:
                for entry in self.consuming:
                    if entry[0] > since:
                        return entry
                await self._changed.wait()


class Hold:
    """Wraps a recorder's handler: once armed, the next batch stays in the
    handler (shielded: it outlives its session) until released."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.holding = anyio.Event()
        self.released = anyio.Event()
        self.armed = False

    async def handler(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        if self.armed:
            self.armed = False
            self.holding.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self.released.wait()
        for message in messages:
            yield self.recorder.record(message)


@attrs.define
class Run:
    """One cluster test's consumer, queues and proxies."""

    cluster: Cluster
    proxies: list[FaultProxy]
    queue: str
    dead_letter_queue: str
    recorder: Recorder
    hold: Hold
    consumer: Watched
    confirmed: list[str] = attrs.Factory(list)

    def url(self) -> str:
        """The URL of a node that runs now (for publishing and checking)."""
        return self.cluster.any_running().url

    def node_of(self, url: str) -> int:
        """The node behind the proxy URL ``url``."""
        match = re.search(r":(\d+)/", url)
        assert match is not None, url
        ports = [proxy.port for proxy in self.proxies]
        return ports.index(int(match.group(1)))

    async def publish(self, count: int) -> None:
        """Publish ``count`` more numbered ids (confirmed) through a running node."""
        self.confirmed += await publish_numbered(
            self.url(), self.queue, count, start=len(self.confirmed)
        )

    async def publish_retrying_nacks(self, publisher: Publisher, count: int) -> int:
        """Like :meth:`publish`, through the library's ``publisher``, as a
        producer that publishes a nacked id again (a quorum queue without a
        leader nacks; the publisher takes a new connection after a nack).
        Returns the number of nacks."""
        nacks = 0
        for number in range(len(self.confirmed), len(self.confirmed) + count):
            text = str(number)
            with anyio.fail_after(30):
                while True:
                    try:
                        await publisher.publish(
                            text.encode(), routing_key=self.queue, message_id=text
                        )
                        break
                    except MessageNacked:
                        nacks += 1
            self.confirmed.append(text)
        return nacks

    async def check(self, max_duplicates: int, producer_copies: int = 0) -> Report:
        """Drain both queues through a running node; assert the invariant.

        Lost, unexpected and still queued: none. Every id ends in one place
        (acked, or dead-lettered if divisible by 7). Duplicates are bounded by
        ``max_duplicates`` (what the faults had in flight) plus
        ``producer_copies`` (ids the producer published again after a nack or a
        lost connection). A duplicate without ``redelivered=true`` at retry
        count 0 can only be such a producer copy; at a higher count it is a
        REQUEUE copy published again because its original came back after a
        fault, and the id is then dead-lettered once per copy.
        """
        report = await check(
            self.url(),
            self.queue,
            self.dead_letter_queue,
            self.recorder,
            self.confirmed,
        )
        assert not report.lost, sorted(report.lost)
        assert not report.unexpected, sorted(report.unexpected)
        assert not report.still_queued, sorted(report.still_queued)
        assert not report.acked & set(report.dead_lettered)
        assert set(report.dead_lettered) == {
            i for i in self.confirmed if int(i) % 7 == 0
        }
        seen, flagged = self.recorder.seen, self.recorder.redelivered
        unflagged_first = sum(
            max(0, n - 1 - flagged[key]) for key, n in seen.items() if key[1] == 0
        )
        assert unflagged_first <= producer_copies, unflagged_first
        extra_dead = sum(n - 1 for n in report.dead_lettered.values())
        assert extra_dead <= report.duplicates + producer_copies
        assert report.duplicates <= max_duplicates + producer_copies
        return report


@asynccontextmanager
async def running(
    cluster: Cluster, name: str, transport_kind: str
) -> AsyncIterator[Run]:
    """Queues declared (through node 1) and proxies up; ``run.consumer`` is
    ready to be entered (its first connection goes to node 0), on a transport of
    ``transport_kind``. The queues go at the end, through whichever node still
    runs."""
    dlx, dlq = f"{name}-dlx", f"{name}-dlq"
    async with admin_channel(cluster.nodes[1].url) as channel:
        await channel.exchange_declare(dlx, "topic", durable=True)
        await channel.queue_declare(dlq, durable=True, arguments=QUORUM)
        await channel.queue_bind(dlq, dlx, "#")
        await channel.queue_declare(
            name, durable=True, arguments={**QUORUM, "x-dead-letter-exchange": dlx}
        )
    try:
        async with cluster_proxies(cluster) as proxies:
            urls = [proxy.url_for() for proxy in proxies]
            settings = BatchConsumerSettings(
                url=urls[0],
                failover_urls=urls[1:],
                queue_name=name,
                queue_arguments=QUORUM,
                dead_letter_exchange=dlx,
                max_requeue_attempts=MAX_REQUEUE,
                prefetch_count=PREFETCH,
                batch_size=5,
                batch_timeout=0.05,
                heartbeat=HEARTBEAT,
                reconnect_backoff_base=0.05,
                reconnect_backoff_cap=BACKOFF_CAP,
                shutdown_timeout=10,
                connection_name=name,
            )
            recorder = Recorder(_decide, max_requeue=MAX_REQUEUE)
            hold = Hold(recorder)
            consumer = Watched(settings, hold.handler, make_transport(transport_kind))
            yield Run(cluster, proxies, name, dlq, recorder, hold, consumer)
    finally:
        await cleanup(cluster.any_running().url, queues=[name, dlq], exchanges=[dlx])


async def _thread(function: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(function, *args)


# --------------------------------------------------------------------- C1


@over_transports
async def test_c1_kill_the_consumers_node_mid_batch(
    healed: Cluster, unique_name: str, figures: Any, transport_kind: str
) -> None:
    """kill -9 of the node the consumer is connected to, with a batch in the
    handler and REQUEUE traffic: the worker consumes again on another node within
    2 x heartbeat + back-off (+ the connection setup); every id is acked or
    dead-lettered."""
    cluster = healed
    with anyio.fail_after(150):
        async with (
            running(cluster, unique_name, transport_kind) as run,
            anyio.create_task_group() as group,
        ):
            async with run.consumer:
                await run.publish(100)
                run.hold.armed = True
                await run.hold.holding.wait()
                node = run.node_of(run.consumer.health()[0].url)
                killed_at = anyio.current_time()
                await _thread(cluster.kill9, node)
                run.hold.released.set()
                back_at, url = await run.consumer.consuming_since(killed_at)
                group.start_soon(_thread, cluster.start_node, node)  # meanwhile
                await run.publish(50)
                await run.recorder.wait_decided(run.confirmed, timeout=60)
            report = await run.check(max_duplicates=PREFETCH)
    recovery = back_at - killed_at
    assert run.node_of(url) != node
    bound = 2 * HEARTBEAT + BACKOFF_CAP
    assert recovery <= bound + 5.0, (recovery, bound)
    figures.record(
        "C1",
        killed_node=node,
        resumed_on_node=run.node_of(url),
        recovery_s=round(recovery, 3),
        bound_s=bound,
        **report.figures(),
    )


# --------------------------------------------------------------------- C2


@over_transports
async def test_c2_kill_the_quorum_queue_leader(
    healed: Cluster, unique_name: str, figures: Any, transport_kind: str
) -> None:
    """kill -9 of the node that leads the quorum queue: a new leader is elected
    among the two others and consuming resumes; nothing confirmed is lost."""
    cluster = healed
    with anyio.fail_after(150):
        async with (
            running(cluster, unique_name, transport_kind) as run,
            anyio.create_task_group() as group,
        ):
            # Opened during the election, node 0 first (not the old leader): a
            # channel opened then is nacked until the publisher takes a new one.
            publisher = Publisher(
                [node.url for node in cluster.nodes],
                connection_name=f"{unique_name}-producer",
                reconnect_backoff_base=0.05,
                reconnect_backoff_cap=BACKOFF_CAP,
                transport=make_transport(transport_kind),
            )
            async with run.consumer:
                await run.publish(100)
                await run.recorder.wait_seen(20, timeout=30)
                before = await _thread(cluster.quorum_queue, run.queue)
                leader = cluster.index(before.leader)
                killed_at = anyio.current_time()
                await _thread(cluster.kill9, leader)
                # Published (and confirmed) while the queue elects a new leader.
                async with publisher:
                    nacks = await run.publish_retrying_nacks(publisher, 50)
                confirmed_at = anyio.current_time()
                reconnects = publisher.connections_opened - 1
                after = await _thread(
                    lambda: cluster.wait_leader(run.queue, not_on=before.leader)
                )
                elected_at = anyio.current_time()
                group.start_soon(_thread, cluster.start_node, leader)  # meanwhile
                await run.recorder.wait_decided(run.confirmed, timeout=60)
                decided_at = anyio.current_time()
            report = await run.check(
                max_duplicates=PREFETCH, producer_copies=nacks + publisher.republished
            )
    assert after.leader != before.leader
    figures.record(
        "C2",
        old_leader=leader,
        new_leader=cluster.index(after.leader),
        consumer_reconnects=run.consumer.health()[0].reconnect_count,
        publish_after_kill_s=round(confirmed_at - killed_at, 3),
        nacks_while_electing=nacks,
        publisher_reconnects=reconnects,
        republished=publisher.republished,
        leader_seen_s=round(elected_at - killed_at, 3),
        all_decided_s=round(decided_at - killed_at, 3),
        **report.figures(),
    )


# --------------------------------------------------------------------- C3


class Feed:
    """Publishes numbered ids through the library's Publisher until stopped."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.done = anyio.Event()
        self._progress = anyio.Event()

    async def publish_until_done(self, publisher: Publisher) -> None:
        while not self.done.is_set():
            # At most LAG ids ahead of the consumer: the check stays quick.
            await self.run.recorder.wait_seen(len(self.run.confirmed) - LAG, timeout=60)
            text = str(len(self.run.confirmed))
            await publisher.publish(
                text.encode(), routing_key=self.run.queue, message_id=text
            )
            self.run.confirmed.append(text)  # returned: the broker confirmed it
            self._progress.set()
            self._progress = anyio.Event()

    async def more(self, count: int) -> None:
        """Wait until ``count`` more publishes returned."""
        target = len(self.run.confirmed) + count
        while len(self.run.confirmed) < target:
            await self._progress.wait()


@over_transports
async def test_c3_rolling_restart_with_the_library_publisher(
    healed: Cluster, unique_name: str, figures: Any, transport_kind: str
) -> None:
    """The broker application of each node is restarted in turn (stop_app,
    start_app, wait until it rejoined) while the library's Publisher (the three
    proxy URLs) and the consumer run: every id whose publish returned ends acked
    or dead-lettered; the publisher never raised."""
    cluster = healed
    restarts: list[float] = []
    with anyio.fail_after(180):
        async with running(cluster, unique_name, transport_kind) as run:
            feed = Feed(run)
            publisher = Publisher(
                [proxy.url_for() for proxy in run.proxies],
                connection_name=f"{unique_name}-publisher",
                reconnect_backoff_base=0.05,
                reconnect_backoff_cap=BACKOFF_CAP,
                heartbeat=HEARTBEAT,
                transport=make_transport(transport_kind),
            )
            async with run.consumer:
                async with publisher, anyio.create_task_group() as group:
                    group.start_soon(feed.publish_until_done, publisher)
                    for node in range(len(cluster.nodes)):
                        await feed.more(30)
                        started = anyio.current_time()
                        await _thread(cluster.stop_app, node)
                        await _thread(cluster.start_app, node)
                        restarts.append(round(anyio.current_time() - started, 3))
                    await feed.more(30)
                    feed.done.set()
                await run.recorder.wait_decided(run.confirmed, timeout=60)
            report = await run.check(
                max_duplicates=3 * PREFETCH, producer_copies=publisher.republished
            )
    assert publisher.connections_opened >= 3
    figures.record(
        "C3",
        restarts_s=restarts,
        publisher_connections=publisher.connections_opened,
        republished=publisher.republished,
        consumer_reconnects=run.consumer.health()[0].reconnect_count,
        **report.figures(),
    )


# --------------------------------------------------------------------- C4


@over_transports
async def test_c4_one_node_cut_off_by_its_proxy(
    healed: Cluster, unique_name: str, figures: Any, transport_kind: str
) -> None:
    """The consumer's node becomes unreachable (its proxy stops forwarding: a
    one-node partition as the client sees it). The worker notices within 2 x
    heartbeat and consumes through another node; the broker requeues what the
    cut-off session held; every id is acked or dead-lettered."""
    cluster = healed
    with anyio.fail_after(150):
        async with running(cluster, unique_name, transport_kind) as run:
            async with run.consumer:
                await run.publish(100)
                await run.recorder.wait_seen(20, timeout=30)
                node = run.node_of(run.consumer.health()[0].url)
                stalled_at = anyio.current_time()
                run.proxies[node].stall()
                back_at, url = await run.consumer.consuming_since(stalled_at)
                await run.publish(50)
                await run.recorder.wait_decided(run.confirmed, timeout=60)
                # What the cut-off session held comes back once the broker
                # notices (missed heartbeats) and is handled again.
                await _thread(cluster.wait_queue_settled, run.queue)
                run.proxies[node].resume()
            report = await run.check(max_duplicates=PREFETCH)
    recovery = back_at - stalled_at
    bound = 2 * HEARTBEAT + BACKOFF_CAP
    assert run.node_of(url) != node
    assert recovery <= bound + 5.0, (recovery, bound)
    figures.record(
        "C4",
        cut_off_node=node,
        resumed_on_node=run.node_of(url),
        recovery_s=round(recovery, 3),
        bound_s=bound,
        **report.figures(),
    )


async def test_cluster_forms_and_a_quorum_queue_spans_it(
    cluster: Cluster, unique_name: str
) -> None:
    """The three nodes run as one cluster; a quorum queue declared on one node has
    a member on every node and a leader among them."""
    running_nodes = await _thread(cluster.running_nodes)
    assert running_nodes == {node.node_name for node in cluster.nodes}
    async with declared_queue(cluster.urls[1], unique_name, QUORUM):
        members = await _thread(cluster.quorum_queue, unique_name)
    assert set(members.members) == running_nodes
    assert members.leader in running_nodes
