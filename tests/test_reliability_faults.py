"""The reliability matrix's fault rows (docs/reliability.md) against a private RabbitMQ
node, on asyncio and trio: L2, F1, F2, F3, F4, F6, F7, F10 (L1 and F5 are in
``test_soak.py``).

Every test checks the total-queue invariant (``tests/support/invariant.py``): lost
= 0, unexpected = 0, duplicates bounded as the row says, and records its measured
figures for ``docs/reliability.md`` (``scripts/reliability_report.py``).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from tests.support.consumer_process import ConsumerProcess
from tests.support.fault_proxy import FaultProxy
from tests.support.invariant import Recorder, check
from tests.support.rabbit_node import PrivateNode
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageResult,
    WorkerHealth,
    WorkerState,
)
from amqp_batch._transport._base import Properties
from amqp_batch._transport._native import connect
from amqp_batch._transport._url import parse_url
from consumer_support import admin_channel, cleanup

pytestmark = [pytest.mark.anyio, pytest.mark.private_node]

#: L2's backlog in ``nox -s tests``; the soak run uses 100k (``test_soak.py``).
L2_BACKLOG = int(os.environ.get("AMQP_BATCH_L2_BACKLOG", "20000"))


# --------------------------------------------------------------------- helpers


def _settings(url: str, queue: str, **overrides: object) -> BatchConsumerSettings:
    values: dict[str, object] = {
        "url": url,
        "queue_name": queue,
        "prefetch_count": 20,
        "batch_size": 5,
        "batch_timeout": 0.05,
        "shutdown_timeout": 10.0,
        "connection_name": queue,
        "reconnect_backoff_base": 0.05,
        "reconnect_backoff_cap": 0.2,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)  # type: ignore[arg-type]


class Tracked(BatchConsumer[BatchConsumerSettings]):
    """A consumer whose handler is a function, remembering every state change."""

    def __init__(
        self,
        settings: BatchConsumerSettings,
        handler: Callable[[Sequence[Message]], AsyncIterator[MessageResult]],
        **kwargs: Any,
    ) -> None:
        super().__init__(settings, **kwargs)
        self._handle = handler
        #: (time, worker, new state)
        self.transitions: list[tuple[float, int, WorkerState]] = []
        self.errors: list[str] = []
        self._changed = anyio.Event()

    def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        return self._handle(messages)

    def on_worker_state_change(
        self, health: WorkerHealth, previous: WorkerState
    ) -> None:
        self.transitions.append((anyio.current_time(), health.index, health.state))
        if health.state is WorkerState.BACKING_OFF and health.last_error:
            self.errors.append(health.last_error)
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        """Wait for the next state change."""
        await self._changed.wait()

    def entered(self, state: WorkerState, since: float, worker: int) -> float | None:
        """When ``worker`` first entered ``state`` after ``since``, if it did."""
        return next(
            (
                t
                for t, w, s in self.transitions
                if w == worker and s is state and t > since
            ),
            None,
        )

    async def wait_entered(
        self, state: WorkerState, since: float, workers: Iterable[int], timeout: float
    ) -> float:
        """Wait until every worker in ``workers`` entered ``state`` after
        ``since``; return the latest of those times."""
        wanted = list(workers)
        with anyio.fail_after(timeout):
            while True:
                times = [self.entered(state, since, w) for w in wanted]
                if all(t is not None for t in times):
                    return max(t for t in times if t is not None)
                await self._changed.wait()


class Gate:
    """Wraps a recorder's handler: once armed, the next batch waits in the handler
    (shielded, so it outlives its session) until released."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.armed = False
        self.holding = anyio.Event()
        self._release = anyio.Event()

    def arm(self) -> None:
        self.armed = True
        self.holding = anyio.Event()
        self._release = anyio.Event()

    def release(self) -> None:
        self._release.set()

    async def handler(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        if self.armed:
            self.armed = False
            self.holding.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self._release.wait()
        async for result in self.recorder.handler(messages):
            yield result


def _duplicates(recorder: Recorder) -> int:
    return sum(n - 1 for n in recorder.seen.values() if n > 1)


async def publish_many(
    url: str, queue: str, count: int, *, start: int = 0
) -> list[str]:
    """Like ``publish_numbered``, with up to 500 confirms outstanding at once."""
    confirmed: list[str] = []
    async with admin_channel(url) as channel:
        for first in range(start, start + count, 500):
            chunk = [str(n) for n in range(first, min(first + 500, start + count))]
            waiters = [
                channel.start_publish(
                    text.encode(),
                    routing_key=queue,
                    properties=Properties(message_id=text, delivery_mode=2),
                )
                for text in chunk
            ]
            for waiter in waiters:
                assert waiter is not None
                await waiter.wait()
            confirmed.extend(chunk)
    return confirmed


def _log_offset(node: PrivateNode) -> int:
    try:
        return node.log_file.stat().st_size
    except OSError:
        return 0


def _log_since(node: PrivateNode, offset: int) -> str:
    with node.log_file.open("rb") as log:
        log.seek(offset)
        return log.read().decode("utf-8", "replace")


def _assert_no_unknown_tag(
    node: PrivateNode, log_offset: int, errors: Iterable[str], caplog: Any
) -> None:
    """No ack of a dead session reached a new channel: the broker never closed a
    channel with 406 ("unknown delivery tag")."""
    broker_log = _log_since(node, log_offset)
    assert "unknown delivery tag" not in broker_log
    for error in errors:
        # The reply code as a word: a URL's port (127.0.0.1:40675) is not one.
        assert "PRECONDITION_FAILED" not in error, error
        assert not re.search(r"\b406\b", error), error
    for record in caplog.records:
        text = record.getMessage()
        assert "unknown delivery tag" not in text and "PRECONDITION_FAILED" not in text


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The consumer's transport (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


@pytest.fixture
async def queue(private_node: PrivateNode, unique_name: str) -> AsyncIterator[str]:
    async with admin_channel(private_node.url) as channel:
        await channel.queue_declare(unique_name, durable=True)
    yield unique_name
    await cleanup(private_node.url, queues=[unique_name])


# --------------------------------------------------------------------- L2


@over_transports
async def test_l2_backlog_unacked_bounded(
    private_node: PrivateNode, queue: str, figures: Any, transport: Any
) -> None:
    """A backlog of ``L2_BACKLOG`` messages (20k by default, 100k in the soak run):
    the broker never holds more than workers x prefetch unacked; invariant."""
    await run_l2(private_node, queue, figures, L2_BACKLOG, transport)


async def run_l2(
    node: PrivateNode, queue: str, figures: Any, backlog: int, transport: Any = None
) -> None:
    """Consume ``backlog`` messages with 4 workers (prefetch 50) while sampling the
    queue's unacked count; halfway, the handlers pause until two samples were
    taken, so the broker is sampled with every worker's prefetch full."""
    workers, prefetch = 4, 50
    started = anyio.current_time()
    confirmed = await publish_many(node.url, queue, backlog)
    published_s = anyio.current_time() - started
    recorder = Recorder()
    samples: list[tuple[int, int]] = []
    stop_sampling = threading.Event()
    paused = anyio.Event()
    resume = anyio.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append(node.queue_counts(queue))

    async def handler(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        if recorder.seen.total() >= backlog // 2 and not resume.is_set():
            paused.set()
            await resume.wait()
        async for result in recorder.handler(messages):
            yield result

    settings = _settings(
        node.url,
        queue,
        num_workers=workers,
        prefetch_count=prefetch,
        batch_size=25,
    )
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: anyio.to_thread.run_sync(sample))
        try:
            started = anyio.current_time()
            async with Tracked(settings, handler, transport=transport):
                await paused.wait()
                paused_at, taken = anyio.current_time(), len(samples)
                with anyio.fail_after(30):
                    while len(samples) < taken + 2:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                resume.set()
                pause_s = anyio.current_time() - paused_at
                await recorder.wait_decided(confirmed, timeout=120)
            consumed_s = anyio.current_time() - started - pause_s
        finally:
            stop_sampling.set()
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=0)
    busy = [unacked for ready, unacked in samples if unacked]
    assert busy, f"no sample saw the consumer at work: {samples}"
    assert max(busy) <= workers * prefetch, samples
    figures.record(
        "L2",
        backlog=backlog,
        workers=workers,
        prefetch=prefetch,
        max_unacked=max(busy),
        bound=workers * prefetch,
        samples=len(samples),
        publish_s=round(published_s, 2),
        consume_s=round(consumed_s, 2),
        msgs_per_s=round(backlog / consumed_s),
        **report.figures(),
    )


# --------------------------------------------------------------------- F1


@over_transports
async def test_f1_connection_cut_mid_batch_repeatedly(
    private_node: PrivateNode, queue: str, figures: Any, caplog: Any, transport: Any
) -> None:
    """Six cuts with a batch in the handler: FIN and RST through a proxy and the
    broker's own ``close_connection``. Every cut hits both workers; each recovers;
    duplicates per cut stay within what was in flight (workers x prefetch); no
    stale ack reaches a new channel (no 406 "unknown delivery tag")."""
    node = private_node
    workers, prefetch, per_cut = 2, 20, 100
    cuts = ["fin", "rst", "close", "fin", "rst", "close"]
    log_offset = _log_offset(node)
    recorder = Recorder()
    gate = Gate(recorder)
    confirmed: list[str] = []
    recoveries: dict[str, list[float]] = {}
    duplicates: list[int] = []
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        settings = _settings(
            proxy.url_for(), queue, num_workers=workers, prefetch_count=prefetch
        )
        consumer = Tracked(settings, gate.handler, transport=transport)
        with anyio.fail_after(90):
            async with consumer:
                for number, how in enumerate(cuts):
                    gate.arm()
                    confirmed += await publish_many(
                        node.url, queue, per_cut, start=number * per_cut
                    )
                    await gate.holding.wait()
                    before = _duplicates(recorder)
                    cut_at = anyio.current_time()
                    if how == "close":
                        async with anyio.create_task_group() as group:
                            for worker in range(workers):
                                group.start_soon(
                                    anyio.to_thread.run_sync,
                                    node.close_connection,
                                    f"{queue}-w{worker}",
                                )
                    else:
                        assert proxy.cut(rst=how == "rst") == workers
                        await proxy.wait_closed()
                    # The held batch finishes after its session died: its acks
                    # must never reach the new channel.
                    gate.release()
                    released_at = anyio.current_time()
                    back = await consumer.wait_entered(
                        WorkerState.CONSUMING, cut_at, range(workers), timeout=20
                    )
                    # From the cut (proxy) or from the moment the broker had
                    # closed both connections and the held batch was let go
                    # (close_connection: the CLI takes ~1 s to do it).
                    start = released_at if how == "close" else cut_at
                    recoveries.setdefault(how, []).append(round(back - start, 3))
                    await recorder.wait_decided(confirmed, timeout=30)
                    duplicates.append(_duplicates(recorder) - before)
                    assert duplicates[-1] <= workers * prefetch
            health = consumer.health()
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=len(cuts) * workers * prefetch)
    # Exactly one reconnect per cut: a stale ack would have closed a new channel
    # (406) and cost another one.
    assert [h.reconnect_count for h in health] == [len(cuts)] * workers, consumer.errors
    _assert_no_unknown_tag(node, log_offset, consumer.errors, caplog)
    assert sum(duplicates) == report.duplicates
    figures.record(
        "F1",
        cuts=len(cuts),
        kinds=",".join(cuts),
        recovery_s_max=max(max(times) for times in recoveries.values()),
        recovery_s_fin=recoveries["fin"],
        recovery_s_rst=recoveries["rst"],
        recovery_s_close=recoveries["close"],
        duplicates_per_cut=duplicates,
        in_flight_bound=workers * prefetch,
        **report.figures(),
    )


# --------------------------------------------------------------------- F2


@over_transports
async def test_f2_cut_after_n_bytes(
    private_node: PrivateNode, queue: str, figures: Any, transport: Any
) -> None:
    """For N = 64 * 2**k, k = 0..10 (64 B to 64 KiB: the handshake, the channel
    setup and then consuming) and at each step of the handshake, a connection is
    cut once N bytes reached the client (FIN and RST alternately). The worker
    recovers from every offset (a cut while authenticating is a network failure,
    not bad credentials) and every id is decided; invariant at the end."""
    node = private_node
    prefetch = 20
    recorder = Recorder()
    confirmed: list[str] = []
    stages: dict[int, str] = {}
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        settings = _settings(proxy.url_for(), queue, prefetch_count=prefetch)
        consumer = Tracked(settings, recorder.handler, transport=transport)
        handshake = await _handshake_bytes(proxy)
        # connection.start ends 33 bytes before open-ok's end (tune: 20, open-ok:
        # 13): cut right after start (while authenticating), inside tune, after
        # tune (opening the vhost) and right after open-ok (opening the channel).
        steps = [handshake - 33, handshake - 25, handshake - 13, handshake]
        offsets = sorted({*(64 * 2**k for k in range(11)), *steps})
        with anyio.fail_after(90):
            async with consumer:
                for n_bytes in offsets:
                    k = offsets.index(n_bytes)
                    count = max(50, n_bytes // 100)
                    proxy.cut_after(n_bytes, rst=k % 2 == 1, connections=1)
                    cut_at = anyio.current_time()
                    proxy.cut()
                    # Published after the cut: they flow through the faulty
                    # connection (enough bytes to reach N while consuming).
                    confirmed += await publish_many(
                        node.url, queue, count, start=len(confirmed)
                    )
                    # Backing off twice (the cut, then the faulty connection
                    # dying at N bytes), then consuming on a clean connection.
                    stages[n_bytes] = await _wait_second_recovery(consumer, cut_at)
                    await recorder.wait_decided(confirmed, timeout=30)
            health = consumer.health()[0]
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=len(offsets) * prefetch)
    assert health.reconnect_count >= 2 * len(offsets)
    assert "setup" in stages.values() and "consuming" in stages.values(), stages
    figures.record(
        "F2",
        offsets=len(stages),
        handshake_bytes=handshake,
        cut_during_setup=[n for n, s in stages.items() if s == "setup"],
        cut_while_consuming=[n for n, s in stages.items() if s == "consuming"],
        reconnects=health.reconnect_count,
        **report.figures(),
    )


async def _handshake_bytes(proxy: FaultProxy) -> int:
    """Bytes the broker sends through ``proxy`` up to connection.open-ok.

    Counted once the link is gone (the proxy counts a chunk after forwarding
    it): everything the broker sent, less its connection.close-ok (12 bytes).
    """
    before = proxy.bytes_to_client
    async with connect(parse_url(proxy.url_for())):
        pass
    await proxy.wait_closed()
    return proxy.bytes_to_client - before - 12


async def _wait_second_recovery(consumer: Tracked, since: float) -> str:
    """Wait until worker 0 backed off twice after ``since`` and consumes again;
    say whether the connection in between got as far as consuming."""

    def after() -> list[WorkerState]:
        return [s for t, w, s in consumer.transitions if w == 0 and t > since]

    with anyio.fail_after(20):
        while True:
            states = after()
            if (
                states.count(WorkerState.BACKING_OFF) >= 2
                and states[-1] is WorkerState.CONSUMING
            ):
                break
            await consumer.changed()
    first, second = (i for i, s in enumerate(states) if s is WorkerState.BACKING_OFF)
    between = states[first:second]
    return "consuming" if WorkerState.CONSUMING in between else "setup"


# --------------------------------------------------------------------- F3


@over_transports
async def test_f3_stalled_connection_detected(
    private_node: PrivateNode, queue: str, figures: Any, transport: Any
) -> None:
    """The proxy stops forwarding (sockets stay open) while a batch is in the
    handler. Heartbeat 1 s: the worker gives the connection up within 2 x heartbeat
    + 1 s, its reconnects time out while the stall lasts, and once traffic flows
    again it consumes; no task hangs (the consumer stops promptly); invariant."""
    node = private_node
    heartbeat, prefetch = 1, 20
    recorder = Recorder()
    gate = Gate(recorder)
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        settings = _settings(
            proxy.url_for() + "?connection_timeout=2",
            queue,
            heartbeat=heartbeat,
            prefetch_count=prefetch,
        )
        consumer = Tracked(settings, gate.handler, transport=transport)
        with anyio.fail_after(60):
            async with consumer:
                confirmed = await publish_many(node.url, queue, 50)
                await recorder.wait_decided(confirmed, timeout=20)
                gate.arm()
                confirmed += await publish_many(node.url, queue, 50, start=50)
                await gate.holding.wait()
                stalled_at = anyio.current_time()
                proxy.stall()
                gate.release()  # its acks go into the stalled connection
                lost_at = await consumer.wait_entered(
                    WorkerState.BACKING_OFF, stalled_at, [0], timeout=2 * heartbeat + 5
                )
                # A reconnect while stalled cannot finish its handshake.
                await consumer.wait_entered(
                    WorkerState.BACKING_OFF, lost_at, [0], timeout=10
                )
                resumed_at = anyio.current_time()
                proxy.resume()
                back = await consumer.wait_entered(
                    WorkerState.CONSUMING, resumed_at, [0], timeout=10
                )
                await recorder.wait_decided(confirmed, timeout=20)
                stopping_at = anyio.current_time()
            stop_s = anyio.current_time() - stopping_at
    detection_s = lost_at - stalled_at
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=prefetch)
    assert detection_s <= 2 * heartbeat + 1, detection_s
    assert any("2 x heartbeat" in error for error in consumer.errors), consumer.errors
    assert stop_s < 2
    figures.record(
        "F3",
        heartbeat_s=heartbeat,
        detection_s=round(detection_s, 3),
        bound_s=2 * heartbeat + 1,
        recovery_after_resume_s=round(back - resumed_at, 3),
        stop_s=round(stop_s, 3),
        **report.figures(),
    )


# --------------------------------------------------------------------- F4


@over_transports
async def test_f4_broker_stop_app_start_app(
    destructive_node: PrivateNode, queue: str, figures: Any, transport: Any
) -> None:
    """``rabbitmqctl stop_app`` with a batch in the handler, then ``start_app``:
    both workers consume again within ~2 s of the broker being back; every
    confirmed (persistent, durable) id is acked once the batch held across the
    restart is redelivered; invariant."""
    node = destructive_node
    workers, prefetch = 2, 20
    recorder = Recorder()
    gate = Gate(recorder)
    settings = _settings(
        node.url,
        queue,
        num_workers=workers,
        prefetch_count=prefetch,
        reconnect_backoff_cap=0.5,
    )
    consumer = Tracked(settings, gate.handler, transport=transport)
    with anyio.fail_after(90):
        async with consumer:
            gate.arm()
            confirmed = await publish_many(node.url, queue, 200)
            await gate.holding.wait()
            stopped_at = anyio.current_time()
            await anyio.to_thread.run_sync(node.stop_app)
            stop_app_s = anyio.current_time() - stopped_at
            gate.release()
            await consumer.wait_entered(
                WorkerState.BACKING_OFF, stopped_at, range(workers), timeout=10
            )
            async with anyio.create_task_group() as group:
                group.start_soon(anyio.to_thread.run_sync, node.start_app)
                started_at = await _port_opens(node.amqp_port, timeout=60)
            back = await consumer.wait_entered(
                WorkerState.CONSUMING, stopped_at, range(workers), timeout=10
            )
            await recorder.wait_decided(confirmed, timeout=30)
    recovery_s = back - started_at
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=workers * prefetch)
    assert recovery_s <= 2.0, recovery_s
    figures.record(
        "F4",
        stop_app_s=round(stop_app_s, 2),
        # from the moment the broker's AMQP port accepts connections again
        recovery_after_start_s=round(recovery_s, 3),
        reconnects=[h.reconnect_count for h in consumer.health()],
        **report.figures(),
    )


async def _port_opens(port: int, timeout: float) -> float:
    """Poll until 127.0.0.1:``port`` accepts a connection; return when it did."""
    with anyio.fail_after(timeout):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.02)
                continue
            opened_at = anyio.current_time()
            await stream.aclose()
            return opened_at


# --------------------------------------------------------------------- F10


class _CutBeforeAck:
    """A transport (``inner``), with one fault: at the first ``ack`` after a
    republished copy was confirmed, the proxy cuts every connection and the ack
    is never sent. That is the window between a copy's confirm and its
    original's ack, hit exactly."""

    def __init__(self, inner: Any, proxy: FaultProxy) -> None:
        self._inner = inner
        self._proxy = proxy
        self.confirmed_copies: list[str] = []
        #: Copies confirmed when the cut came (their originals were not acked).
        self.cut_with: list[str] | None = None

    def open_session(self, spec: Any) -> Any:
        @asynccontextmanager
        async def session() -> AsyncIterator[Any]:
            async with self._inner.open_session(spec) as inner:
                yield _CuttingSession(inner, self)

        return session()

    def open_publisher(self, parameters: Any, *, declare: Any = ()) -> Any:
        @asynccontextmanager
        async def publisher() -> AsyncIterator[Any]:
            async with self._inner.open_publisher(parameters, declare=declare) as inner:
                yield _TrackingPublisher(inner, self)

        return publisher()

    async def before_ack(self) -> None:
        if self.cut_with is None and self.confirmed_copies:
            self.cut_with = list(self.confirmed_copies)
            self._proxy.cut(rst=True)
            # The session dies under us (its task group is cancelled): the ack
            # is never written.
            await anyio.sleep_forever()


class _CuttingSession:
    def __init__(self, inner: Any, transport: _CutBeforeAck) -> None:
        self._inner = inner
        self._transport = transport
        self.deliveries = inner.deliveries

    @property
    def consumer_cancelled_by_broker(self) -> bool:
        return bool(self._inner.consumer_cancelled_by_broker)

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        await self._transport.before_ack()
        await self._inner.ack(delivery_tag, multiple=multiple)

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        await self._inner.nack(delivery_tag, multiple=multiple, requeue=requeue)

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        await self._inner.reject(delivery_tag, requeue=requeue)

    async def cancel(self) -> None:
        await self._inner.cancel()


class _TrackingPublisher:
    def __init__(self, inner: Any, transport: _CutBeforeAck) -> None:
        self._inner = inner
        self._transport = transport

    def start_publish(self, body: bytes, **kwargs: Any) -> _TrackingConfirmation:
        properties = kwargs.get("properties")
        message_id = properties.message_id if properties is not None else None
        return _TrackingConfirmation(
            self._inner.start_publish(body, **kwargs), self._transport, message_id
        )

    async def publish(self, body: bytes, **kwargs: Any) -> None:
        await self.start_publish(body, **kwargs).wait()


class _TrackingConfirmation:
    """Notes the copy's message id once the broker confirmed it."""

    def __init__(
        self, inner: Any, transport: _CutBeforeAck, message_id: str | None
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._message_id = message_id

    @property
    def done(self) -> bool:
        return bool(self._inner.done)

    async def wait(self) -> None:
        await self._inner.wait()
        if self._message_id is not None:
            self._transport.confirmed_copies.append(self._message_id)


@over_transports
async def test_f10_cut_between_republish_confirm_and_ack(
    private_node: PrivateNode, queue: str, figures: Any, transport: Any
) -> None:
    """REQUEUE traffic (retry 0 -> REQUEUE, retry 1 -> ACK). The connections are
    cut after the first batch's copies are confirmed and before their originals'
    ack is written. The originals come back (redelivered) and are requeued again:
    each message gets at most one duplicate copy; nothing is lost; every id ends
    acked at retry 1 and the queue is empty."""
    node = private_node
    prefetch = 10
    recorder = Recorder(
        lambda m: MessageResult.REQUEUE if m.retry_count == 0 else MessageResult.ACK
    )
    async with FaultProxy("127.0.0.1", node.amqp_port) as proxy:
        cutting = _CutBeforeAck(transport, proxy)
        settings = _settings(
            proxy.url_for(), queue, prefetch_count=prefetch, batch_size=prefetch
        )
        consumer = Tracked(settings, recorder.handler, transport=cutting)
        with anyio.fail_after(60):
            async with consumer:
                confirmed = await publish_many(node.url, queue, 30)
                await recorder.wait_decided(confirmed, timeout=30)
    report = await check(node.url, queue, None, recorder, confirmed)
    assert cutting.cut_with, "the cut never happened"
    cut_with = set(cutting.cut_with)
    assert not report.lost and not report.unexpected and not report.twice_settled
    assert not report.still_queued and report.acked == set(confirmed)
    # Per message and retry count: seen at most twice (one duplicate copy).
    assert max(recorder.seen.values()) <= 2, recorder.seen
    for message_id in cut_with:
        # The original came back flagged, its second copy is the duplicate.
        assert recorder.seen[(message_id, 0)] == 2
        assert recorder.redelivered[(message_id, 0)] == 1
    duplicated = {i for (i, retry), n in recorder.seen.items() if retry == 1 and n > 1}
    assert cut_with <= duplicated
    assert consumer.health()[0].reconnect_count == 1
    figures.record(
        "F10",
        copies_confirmed_at_cut=len(cut_with),
        messages_with_a_duplicate_copy=len(duplicated),
        max_copies_per_message=max(
            n for (_, retry), n in recorder.seen.items() if retry == 1
        ),
        **report.figures(),
    )


# --------------------------------------------------------------------- F6


async def _until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll a (blocking, e.g. rabbitmqctl) ``predicate`` in a thread until true."""
    with anyio.fail_after(timeout):
        while not await anyio.to_thread.run_sync(predicate):  # noqa: ASYNC110
            await anyio.sleep(interval)


def _open_batches(process: ConsumerProcess) -> list[list[str]]:
    """Batches that entered the handler and have no decision (yet)."""
    decided = {line.split()[1] for line in process.lines if line.startswith("decided ")}
    return [
        line.split()[2:]
        for line in process.lines
        if line.startswith("batch ") and line.split()[1] not in decided
    ]


@over_transports
async def test_f6_worker_process_sigkill(
    private_node: PrivateNode,
    queue: str,
    anyio_backend: str,
    transport_kind: str,
    figures: Any,
) -> None:
    """A consumer process (2 workers) acks 30 messages, then holds one batch in
    each worker's handler; it is SIGKILLed once its acks reached the broker. Only
    its unacked messages come back (those in the held batches among them, flagged
    redelivered); a second consumer takes exactly those: no duplicates, nothing
    lost."""
    node = private_node
    total = 100
    confirmed = await publish_many(node.url, queue, total)
    async with ConsumerProcess(
        node.url,
        queue,
        backend=anyio_backend,
        transport=transport_kind,
        workers=2,
        prefetch=10,
        batch_size=5,
        mode="block-after",
        block_after=30,
        connection_name=queue,
    ) as process:
        await process.wait_until(
            lambda: len(_open_batches(process)) == 2, 20, "for two held batches"
        )
        decided = set(process.decided_ids())
        held = {i for batch in _open_batches(process) for i in batch}
        # Everything it decided is acked at the broker; the rest is queued or
        # unacked (prefetched or held).
        await _until(
            lambda: sum(node.queue_counts(queue)) == total - len(decided),
            20,
            "for the acks to land",
        )
        killed_at = anyio.current_time()
        process.kill()
        assert await process.wait_exit(10) == -signal.SIGKILL
    await _until(lambda: node.queue_counts(queue)[1] == 0, 20, "for the requeue")
    requeued_s = anyio.current_time() - killed_at
    recorder = Recorder()
    process.replay(recorder)
    assert recorder.acked == decided
    before = dict(recorder.redelivered)
    async with Tracked(
        _settings(node.url, queue),
        recorder.handler,
        transport=make_transport(transport_kind),
    ):
        await recorder.wait_decided(confirmed, timeout=30)
    came_back = {
        i for (i, _), n in recorder.redelivered.items() if n > before.get(i, 0)
    }
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=0)
    assert held <= came_back
    assert not came_back & decided
    figures.record(
        "F6",
        decided_before_kill=len(decided),
        held_in_handler=len(held),
        redelivered_after_kill=len(came_back),
        requeued_after_s=round(requeued_s, 2),
        **report.figures(),
    )


# --------------------------------------------------------------------- F7


def _after(lines: list[str], marker: str) -> list[str]:
    index = next(i for i, line in enumerate(lines) if marker in line)
    return lines[index + 1 :]


@over_transports
async def test_f7_sigterm_batches_in_flight_finish(
    private_node: PrivateNode,
    queue: str,
    anyio_backend: str,
    transport_kind: str,
    figures: Any,
) -> None:
    """SIGTERM while four batches are in the handler (2 workers x 2 concurrent):
    the receiver takes no delivery after the signal, the four batches (and the
    one being collected) finish and are acked, the process exits within
    shutdown_timeout + 1 s, and exactly the undecided ids are still queued."""
    node = private_node
    shutdown_timeout = 5.0
    confirmed = await publish_many(node.url, queue, 100)
    async with ConsumerProcess(
        node.url,
        queue,
        backend=anyio_backend,
        transport=transport_kind,
        workers=2,
        prefetch=20,
        batch_size=5,
        batch_timeout=30,
        max_concurrent=2,
        shutdown_timeout=shutdown_timeout,
        mode="hold-until-stop",
        trace_took=True,
        connection_name=queue,
    ) as process:
        await process.wait_until(
            lambda: len(process.batches()) >= 4, 20, "for four batches"
        )
        in_flight = len(_open_batches(process))
        signalled_at = anyio.current_time()
        process.send_signal(signal.SIGTERM)
        assert await process.wait_exit(shutdown_timeout + 5) == 0, process.tail()
        exit_s = anyio.current_time() - signalled_at
    lines = process.lines
    assert lines[-1] == "exited"
    after_signal = _after(lines, "SIGTERM: stopping gracefully")
    assert not [line for line in after_signal if line.startswith("took ")]
    assert not _open_batches(process), "a batch in flight did not finish"
    recorder = Recorder()
    process.replay(recorder)
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=0, allow_still_queued=True)
    assert set(report.still_queued) == set(confirmed) - recorder.acked
    assert exit_s <= shutdown_timeout + 1
    figures.record(
        "F7",
        case="batches finish",
        in_flight_at_signal=in_flight,
        batches=len(process.batches()),
        exit_s=round(exit_s, 3),
        bound_s=shutdown_timeout + 1,
        **report.figures(),
    )


@over_transports
async def test_f7_sigterm_handler_past_shutdown_timeout(
    private_node: PrivateNode,
    queue: str,
    anyio_backend: str,
    transport_kind: str,
    figures: Any,
) -> None:
    """SIGTERM while batches are in the handler, one of which never finishes: the
    process exits within shutdown_timeout + 1 s, the unfinished batch is never
    acked (its ids are back in the queue, flagged redelivered), the others were
    acked, even one that finished behind it in tag order; invariant."""
    node = private_node
    shutdown_timeout = 1.5
    confirmed = await publish_many(node.url, queue, 60)
    async with ConsumerProcess(
        node.url,
        queue,
        backend=anyio_backend,
        transport=transport_kind,
        workers=2,
        prefetch=10,
        batch_size=5,
        batch_timeout=30,
        max_concurrent=2,
        shutdown_timeout=shutdown_timeout,
        mode="hold-until-stop",
        hang_id="0",
        trace_took=True,
        connection_name=queue,
    ) as process:
        await process.wait_until(
            lambda: (
                len(process.batches()) >= 4
                and any("0" in batch for batch in process.batches())
            ),
            20,
            "for four batches, one with id 0",
        )
        signalled_at = anyio.current_time()
        process.send_signal(signal.SIGTERM)
        assert await process.wait_exit(shutdown_timeout + 5) == 0, process.tail()
        exit_s = anyio.current_time() - signalled_at
    unfinished = _open_batches(process)
    assert len(unfinished) == 1 and "0" in unfinished[0]
    assert any("shutdown_timeout" in line for line in process.lines)
    after_signal = _after(process.lines, "SIGTERM: stopping gracefully")
    assert not [line for line in after_signal if line.startswith("took ")]
    recorder = Recorder()
    process.replay(recorder)
    async with admin_channel(node.url) as channel:
        back = {
            str(d.properties.message_id): d.redelivered
            for d in await _peek_all(channel, queue)
        }
    report = await check(node.url, queue, None, recorder, confirmed)
    report.assert_holds(max_duplicates=0, allow_still_queued=True)
    assert set(unfinished[0]) <= set(report.still_queued)
    assert all(back[i] for i in unfinished[0])
    # Batches that finished behind the unfinished one (in tag order, on the same
    # worker) were settled all the same: nothing decided came back.
    decided_not_acked = recorder.acked & set(report.still_queued)
    assert not decided_not_acked
    assert exit_s <= shutdown_timeout + 1
    figures.record(
        "F7",
        case="handler past shutdown_timeout",
        exit_s=round(exit_s, 3),
        bound_s=shutdown_timeout + 1,
        unfinished=len(unfinished[0]),
        decided_but_requeued=len(decided_not_acked),
        **report.figures(),
    )


async def _peek_all(channel: Any, queue: str) -> list[Any]:
    """Every message in ``queue``, taken without ack and put back (requeued)."""
    taken = []
    while (delivery := await channel.basic_get(queue, no_ack=False)) is not None:
        taken.append(delivery)
    if taken:
        channel.nack(taken[-1].delivery_tag, multiple=True, requeue=True)
    return taken
