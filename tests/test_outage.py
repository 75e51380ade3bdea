"""Riding out a dependency outage, on a real broker, on asyncio and trio."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from itertools import pairwise
from typing import Any

import anyio
import pytest
from tests.support.invariant import Recorder, Report, check, publish_numbered

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageResult,
    batch_consumer,
)
from amqp_batch._delays import delay_queues
from amqp_batch._retry import RetryPolicy, sign_original, trusted_original
from amqp_batch._transport._base import Delivery, Properties
from consumer_support import admin_channel, cleanup, publish_ids, take, unique_name


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
    url: str, settings: BatchConsumerSettings, dependency: Dependency
) -> tuple[Report, BatchConsumer[BatchConsumerSettings]]:
    """Publish MESSAGES ids, run the consumer through the outage until every id
    has its final decision, then check the invariant."""
    recorder = Recorder(dependency.decide, max_requeue=settings.max_requeue_attempts)
    consumer = _Consumer(settings, recorder.handler)
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


class _Consumer(BatchConsumer[BatchConsumerSettings]):
    def __init__(self, settings: BatchConsumerSettings, handler: Any) -> None:
        super().__init__(settings)
        self._handle = handler

    def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        return self._handle(messages)  # type: ignore[no-any-return]


async def test_outage_delayed_retries_and_kill_switch_lose_nothing(
    broker_url: str,
) -> None:
    """Delayed retries + kill switch: the dependency is down for OUTAGE_S; no
    message is dead-lettered, every message is acked exactly once after the
    recovery, attempts are spaced by at least their delays, the kill switch
    opened, probed and closed again, and nothing is lost."""
    queue, dlx, dlq = unique_name("outage"), unique_name("dlx"), unique_name("dlq")
    settings = _outage_settings(
        broker_url,
        queue,
        dlx,
        dlq,
        retry_delays=DELAYS,
        max_requeue_attempts=20,
        kill_switch_threshold=0.5,
        kill_switch_window=5.0,
        kill_switch_min_samples=5,
        kill_switch_cooldown=1.0,
    )
    dependency = Dependency()
    report, consumer = await _ride(broker_url, settings, dependency)
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


async def test_outage_without_them_dead_letters_like_today(broker_url: str) -> None:
    """The same outage with immediate retries and no kill switch: copies go
    round the queue in milliseconds, run out of attempts and are dead-lettered
    while the dependency is still down. Nothing is lost: each id ends acked or
    dead-lettered, exactly once."""
    queue, dlx, dlq = unique_name("outage"), unique_name("dlx"), unique_name("dlq")
    settings = _outage_settings(broker_url, queue, dlx, dlq, max_requeue_attempts=3)
    dependency = Dependency()
    report, consumer = await _ride(broker_url, settings, dependency)
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
async def test_forged_headers_never_choose_the_dead_letter_key(
    broker_url: str, signed: bool
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
        async with batch_consumer(settings, handle):
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
