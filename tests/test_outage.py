"""Riding out a dependency outage, on a real broker, on asyncio and trio."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from itertools import pairwise
from typing import Any

import anyio
import pytest
from tests.support.invariant import Recorder, Report, check, publish_numbered
from tests.support.rabbit_node import PrivateNode
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    ChannelClosed,
    ConsumerHooks,
    Message,
    MessageResult,
    Settlement,
    SettleOutcome,
    batch_consumer,
)
from amqp_batch._delays import delay_queues
from amqp_batch._retry import RetryPolicy, sign_original, trusted_original
from amqp_batch._transport._base import Delivery, Properties
from amqp_batch.idempotency import MemoryIdempotencyStore
from consumer_support import (
    admin_channel,
    cleanup,
    message_count,
    publish_ids,
    take,
    unique_name,
)


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The consumer's transport (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_delivery_count_from_a_quorum_queue(
    broker_url: str, queue_type: str
) -> None:
    """``Message.delivery_count`` is the quorum queue's ``x-delivery-count``:
    0, 1, 2 over two REQUEUE_IMMEDIATEs; a classic queue does not count (0)."""
    queue = unique_name()
    counts: list[int] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            counts.append(message.delivery_count)
            if len(counts) < 3:
                yield MessageResult.REQUEUE_IMMEDIATE
            else:
                done.set()
                yield MessageResult.ACK

    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        queue_arguments={"x-queue-type": queue_type},
        batch_size=1,
        batch_timeout=0.05,
        connection_name=queue,
    )
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["m"], routing_key=queue)
            with anyio.fail_after(20):
                await done.wait()
    finally:
        await cleanup(broker_url, queues=[queue])
    assert counts == ([0, 1, 2] if queue_type == "quorum" else [0, 0, 0])


# ------------------------------------------------------------------ the outage

#: How long the dependency is down (the scenario's clock; scaled down from a
#: minute so the test runs in seconds on a shared machine).
OUTAGE_S = 4.0
DELAYS = (0.5, 1.0, 2.0)
MESSAGES = 30


class Dependency:
    """The handler's dependency: down while ``down`` is set (flipped by the
    test), recording when each attempt of each message reached the handler."""

    def __init__(self) -> None:
        self.down = True
        self.recovered_at: float | None = None
        #: id -> [(retry_count, time the attempt reached the handler)]
        self.attempts: dict[str, list[tuple[int, float]]] = defaultdict(list)
        #: id -> how often the handler ACKed it.
        self.acks: Counter[str] = Counter()

    def decide(self, message: Message) -> MessageResult:
        message_id = message.message_id or ""
        self.attempts[message_id].append((message.retry_count, anyio.current_time()))
        if self.down:
            return MessageResult.REQUEUE
        self.acks[message_id] += 1
        return MessageResult.ACK

    async def outage(self) -> None:
        await anyio.sleep(OUTAGE_S)  # the length of the outage, not a sync
        self.down = False
        self.recovered_at = anyio.current_time()


def _outage_settings(url: str, queue: str, dlx: str, dlq: str, **overrides: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {
        "url": url,
        "queue_name": queue,
        "prefetch_count": 20,
        "batch_size": 5,
        "batch_timeout": 0.05,
        "shutdown_timeout": 10.0,
        "connection_name": queue,
        "dead_letter_exchange": dlx,
        "dead_letter_queue": dlq,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)  # type: ignore[arg-type]


async def _ride(
    url: str, settings: BatchConsumerSettings, dependency: Dependency, transport: Any
) -> tuple[Report, BatchConsumer[BatchConsumerSettings]]:
    """Publish MESSAGES ids, run the consumer through the outage until every id
    has its final decision, then check the invariant."""
    recorder = Recorder(dependency.decide, max_requeue=settings.max_requeue_attempts)
    consumer = _Consumer(settings, recorder.handler, transport=transport)
    delay_names = [spec.name for spec in delay_queues(settings.queue_name, DELAYS)]
    try:
        with anyio.fail_after(90):
            async with consumer, anyio.create_task_group() as group:
                confirmed = await publish_numbered(url, settings.queue_name, MESSAGES)
                group.start_soon(dependency.outage)
                await recorder.wait_decided(confirmed, timeout=80)
        report = await check(
            url, settings.queue_name, settings.dead_letter_queue, recorder, confirmed
        )
    finally:
        await cleanup(
            url,
            queues=[settings.queue_name, str(settings.dead_letter_queue), *delay_names],
            exchanges=[str(settings.dead_letter_exchange)],
        )
    return report, consumer


def _record_outage(
    figures: Any, row: str, dependency: Dependency, report: Report, **extra: object
) -> None:
    """The row's figures: handler calls during the outage, how long after the
    recovery the last id was acked, the smallest gap between two attempts."""
    recovered = dependency.recovered_at or 0.0
    last = [attempts[-1][1] for attempts in dependency.attempts.values()]
    gaps = [
        after - before
        for attempts in dependency.attempts.values()
        for (_, before), (_, after) in pairwise(attempts)
    ]
    figures.record(
        row,
        outage_s=OUTAGE_S,
        calls_during_outage=sum(
            1 for a in dependency.attempts.values() for _, t in a if t < recovered
        ),
        drained_after_recovery_s=round(max(last, default=recovered) - recovered, 3),
        min_attempt_gap_s=round(min(gaps, default=0.0), 3),
        **extra,
        **report.figures(),
    )


class _Consumer(BatchConsumer[BatchConsumerSettings]):
    def __init__(
        self,
        settings: BatchConsumerSettings,
        handler: Any,
        *,
        transport: Any = None,
        hooks: Sequence[ConsumerHooks] = (),
    ) -> None:
        super().__init__(settings, transport=transport, hooks=hooks)
        self._handle = handler

    def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        return self._handle(messages)  # type: ignore[no-any-return]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@over_transports
async def test_r1_outage_delayed_retries_and_kill_switch_lose_nothing(
    broker_url: str, queue_type: str, figures: Any, transport: Any
) -> None:
    """Delayed retries + kill switch: the dependency is down for OUTAGE_S; no
    message is dead-lettered, every message is acked exactly once after the
    recovery, attempts are spaced by at least their delays, the kill switch
    opened, probed and closed again, and nothing is lost; on a classic and on a
    quorum work queue (``queue_type``)."""
    queue, dlx, dlq = unique_name("outage"), unique_name("dlx"), unique_name("dlq")
    settings = _outage_settings(
        broker_url,
        queue,
        dlx,
        dlq,
        queue_type=queue_type,
        retry_delays=DELAYS,
        max_requeue_attempts=20,
        kill_switch_threshold=0.5,
        kill_switch_window=5.0,
        kill_switch_min_samples=5,
        kill_switch_cooldown=1.0,
    )
    dependency = Dependency()
    report, consumer = await _ride(broker_url, settings, dependency, transport)
    _record_outage(figures, "R1", dependency, report, queue_type=queue_type)
    report.assert_holds(max_duplicates=0)
    assert report.lost == frozenset()
    assert not report.dead_lettered, "nothing may be dead-lettered"
    assert dict(dependency.acks) == {str(n): 1 for n in range(MESSAGES)}
    assert dependency.recovered_at is not None
    for message_id, attempts in dependency.attempts.items():
        counts = [count for count, _ in attempts]
        assert counts == list(range(len(counts))), (message_id, counts)
        for (count, before), (_, after) in pairwise(attempts):
            wanted = DELAYS[min(count + 1, len(DELAYS)) - 1]
            assert after - before >= wanted, (message_id, count, after - before)
        assert attempts[-1][1] >= dependency.recovered_at
    transitions = consumer.health()[0].kill_switch_transitions
    moves = [t.split(":")[0] for t in transitions]
    assert moves[0] == "closed -> open"
    assert "open -> half_open" in moves
    assert moves[-1] == "half_open -> closed"
    health = consumer.health()[0]
    assert health.kill_switch == "closed"
    assert health.results.get("dead_lettered", 0) == 0
    assert health.results["ack"] == MESSAGES


async def test_queue_type_quorum_declares_every_queue_quorum(broker_url: str) -> None:
    """``queue_type="quorum"``: the work queue, its delay queues and the
    dead-letter queue are quorum queues (redeclaring one as classic is refused
    with 406), and a message REQUEUEd through a delay queue comes back."""
    queue, dlx, dlq = unique_name("qtype"), unique_name("dlx"), unique_name("dlq")
    settings = _outage_settings(
        broker_url, queue, dlx, dlq, queue_type="quorum", retry_delays=(0.2,)
    )
    seen: list[int] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen.append(message.retry_count)
            if message.retry_count == 0:
                yield MessageResult.REQUEUE
            else:
                done.set()
                yield MessageResult.ACK

    delay_names = [spec.name for spec in delay_queues(queue, (0.2,))]
    try:
        async with batch_consumer(settings, handle):
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["m"], routing_key=queue)
            with anyio.fail_after(20):
                await done.wait()
        for name in [queue, dlq, *delay_names]:
            async with admin_channel(broker_url) as channel:
                with pytest.raises(ChannelClosed) as refused:
                    await channel.queue_declare(
                        name, durable=True, arguments={"x-queue-type": "classic"}
                    )
            assert refused.value.reply_code == 406, name
    finally:
        await cleanup(broker_url, queues=[queue, dlq, *delay_names], exchanges=[dlx])
    assert seen == [0, 1]


@over_transports
async def test_r2_outage_without_them_dead_letters_like_today(
    broker_url: str, figures: Any, transport: Any
) -> None:
    """The same outage with immediate retries and no kill switch: copies go
    round the queue in milliseconds, run out of attempts and are dead-lettered
    while the dependency is still down. Nothing is lost: each id ends acked or
    dead-lettered, exactly once."""
    queue, dlx, dlq = unique_name("outage"), unique_name("dlx"), unique_name("dlq")
    settings = _outage_settings(broker_url, queue, dlx, dlq, max_requeue_attempts=3)
    dependency = Dependency()
    report, consumer = await _ride(broker_url, settings, dependency, transport)
    _record_outage(figures, "R2", dependency, report)
    report.assert_holds(max_duplicates=0)
    assert report.lost == frozenset()
    assert set(report.dead_lettered) | report.acked == report.confirmed
    assert len(report.dead_lettered) == MESSAGES  # all exhausted during the outage
    assert consumer.health()[0].kill_switch is None


# ------------------------------------------- forged x-original-* headers


def _delivery(
    exchange: str, routing_key: str, headers: dict[str, Any], message_id: str = "m"
) -> Delivery:
    return Delivery(
        delivery_tag=1,
        redelivered=False,
        exchange=exchange,
        routing_key=routing_key,
        consumer_tag="c",
        body=b"",
        properties=Properties(message_id=message_id, headers=headers),
    )


FORGED = {"x-original-exchange": "evil", "x-original-routing-key": "evil.key"}
KEY = b"0123456789abcdef-test-key"


def test_forged_headers_on_a_producer_message_are_replaced() -> None:
    """Regression: a producer's own x-original-* headers were kept on the copy,
    so the message was finally dead-lettered under the forged key."""
    policy = RetryPolicy(queue="orders", max_requeue_attempts=3)
    delivery = _delivery("events", "orders.created", dict(FORGED))
    assert not policy.is_copy(delivery)
    assert policy.original_destination(delivery) == ("events", "orders.created")
    headers = policy.requeue_properties(delivery, 1).headers or {}
    assert headers["x-original-exchange"] == "events"
    assert headers["x-original-routing-key"] == "orders.created"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-original-exchange": 1, "x-original-routing-key": "k"},
        {"x-original-exchange": "e", "x-original-routing-key": b"k"},
        {"x-original-exchange": "e", "x-original-routing-key": "k" * 256},
        {"x-original-exchange": "é" * 128, "x-original-routing-key": "k"},
        {"x-original-routing-key": "k"},
    ],
)
def test_malformed_original_headers_are_not_trusted(headers: dict[str, Any]) -> None:
    policy = RetryPolicy(queue="orders", max_requeue_attempts=3)
    delivery = _delivery("", "orders", headers)
    assert trusted_original(delivery, queue="orders") is None
    assert policy.original_destination(delivery) == ("", "orders")


def test_with_a_signing_key_only_signed_copies_are_trusted() -> None:
    policy = RetryPolicy(queue="orders", max_requeue_attempts=3, signing_key=KEY)
    original = _delivery("events", "orders.created", {})
    signed = policy.requeue_properties(original, 1).headers or {}
    assert signed["x-original-signature"] == sign_original(
        KEY, "events", "orders.created", "m"
    )
    copy = _delivery("", "orders", dict(signed))
    assert policy.is_copy(copy)
    assert policy.original_destination(copy) == ("events", "orders.created")
    # A forged copy: right shape, no or a wrong signature, or a signature of
    # another message.
    for forged in (
        dict(FORGED),
        {**FORGED, "x-original-signature": "0" * 64},
        {**FORGED, "x-original-signature": 5},
        {**signed, "x-original-routing-key": "evil.key"},
    ):
        delivery = _delivery("", "orders", forged)
        assert not policy.is_copy(delivery)
        assert policy.original_destination(delivery) == ("", "orders")
    stolen = _delivery("", "orders", dict(signed), message_id="other")
    assert not policy.is_copy(stolen)
    # The next copy of an untrusted one is signed for its real destination.
    again = policy.requeue_properties(_delivery("", "orders", dict(FORGED)), 2)
    assert (again.headers or {})["x-original-routing-key"] == "orders"
    # Without the key, signatures are dropped from copies.
    unsigned = RetryPolicy(queue="orders", max_requeue_attempts=3)
    assert "x-original-signature" not in (
        unsigned.requeue_properties(copy, 2).headers or {}
    )


@pytest.mark.parametrize("signed", [False, True])
@over_transports
async def test_r7_forged_headers_never_choose_the_dead_letter_key(
    broker_url: str, signed: bool, transport: Any
) -> None:
    """On the broker: a producer message with forged x-original-* headers, and
    (with a signing key) a forged copy published straight to the work queue,
    are dead-lettered under their real routing keys."""
    queue, exchange = unique_name(), unique_name("ex")
    dlx, dlq = unique_name("dlx"), unique_name("dlq")
    handled: Counter[str] = Counter()
    done = anyio.Event()
    expected = 3 if signed else 2

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled[message.message_id or ""] += 1
            yield MessageResult.REQUEUE
        if sum(handled.values()) == expected:
            done.set()

    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        exchange_name=exchange,
        exchange_type="topic",
        routing_key="orders.#",
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        max_requeue_attempts=1,
        batch_timeout=0.05,
        connection_name=queue,
        header_signing_key=KEY if signed else None,
    )
    try:
        async with batch_consumer(settings, handle, transport=transport):
            async with admin_channel(broker_url) as channel:
                await publish_ids(
                    channel,
                    ["producer"],
                    exchange=exchange,
                    routing_key="orders.created",
                    headers=FORGED,
                )
                if signed:
                    await publish_ids(
                        channel,
                        ["forged-copy"],
                        routing_key=queue,
                        headers={**FORGED, "x-retry-count": 1},
                    )
            with anyio.fail_after(20):
                await done.wait()
        dead = {
            d.properties.message_id: d
            for d in await take(broker_url, dlq, 2 if signed else 1)
        }
    finally:
        await cleanup(broker_url, queues=[queue, dlq], exchanges=[exchange, dlx])
    producer = dead["producer"]
    assert producer.routing_key == "orders.created"
    assert (producer.properties.headers or {})["x-original-exchange"] == exchange
    if signed:
        forged = dead["forged-copy"]
        assert forged.routing_key == queue  # its real key, not "evil.key"
        assert (forged.properties.headers or {})["x-original-exchange"] == ""


# ------------------------------------------- a broker crash with work in flight


def _thirds(message: Message) -> MessageResult:
    """Id n: NACK when n % 3 == 0, REQUEUE once when n % 3 == 1, else ACK."""
    number = int(message.message_id or 0)
    if number % 3 == 0:
        return MessageResult.NACK
    if number % 3 == 1 and message.retry_count == 0:
        return MessageResult.REQUEUE
    return MessageResult.ACK


def _crash_settings(url: str, queue: str, dlx: str, dlq: str, **overrides: object):  # type: ignore[no-untyped-def]
    """The kill -9 rows' consumer: 50 in flight, library dead letters, quick
    reconnects."""
    return _outage_settings(
        url,
        queue,
        dlx,
        dlq,
        **{
            "prefetch_count": 50,
            "batch_size": 10,
            "max_requeue_attempts": 2,
            "dead_letter_strategy": "publish",
            "reconnect_backoff_base": 0.05,
            "reconnect_backoff_cap": 0.5,
            **overrides,
        },
    )


@over_transports
async def test_r3_broker_kill9_with_nacks_and_requeues_in_flight_loses_nothing(
    destructive_node: PrivateNode, figures: Any, transport: Any
) -> None:
    """The private node is SIGKILLed while NACK dead letters and REQUEUE copies
    are in flight, then booted again on its data. With
    dead_letter_strategy="publish" every NACKed id is in the dead-letter queue
    (a dead letter is confirmed before its original is acked; a crash between
    the two gives a duplicate, never a loss), every other id is acked, and
    nothing is lost. (The same run with dead_letter_strategy="broker" lost 15
    of the 100 NACKed ids: the broker's own dead-lettering is not confirmed.)"""
    node = destructive_node
    url = node.url
    queue, dlx, dlq = unique_name("crash"), unique_name("dlx"), unique_name("dlq")
    recorder = Recorder(_thirds, max_requeue=2)
    # Immediate copies: a copy waiting in a classic delay queue goes back by
    # the broker's own dead-lettering, which is at-most-once across a crash
    # (docs/how-to/retries.md); this row is about the library's part.
    settings = _crash_settings(url, queue, dlx, dlq)
    try:
        with anyio.fail_after(150):
            async with _Consumer(settings, recorder.handler, transport=transport):
                confirmed = await publish_numbered(url, queue, 300)
                await recorder.wait_seen(120, timeout=60)
                await anyio.to_thread.run_sync(node.kill9)
                await anyio.to_thread.run_sync(node.start)
                await recorder.wait_decided(confirmed, timeout=90)
        report = await check(url, queue, dlq, recorder, confirmed)
    finally:
        await cleanup(url, queues=[queue, dlq], exchanges=[dlx])
    nacked = {str(n) for n in range(300) if n % 3 == 0}
    figures.record(
        "R3",
        nacked=len(nacked),
        dead_letter_duplicates=sum(n - 1 for n in report.dead_lettered.values()),
        **report.figures(),
    )
    assert report.lost == frozenset(), sorted(report.lost)[:20]
    assert report.unexpected == frozenset()
    assert set(report.dead_lettered) == nacked  # every NACK reached the DLQ
    assert report.acked == report.confirmed - nacked
    assert not (report.acked & set(report.dead_lettered))
    assert not report.still_queued


class _Republished(ConsumerHooks):
    """Sets ``first`` once an original is settled after its copy's confirm."""

    def __init__(self) -> None:
        self.first = anyio.Event()

    def settled(
        self, worker: int, queue: str, settlements: Sequence[Settlement]
    ) -> None:
        if any(s.outcome is SettleOutcome.REPUBLISHED for s in settlements):
            self.first.set()


@over_transports
async def test_r3_broker_kill9_with_copies_waiting_in_quorum_delay_queues(
    destructive_node: PrivateNode, figures: Any, transport: Any
) -> None:
    """A quorum work queue with a 2 s retry delay: the node is SIGKILLed while
    REQUEUE copies wait in the (quorum) delay queue and NACK dead letters are
    in flight, then booted on its data. The copies come back by at-least-once
    dead-lettering: every REQUEUEd id is acked after its delay, every NACKed
    id is in the dead-letter queue, nothing is lost, nothing waits forever.

    The topology is declared and the node restarted cleanly before the run:
    RabbitMQ 3.10.8 does not always restart a quorum queue's Raft member
    after a kill -9 that comes seconds after the queue was declared (it has
    no leader, its messages are out of reach and publishes to it are
    nacked; docs/how-to/retries.md). A topology that existed before is what
    a crash in production meets."""
    node = destructive_node
    url = node.url
    queue, dlx, dlq = unique_name("crashq"), unique_name("dlx"), unique_name("dlq")
    delays = (2.0,)
    waiting = delay_queues(queue, delays)[0].name
    recorder = Recorder(_thirds, max_requeue=2)
    settings = _crash_settings(
        url, queue, dlx, dlq, queue_type="quorum", retry_delays=delays
    )
    republished = _Republished()
    try:
        async with _Consumer(settings, recorder.handler, transport=transport):
            pass
        await anyio.to_thread.run_sync(node.stop_app)
        await anyio.to_thread.run_sync(node.start_app)
        with anyio.fail_after(150):
            async with _Consumer(
                settings, recorder.handler, transport=transport, hooks=[republished]
            ):
                confirmed = await publish_numbered(url, queue, 300)
                await recorder.wait_seen(150, timeout=60)
                # A copy is confirmed (in the delay queue for 2 s) before its
                # original is settled as republished.
                await republished.first.wait()
                # Quorum queue counts in list_queues lag by seconds; a passive
                # declare asks the queue itself.
                async with admin_channel(url) as channel:
                    copies = await message_count(channel, waiting)
                await anyio.to_thread.run_sync(node.kill9)
                await anyio.to_thread.run_sync(node.start)
                await recorder.wait_decided(confirmed, timeout=90)
        report = await check(url, queue, dlq, recorder, confirmed)
        async with admin_channel(url) as channel:
            left_waiting = await message_count(channel, waiting)
    finally:
        await cleanup(url, queues=[queue, dlq, waiting], exchanges=[dlx])
    nacked = {str(n) for n in range(300) if n % 3 == 0}
    requeued = {str(n) for n in range(300) if n % 3 == 1}
    figures.record(
        "R3",
        delay_queues="quorum",
        copies_waiting_at_crash=copies,
        nacked=len(nacked),
        requeued=len(requeued),
        dead_letter_duplicates=sum(n - 1 for n in report.dead_lettered.values()),
        **report.figures(),
    )
    assert report.lost == frozenset(), sorted(report.lost)[:20]
    assert report.unexpected == frozenset()
    assert set(report.dead_lettered) == nacked
    assert report.acked == report.confirmed - nacked
    # Every REQUEUEd id came back from the delay queue as its copy.
    assert {i for i, retry_count in recorder.seen if retry_count == 1} == requeued
    assert not report.still_queued
    assert left_waiting == 0


# ------------------------------------ handler_timeout, rate limit, idempotency


@over_transports
async def test_r4_handler_timeout_cancels_a_hung_handler(
    broker_url: str, transport: Any
) -> None:
    """A handler that hangs on its dependency is cancelled after
    handler_timeout: the result it gave still applies, the rest get
    unhandled_exception_action (NACK here, so they are in the DLQ), and the
    worker goes on with the next batch."""
    queue, dlx, dlq = unique_name(), unique_name("dlx"), unique_name("dlq")
    hung = anyio.Event()  # never set: the dependency does not answer
    acked: list[str] = []
    cancelled_at: list[float] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        ids = [m.message_id or "" for m in messages]
        if ids[0] == "h0":
            yield MessageResult.ACK
            started = anyio.current_time()
            try:
                await hung.wait()
            finally:
                cancelled_at.append(anyio.current_time() - started)
        for message_id in ids:
            acked.append(message_id)
            yield MessageResult.ACK
        done.set()

    settings = _outage_settings(
        broker_url,
        queue,
        dlx,
        dlq,
        batch_size=3,
        handler_timeout=0.5,
        unhandled_exception_action="NACK",
    )
    try:
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["h0", "h1", "h2"], routing_key=queue)
                await publish_ids(channel, ["n0"], routing_key=queue)
            with anyio.fail_after(20):
                await done.wait()
        dead = await take(broker_url, dlq, 2)
    finally:
        await cleanup(broker_url, queues=[queue, dlq], exchanges=[dlx])
    assert sorted(d.properties.message_id or "" for d in dead) == ["h1", "h2"]
    assert acked == ["n0"]
    assert cancelled_at and cancelled_at[0] >= 0.5
    assert consumer.health()[0].results["ack"] == 2  # h0 and n0


@over_transports
async def test_r5_rate_limit_is_shared_by_all_workers(
    broker_url: str, transport: Any
) -> None:
    """Two workers, max_messages_per_second=20: however the 60 messages are
    split, by any moment t at most 20 + 20 t of them reached a handler."""
    queue = unique_name()
    reached: list[float] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        now = anyio.current_time()
        for _ in messages:
            reached.append(now)
            yield MessageResult.ACK
        if len(reached) == 60:
            done.set()

    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        num_workers=2,
        prefetch_count=20,
        batch_size=5,
        batch_timeout=0.05,
        max_messages_per_second=20,
        connection_name=queue,
    )
    try:
        async with batch_consumer(settings, handle, transport=transport) as consumer:
            async with admin_channel(broker_url) as channel:
                start = anyio.current_time()
                await publish_ids(channel, range(60), routing_key=queue)
            with anyio.fail_after(30):
                await done.wait()
    finally:
        await cleanup(broker_url, queues=[queue])
    reached.sort()
    for count, at in enumerate(reached, start=1):
        assert count <= 20 + 20 * (at - start) + 1e-6, (count, at - start)
    assert reached[-1] - start >= 2.0  # 40 messages past the burst, at 20/s
    assert sum(w.results.get("ack", 0) for w in consumer.health()) == 60
    assert all(w.results.get("ack", 0) for w in consumer.health())  # both worked


@over_transports
async def test_r6_idempotency_store_skips_what_was_handled(
    broker_url: str, transport: Any
) -> None:
    """With an idempotency store, a message id that was handled (and ACKed)
    before is acked without reaching the handler, and counted as a duplicate."""
    queue = unique_name()
    handled: list[str] = []
    store = MemoryIdempotencyStore(ttl=60)
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append(message.message_id or "")
            yield MessageResult.ACK
        if handled.count("b") == 1:
            done.set()

    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        batch_size=1,
        batch_timeout=0.05,
        connection_name=queue,
    )
    try:
        async with batch_consumer(
            settings, handle, idempotency=store, transport=transport
        ) as consumer:
            async with admin_channel(broker_url) as channel:
                await publish_ids(channel, ["a", "a", "a", "b"], routing_key=queue)
            with anyio.fail_after(20):
                await done.wait()
            async with admin_channel(broker_url) as channel:
                assert await message_count(channel, queue) == 0
    finally:
        await cleanup(broker_url, queues=[queue])
    assert handled == ["a", "b"]
    results = consumer.health()[0].results
    assert results["duplicate"] == 2
    assert results["ack"] == 4


async def test_timing_warnings_are_logged_at_start(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = unique_name()
    settings = BatchConsumerSettings(
        url=broker_url,
        queue_name=queue,
        batch_timeout=5,
        handler_timeout=60,
        broker_consumer_timeout=30,
        connection_name=queue,
    )

    async def handle(messages: Sequence[Message]) -> list[MessageResult]:
        return [MessageResult.ACK] * len(messages)

    try:
        with caplog.at_level("WARNING", logger="amqp_batch.consumer"):
            async with batch_consumer(settings, handle):
                pass
    finally:
        await cleanup(broker_url, queues=[queue])
    assert any(
        "batch_timeout + handler_timeout (65 s) does not fit" in r.getMessage()
        for r in caplog.records
    )


async def test_a_missing_delay_queue_dead_letters_and_health_counts_what_applied(
    broker_url: str,
) -> None:
    """Someone deleted the delay queue: the copy is returned (mandatory), so
    its original is dead-lettered (republish-failed), never acked or lost; and
    health counts what was applied (a requeue that ended as a dead letter),
    with each of the other message's requeues counted once its copy was
    confirmed."""
    queue, dlx, dlq = unique_name(), unique_name("dlx"), unique_name("dlq")
    (delay,) = delay_queues(queue, (0.2,))
    handled: list[tuple[str, int]] = []
    done = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            handled.append((message.message_id or "", message.retry_count))
            yield (
                MessageResult.REQUEUE if message.retry_count == 0 else MessageResult.ACK
            )
        if ("kept", 1) in handled:
            done.set()

    settings = _outage_settings(
        broker_url, queue, dlx, dlq, batch_size=1, retry_delays=(0.2,)
    )
    try:
        async with (
            batch_consumer(settings, handle) as consumer,
            admin_channel(broker_url) as channel,
        ):
            await publish_ids(channel, ["kept"], routing_key=queue)
            with anyio.fail_after(20):
                await done.wait()
            await channel.queue_delete(delay.name)
            await publish_ids(channel, ["orphan"], routing_key=queue)
            (dead,) = await take(broker_url, dlq, 1)
        results = consumer.health()[0].results
    finally:
        await cleanup(broker_url, queues=[queue, dlq, delay.name], exchanges=[dlx])
    assert dead.properties.message_id == "orphan"
    assert (dead.properties.headers or {})["x-dead-letter-reason"] == "republish-failed"
    assert handled == [("kept", 0), ("kept", 1), ("orphan", 0)]
    assert results == {"requeue": 2, "ack": 1, "dead_lettered": 1}
