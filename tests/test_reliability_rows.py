"""docs/reliability.md rows F8, F9, F11-F13, B1-B3, S1 and S3, against a real broker.

Every test runs on asyncio and trio. Where messages flow, the Jepsen total-queue
invariant (``tests/support/invariant.py``) is checked, and each row records what it
measured with the ``figures`` fixture.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.fault_proxy import FaultProxy
from tests.support.invariant import Recorder, check, publish_numbered
from tests.support.rabbit_node import PrivateNode
from tests.support.transports import ROWS, make_transport, over_transports

from amqp_batch import (
    AuthenticationError,
    BatchConsumer,
    BatchConsumerSettings,
    ChannelClosed,
    ConnectionRefused,
    Message,
    MessageResult,
    Publisher,
    UnknownVirtualHost,
    WorkerHealth,
    WorkerState,
    batch_consumer,
    parse_url,
)
from amqp_batch._actors.ledger import AckLedger, Action, Settle
from amqp_batch._transport._base import Properties, QueueSpec
from amqp_batch._transport._native import NativeTransport
from amqp_batch.testing import MemoryBroker
from consumer_support import RecordingSession, admin_channel, cleanup, unique_name

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The consumer's transport (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


ACK = MessageResult.ACK
REQUEUE = MessageResult.REQUEUE
REQUEUE_IMMEDIATE = MessageResult.REQUEUE_IMMEDIATE


def _settings(url: str, queue: str, **overrides: Any) -> BatchConsumerSettings:
    values: dict[str, Any] = {
        "url": url,
        "queue_name": queue,
        "prefetch_count": 50,
        "batch_size": 10,
        "batch_timeout": 0.05,
        "shutdown_timeout": 10.0,
        "connection_name": queue,
        "reconnect_backoff_base": 0.05,
        "reconnect_backoff_cap": 0.5,
    }
    values.update(overrides)
    return BatchConsumerSettings(**values)


async def _declare(url: str, queue: str, **arguments: Any) -> None:
    async with admin_channel(url) as channel:
        await channel.queue_declare(queue, durable=True, arguments=arguments or None)


async def _eventually(
    probe: Callable[[], Any], until: Callable[[Any], bool], *, timeout: float
) -> Any:
    """Poll a blocking ``probe`` (e.g. rabbitmqctl) in a thread until ``until``."""
    with anyio.fail_after(timeout):
        while True:
            value = await anyio.to_thread.run_sync(probe)
            if until(value):
                return value
            await anyio.sleep(0.1)


class TracingTransport:
    """A transport (native by default), counting session attempts and the frames
    each session sends (per session, so a stale tag on a new channel shows)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner if inner is not None else NativeTransport()
        self.attempts: list[float] = []
        self.sessions: list[list[tuple[str, int, bool]]] = []

    def open_session(self, spec: Any) -> Any:
        tracer = self

        @asynccontextmanager
        async def wrapped() -> AsyncIterator[Any]:
            tracer.attempts.append(time.monotonic())
            async with tracer.inner.open_session(spec) as session:
                frames: list[tuple[str, int, bool]] = []
                tracer.sessions.append(frames)
                yield _TracedSession(session, frames)

        return wrapped()

    def open_publisher(self, parameters: Any, *, declare: Any = ()) -> Any:
        return self.inner.open_publisher(parameters, declare=declare)


_TracedSession = RecordingSession


# ----------------------------------------------------------------------- F9


@over_transports
async def test_f9_memory_alarm_during_requeue_traffic(
    destructive_node: PrivateNode, figures: Any, transport: Any
) -> None:
    """Every 4th message is REQUEUEd once. Under a memory alarm the republish
    connection is blocked, yet the acks of every other message reach the broker
    (only the originals waiting for their copy stay unacked); once the alarm
    clears the copies are confirmed, the originals acked and the copies handled."""
    node = destructive_node
    url, queue = node.url, unique_name("f9")
    total, prefetch = 200, 100
    requeued = {str(n) for n in range(0, total, 4)}

    def decide(message: Message) -> MessageResult:
        if message.message_id in requeued and message.retry_count == 0:
            return REQUEUE
        return ACK

    recorder = Recorder(decide)
    await _declare(url, queue)
    confirmed = await publish_numbered(url, queue, total)
    settings = _settings(url, queue, prefetch_count=prefetch)
    await anyio.to_thread.run_sync(node.set_memory_alarm)  # reset() clears it
    if True:
        with anyio.fail_after(60):
            async with batch_consumer(
                settings, recorder.handler, transport=transport
            ) as consumer:
                started = time.monotonic()
                await recorder.wait_seen(total, timeout=20)
                # Every ACKed original is acked at the broker while the copies
                # of the REQUEUEd ones wait behind the alarm.
                counts = await _eventually(
                    lambda: node.queue_counts(queue),
                    lambda c: c == (0, len(requeued)),
                    timeout=20,
                )
                acks_flowed_s = time.monotonic() - started
                connections = await anyio.to_thread.run_sync(node.list_connections)
                states = {c["name"]: c["state"] for c in connections}
                assert states[f"{queue}-w0-publisher"] == "blocked"
                assert states[f"{queue}-w0"] != "blocked"
                assert not [k for k in recorder.seen if k[1] > 0]  # no copy yet
                clearing = time.monotonic()  # rabbitmqctl itself takes ~0.6 s
                await anyio.to_thread.run_sync(node.clear_memory_alarm)
                await recorder.wait_decided(confirmed, timeout=20)
                resumed_s = time.monotonic() - clearing
            # Read once stopped: a result counts when its frame is sent, and a
            # copy can be handled before its original's ack went out.
            health = consumer.health()[0]
    report = await check(url, queue, None, recorder, confirmed)
    await cleanup(url, queues=[queue])
    report.assert_holds()
    assert health.reconnect_count == 0
    assert health.results["requeue"] == len(requeued)
    figures.record(
        "F9",
        acks_flowed_during_alarm_s=round(acks_flowed_s, 2),
        unacked_during_alarm=counts[1],
        all_settled_after_clear_command_s=round(resumed_s, 2),
        **report.figures(),
    )


async def test_f9_acks_flow_while_republishes_are_blocked_memory_broker() -> None:
    """The same rule, deterministic, on the in-memory broker: with publishers
    blocked, the ACKed messages are acked (single frames past the pending
    originals), each REQUEUEd original stays unacked until its copy is
    confirmed, and the frames coalesce again once publishing resumes."""
    broker = MemoryBroker()
    queue, total = "q", 40
    requeued = {str(n) for n in range(0, total, 4)}
    tracer = TracingTransport(broker)

    def decide(message: Message) -> MessageResult:
        if message.message_id in requeued and message.retry_count == 0:
            return REQUEUE
        return ACK

    recorder = Recorder(decide)
    settings = _settings("amqp://localhost/", queue, prefetch_count=total)
    broker.declare(QueueSpec(name=queue))
    for number in range(total):
        await broker.publish(
            str(number).encode(),
            routing_key=queue,
            properties=Properties(message_id=str(number)),
        )
    broker.block_publishers()
    with anyio.fail_after(10):
        async with batch_consumer(settings, recorder.handler, transport=tracer):
            await broker.wait_until(
                lambda: (
                    broker.message_count(queue) == 0
                    and broker.unacked_count(queue) == len(requeued)
                )
            )
            pending = {m.properties.message_id for m in broker.unacked_messages(queue)}
            assert pending == requeued
            assert not [key for key in recorder.seen if key[1] > 0]
            broker.unblock_publishers()
            await recorder.wait_decided([str(n) for n in range(total)], timeout=5)
            await broker.wait_drained(queue)
    (frames,) = tracer.sessions
    acked: list[int] = []
    for kind, tag, multiple in frames:
        assert kind == "ack"
        acked.extend(range(1, tag + 1) if multiple else [tag])
    # Each tag settled once (multiple-acks only ever cover unsettled tags here,
    # so their ranges may overlap tags acked before: count distinct ones).
    assert set(acked) >= set(range(1, total + 1 + len(requeued)))


def _ledger_model_check(
    frames: list[Settle], unsettled: list[int], decided: dict[int, Action]
) -> None:
    """Apply ``frames`` to a model of the channel: a multiple-ack covers every
    unsettled tag up to its own, and every covered tag must be decided ACK; a
    single frame settles one unsettled, decided tag."""
    for frame in frames:
        if frame.action is Action.ACK and frame.multiple:
            covered = [t for t in unsettled if t <= frame.delivery_tag]
        else:
            covered = [frame.delivery_tag]
        assert frame.delivery_tag in unsettled
        for tag in covered:
            assert decided.get(tag) is frame.action, (frame, tag, decided.get(tag))
            unsettled.remove(tag)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), outcomes=st.lists(st.sampled_from(list(Action)), max_size=40))
def test_f9_ledger_past_undecided_never_covers_an_undecided_tag(
    data: st.DataObject, outcomes: list[Action]
) -> None:
    tags = list(range(1, len(outcomes) + 1))
    ledger = AckLedger()
    for tag in tags:
        ledger.register(tag)
    order = data.draw(st.permutations(tags))
    unsettled = list(tags)
    decided: dict[int, Action] = {}
    for tag in order:
        ledger.resolve(tag, outcomes[tag - 1])
        decided[tag] = outcomes[tag - 1]
        if data.draw(st.booleans()):
            past = data.draw(st.booleans())
            _ledger_model_check(
                ledger.take_ready(past_undecided=past), unsettled, decided
            )
            if past:  # nothing decided is left behind
                assert all(t not in decided for t in unsettled)
    _ledger_model_check(ledger.take_ready(), unsettled, decided)
    assert unsettled == []
    assert len(ledger) == 0


# ----------------------------------------------------------------------- F8


@over_transports
async def test_f8_handler_slower_than_consumer_timeout(
    destructive_node: PrivateNode, figures: Any, transport: Any
) -> None:
    """The first batch's handler never finishes; the broker's consumer_timeout
    (1 s) closes the channel with 406. The batch is cancelled, the worker opens a
    new channel, the messages come back ``redelivered`` and are acked there; no
    tag of the old channel is ever sent on the new one (that would be a second
    406), so there is exactly one reconnect."""
    node = destructive_node
    url, queue = node.url, unique_name("f8")
    await anyio.to_thread.run_sync(node.set_consumer_timeout, 1000, 200)
    recorder = Recorder()
    tracer = TracingTransport(transport)
    slow: dict[str, float] = {}

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        if not slow:
            slow["started"] = time.monotonic()
            try:
                await anyio.Event().wait()  # slower than any consumer_timeout
            finally:
                slow["cancelled"] = time.monotonic()
        async for result in recorder.handler(messages):
            yield result

    await _declare(url, queue)
    confirmed = await publish_numbered(url, queue, 30)
    settings = _settings(url, queue, prefetch_count=10, batch_size=5)
    with anyio.fail_after(30):
        async with batch_consumer(settings, handle, transport=tracer) as consumer:
            await recorder.wait_decided(confirmed, timeout=20)
            # A round trip on the new channel after every ack: had a stale tag
            # been sent, the broker's 406 would have arrived before this.
            confirmed += await publish_numbered(url, queue, 1, start=30)
            await recorder.wait_decided(confirmed, timeout=10)
            health = consumer.health()[0]
    report = await check(url, queue, None, recorder, confirmed)
    await cleanup(url, queues=[queue])
    report.assert_holds()
    assert health.reconnect_count == 1, health
    assert health.last_error is not None and "406" in health.last_error
    assert len(tracer.attempts) == 2
    old, new = tracer.sessions
    assert old == []  # the slow batch was never settled on the old channel
    assert new and all(kind == "ack" for kind, _, _ in new)
    redelivered = sum(recorder.redelivered.values())
    assert redelivered >= 5  # the slow batch (and the rest prefetched) came back
    figures.record(
        "F8",
        channel_closed_after_s=round(slow["cancelled"] - slow["started"], 2),
        consuming_again_after_s=round(tracer.attempts[1] - slow["cancelled"], 2),
        reconnects=health.reconnect_count,
        redelivered=redelivered,
        **report.figures(),
    )


# ----------------------------------------------------------------------- F11


async def _ready_count(url: str, queue: str) -> int:
    async with admin_channel(url) as channel:
        info = await channel.queue_declare(queue, passive=True)
    return int(info.message_count)


async def _wait_ready(url: str, queue: str, count: int, *, timeout: float) -> None:
    """Poll the queue's ready count over AMQP (cheap) until it is ``count``."""
    with anyio.fail_after(timeout):
        while await _ready_count(url, queue) != count:  # noqa: ASYNC110 - broker
            await anyio.sleep(0.05)


@pytest.mark.parametrize("poison_does", ["requeue_immediate", "raise"])
@over_transports
async def test_f11_quorum_delivery_limit_dead_letters_a_poison_message(
    private_node: PrivateNode, figures: Any, poison_does: str, transport: Any
) -> None:
    """A quorum queue with ``x-delivery-limit: 2``: a message whose handler
    always requeues it at once (REQUEUE_IMMEDIATE, or raising with that as
    ``unhandled_exception_action``) is delivered 3 times, then the broker
    dead-letters it (reason ``delivery_limit``); everything else is acked."""
    url = private_node.url
    queue, dlx, dlq = unique_name("f11"), unique_name("dlx"), unique_name("dlq")
    limit, poison = 2, "3"

    def decide(message: Message) -> MessageResult:
        return REQUEUE_IMMEDIATE if message.message_id == poison else ACK

    recorder = Recorder(decide)

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        for message in messages:
            result = recorder.record(message)
            if message.message_id == poison and poison_does == "raise":
                raise RuntimeError("poison")
            yield result

    settings = _settings(
        url,
        queue,
        batch_size=1,
        queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": limit},
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        unhandled_exception_action=REQUEUE_IMMEDIATE,
    )
    try:
        with anyio.fail_after(30):
            async with batch_consumer(
                settings, handle, transport=transport
            ) as consumer:
                confirmed = await publish_numbered(url, queue, 10)
                started = time.monotonic()
                await recorder.wait_decided(set(confirmed) - {poison}, timeout=20)
                await _wait_ready(url, dlq, 1, timeout=20)
                dead_lettered_s = time.monotonic() - started
                health = consumer.health()[0]
        async with admin_channel(url) as channel:
            dead = await channel.basic_get(dlq, no_ack=False)
            assert dead is not None
            channel.nack(dead.delivery_tag, requeue=True)  # check() drains it
        report = await check(url, queue, dlq, recorder, confirmed)
    finally:
        await cleanup(url, queues=[queue, dlq], exchanges=[dlx])
    report.assert_holds(max_duplicates=limit)
    assert dict(report.dead_lettered) == {poison: 1}
    assert recorder.seen[(poison, 0)] == limit + 1
    headers = dead.properties.headers or {}
    assert headers.get("x-first-death-reason") == "delivery_limit"
    assert dead.routing_key == queue  # broker dead-lettering keeps the key
    assert health.reconnect_count == 0
    figures.record(
        "F11",
        poison_does=poison_does,
        delivery_limit=limit,
        poison_deliveries=recorder.seen[(poison, 0)],
        dead_lettered_after_s=round(dead_lettered_s, 2),
        **report.figures(),
    )


# ----------------------------------------------------------------------- F12


class _Watched(BatchConsumer[BatchConsumerSettings]):
    """A consumer that records each worker state change with its time."""

    def __init__(
        self, settings: BatchConsumerSettings, recorder: Recorder, **kwargs: Any
    ) -> None:
        super().__init__(settings, **kwargs)
        self.recorder = recorder
        self.changes: list[tuple[float, WorkerState]] = []
        self.changed = anyio.Event()

    def process_messages(
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        return self.recorder.handler(messages)

    def on_worker_state_change(
        self, health: WorkerHealth, previous: WorkerState
    ) -> None:
        self.changes.append((time.monotonic(), health.state))
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_state(self, state: WorkerState, after: int) -> int:
        """Wait until change number ``after`` or a later one is ``state``."""
        while True:
            for index in range(after, len(self.changes)):
                if self.changes[index][1] is state:
                    return index
            await self.changed.wait()


@over_transports
async def test_f12_queue_deleted_under_the_consumer(
    private_node: PrivateNode,
    figures: Any,
    caplog: pytest.LogCaptureFixture,
    transport: Any,
) -> None:
    """The queue is deleted while consumed: the broker's ``basic.cancel`` shows
    in health (``last_error``) and the log, the worker backs off once, redeclares
    the queue and consumes again; no reconnect loop; messages published to the
    new queue are all acked."""
    url, queue = private_node.url, unique_name("f12")
    recorder = Recorder()
    tracer = TracingTransport(transport)
    consumer = _Watched(_settings(url, queue), recorder, transport=tracer)
    try:
        with anyio.fail_after(30), caplog.at_level(logging.WARNING, "amqp_batch"):
            async with consumer:
                before = await publish_numbered(url, queue, 20)
                await recorder.wait_decided(before, timeout=10)
                mark = len(consumer.changes)
                deleted = time.monotonic()
                async with admin_channel(url) as channel:
                    await channel.queue_delete(queue)
                backing_off = await consumer.wait_state(WorkerState.BACKING_OFF, mark)
                back = await consumer.wait_state(WorkerState.CONSUMING, backing_off)
                consuming_again_s = consumer.changes[back][0] - deleted
                after = await publish_numbered(url, queue, 20, start=20)
                await recorder.wait_decided(after, timeout=10)
                window_s = time.monotonic() - deleted
                health = consumer.health()[0]
                changes = [state for _, state in consumer.changes[mark:]]
        report = await check(url, queue, None, recorder, before + after)
    finally:
        await cleanup(url, queues=[queue])
    report.assert_holds()
    assert health.reconnect_count == 1
    assert health.last_error is not None
    assert health.last_error.startswith("ConsumerCancelled: the broker cancelled")
    assert len(tracer.attempts) == 2  # one redeclare, no loop
    assert changes == [
        WorkerState.BACKING_OFF,
        WorkerState.CONNECTING,
        WorkerState.CONSUMING,
    ]
    logged = [r.getMessage() for r in caplog.records]
    assert any("cancelled consumer" in m for m in logged), logged
    assert any("ConsumerCancelled" in m for m in logged), logged
    figures.record(
        "F12",
        consuming_again_after_s=round(consuming_again_s, 3),
        session_attempts_in_window=len(tracer.attempts) - 1,
        window_s=round(window_s, 2),
        **report.figures(),
    )


# ----------------------------------------------------------------------- F13


@over_transports
async def test_f13_redeclare_with_other_arguments_fails_fast_without_a_storm(
    private_node: PrivateNode, figures: Any, transport_kind: str
) -> None:
    """At start: the queue exists with other arguments; both workers fail on
    their first declare and the consumer raises a 406 naming the argument, with
    no further attempts. While running: the queue is deleted and recreated with
    other arguments; the worker's redeclare gets the same 406 and the consumer
    stops with it (once), instead of reconnecting in a loop."""
    url, queue = private_node.url, unique_name("f13")
    tracer = TracingTransport(make_transport(transport_kind))
    await _declare(url, queue, **{"x-max-length": 10})
    settings = _settings(
        url,
        queue,
        num_workers=2,
        queue_arguments={"x-max-length": 20},
        reconnect_backoff_base=0.001,
        reconnect_backoff_cap=0.001,
    )
    try:
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(ChannelClosed) as at_start:
            async with batch_consumer(settings, _ack_all, transport=tracer):
                pytest.fail("must not start")
        failed_at_start_s = time.monotonic() - started
        assert at_start.value.reply_code == 406
        assert "PRECONDITION_FAILED" in str(at_start.value)
        assert "x-max-length" in str(at_start.value)
        start_attempts = len(tracer.attempts)
        assert start_attempts <= 2  # one per worker, never a retry

        await cleanup(url, queues=[queue])
        tracer = TracingTransport(make_transport(transport_kind))
        recorder = Recorder()
        consumer = _Watched(
            attrs.evolve(settings, num_workers=1), recorder, transport=tracer
        )
        with anyio.fail_after(10), pytest.raises(ChannelClosed) as while_running:
            async with consumer:
                confirmed = await publish_numbered(url, queue, 10)
                await recorder.wait_decided(confirmed, timeout=5)
                changed = time.monotonic()
                async with admin_channel(url) as channel:
                    await channel.queue_delete(queue)
                    await channel.queue_declare(
                        queue, durable=True, arguments={"x-max-length": 10}
                    )
                await anyio.sleep_forever()  # the consumer's failure ends this
        stopped_s = time.monotonic() - changed
        assert while_running.value.reply_code == 406
        assert len(tracer.attempts) == 2  # the first session and one redeclare
        assert not consumer.is_running
    finally:
        await cleanup(url, queues=[queue])
    figures.record(
        "F13",
        failed_at_start_s=round(failed_at_start_s, 3),
        attempts_at_start=start_attempts,
        stopped_while_running_after_s=round(stopped_s, 3),
        attempts_while_running=len(tracer.attempts),
    )


async def _ack_all(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
    for _ in messages:
        yield ACK


# ----------------------------------------------------------------------- B1

#: x-retry-count values a producer may send, and what each one is read as: an
#: int is the count; anything else is a bad header (dead-lettered with a reason,
#: never handled, never read as 0). ``bytes`` arrive as a bytearray ('x').
RETRY_HEADERS: dict[str, Any] = {
    "str-3": "3",
    "minus-1": -1,
    "float-3.5": 3.5,
    "bool-true": True,
    "int64-max": 2**63 - 1,
    "list-1": [1],
    "table-empty": {},
    "void-none": None,
    "bytes-ff": b"\xff",
}


@over_transports
async def test_b1_untrusted_retry_count_headers(
    private_node: PrivateNode, figures: Any, transport: Any
) -> None:
    """Through the consumer on the broker: every bad ``x-retry-count`` is
    dead-lettered once (``x-dead-letter-reason: invalid-retry-count: ...``) and
    never reaches the handler; an absent header is 0 and its REQUEUEd copy
    carries 1; a valid 2 is read as 2 (no reset). No reconnect, no loop."""
    url = private_node.url
    queue, dlx, dlq = unique_name("b1"), unique_name("dlx"), unique_name("dlq")

    def decide(message: Message) -> MessageResult:
        if message.message_id == "absent" and message.retry_count == 0:
            return REQUEUE
        return ACK

    recorder = Recorder(decide)
    settings = _settings(url, queue, dead_letter_exchange=dlx, dead_letter_queue=dlq)
    try:
        with anyio.fail_after(30):
            async with batch_consumer(
                settings, recorder.handler, transport=transport
            ) as consumer:
                confirmed: list[str] = []
                async with admin_channel(url) as channel:
                    for message_id, value in RETRY_HEADERS.items():
                        await channel.publish(
                            message_id.encode(),
                            routing_key=queue,
                            properties=Properties(
                                message_id=message_id,
                                headers={"x-retry-count": value},
                            ),
                        )
                        confirmed.append(message_id)
                    for message_id, headers in (
                        ("absent", None),
                        ("int-2", {"x-retry-count": 2}),
                    ):
                        await channel.publish(
                            message_id.encode(),
                            routing_key=queue,
                            properties=Properties(
                                message_id=message_id, headers=headers
                            ),
                        )
                        confirmed.append(message_id)
                await recorder.wait_decided(["absent", "int-2"], timeout=10)
                await _wait_ready(url, dlq, len(RETRY_HEADERS), timeout=10)
            # Read once stopped: a dead letter counts when the original's
            # settlement is sent, which may follow its arrival in the DLQ.
            health = consumer.health()[0]
        reasons: dict[str, str] = {}
        async with admin_channel(url) as channel:
            for _ in RETRY_HEADERS:
                dead = await channel.basic_get(dlq, no_ack=False)
                assert dead is not None
                headers = dead.properties.headers or {}
                reasons[str(dead.properties.message_id)] = str(
                    headers["x-dead-letter-reason"]
                )
                assert dead.routing_key == queue  # the original key
            channel.nack(0, multiple=True, requeue=True)  # check() drains them
        report = await check(url, queue, dlq, recorder, confirmed)
    finally:
        await cleanup(url, queues=[queue, dlq], exchanges=[dlx])
    report.assert_holds()
    assert set(report.dead_lettered) == set(RETRY_HEADERS)
    assert report.acked == {"absent", "int-2"}
    assert sorted(recorder.seen) == [("absent", 0), ("absent", 1), ("int-2", 2)]
    for reason in reasons.values():
        assert reason.startswith("invalid-retry-count: x-retry-count"), reason
    assert "out of range" in reasons["int64-max"]
    assert "out of range" in reasons["minus-1"]
    assert "is a bool" in reasons["bool-true"]
    assert health.reconnect_count == 0
    assert health.results["dead_lettered"] == len(RETRY_HEADERS)
    figures.record(
        "B1",
        outcomes={k: reasons[k].split(": ", 1)[1] for k in RETRY_HEADERS},
        absent_read_as=0,
        **report.figures(),
    )


# ----------------------------------------------------------------------- B2


# Native only: on aiormq the REQUEUE copy of the message without properties
# gets a message_id (docs/how-to/transports.md, "Fault rows on the aiormq
# transport").
async def test_b2_odd_messages(destructive_node: PrivateNode, figures: Any) -> None:
    """No properties at all, an empty body, invalid UTF-8 (body, a header value
    and a header key's bytes value) and 1 MiB of headers (the broker's frame_max
    raised to 4 MiB, as it must be for such a message to exist): each is handled,
    REQUEUEd once (its copy keeps what it had) and acked. Invariant."""
    node = destructive_node
    url, queue = node.url, unique_name("b2")
    big_header = "h" * (1 << 20)
    messages: dict[str, tuple[bytes, Properties | None]] = {
        "no-properties": (b"no-properties", None),
        "empty-body": (b"", Properties(message_id="empty-body")),
        "invalid-utf8": (
            b"\xff\xfe\xc3\x28 not utf-8",
            Properties(message_id="invalid-utf8", headers={"raw": b"\xff\xc3\x28"}),
        ),
        "big-headers": (
            b"big-headers",
            Properties(message_id="big-headers", headers={"big": big_header}),
        ),
    }
    seen: dict[tuple[str, int], Message] = {}

    def decide(message: Message) -> MessageResult:
        message_id = message.message_id or message.body.decode()
        seen[(message_id, message.retry_count)] = message
        return REQUEUE if message.retry_count == 0 else ACK

    recorder = Recorder(decide)
    default_frame_max = node.eval("application:get_env(rabbit, frame_max).")
    node_frame_max = 4 << 20
    await anyio.to_thread.run_sync(
        node.eval, f"application:set_env(rabbit, frame_max, {node_frame_max})."
    )
    try:
        await _declare(url, queue)
        async with admin_channel(f"{url}?frame_max={node_frame_max}") as channel:
            for body, properties in messages.values():
                await channel.publish(body, routing_key=queue, properties=properties)
        with anyio.fail_after(30):
            async with batch_consumer(_settings(url, queue), recorder.handler) as c:
                await recorder.wait_decided(messages, timeout=20)
                health = c.health()[0]
        report = await check(url, queue, None, recorder, messages)
    finally:
        value = default_frame_max.removeprefix("{ok,").removesuffix("}")
        await anyio.to_thread.run_sync(
            node.eval, f"application:set_env(rabbit, frame_max, {value})."
        )
        await cleanup(url, queues=[queue])
    report.assert_holds()
    assert health.reconnect_count == 0
    assert sorted(seen) == sorted((m, n) for m in messages for n in (0, 1))
    for message_id, (body, _) in messages.items():
        original, copy = seen[(message_id, 0)], seen[(message_id, 1)]
        assert original.body == copy.body == body
        for field in ("content_type", "delivery_mode", "message_id"):
            assert getattr(copy.properties, field) == getattr(
                original.properties, field
            )
    assert seen[("no-properties", 0)].properties.headers in (None, {})
    assert seen[("invalid-utf8", 1)].headers["raw"] == b"\xff\xc3\x28"
    assert seen[("big-headers", 1)].headers["big"] == big_header
    figures.record("B2", cases=sorted(messages), **report.figures())


# ----------------------------------------------------------------------- B3


def _settled_once(frames: list[tuple[str, int, bool]]) -> set[int]:
    """The tags ``frames`` settle; fails if one frame settles a tag again (the
    broker would close the channel: 406 unknown delivery tag)."""
    settled: set[int] = set()
    for _, tag, multiple in frames:
        assert tag not in settled, f"tag {tag} settled twice: {frames}"
        if multiple:
            settled.update(range(1, tag + 1))
        else:
            settled.add(tag)
    return settled


@over_transports
async def test_b3_misbehaving_handlers_settle_every_delivery_once(
    private_node: PrivateNode, figures: Any, transport_kind: str
) -> None:
    """Batches of 4 whose handler gives too few results, too many, a
    non-result, raises, or is cancelled (it hangs; the stop's shutdown_timeout
    cancels it). ``unhandled_exception_action`` is NACK, so what the handler
    left unsettled is dead-lettered where we can see it; extra results are
    never applied; the cancelled batch is not acked but goes back to the queue
    and is acked by the next consumer. Each session settles each tag once, with
    no channel error; invariant."""
    url = private_node.url
    queue, dlx, dlq = unique_name("b3"), unique_name("dlx"), unique_name("dlq")
    kinds = ["short", "extra", "junk", "boom", "hang"]
    recorder = Recorder()
    hanging = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        kind = (messages[0].message_id or "").rstrip("0123456789")
        if kind == "short":
            yield recorder.record(messages[0])  # one result for four messages
        elif kind == "extra":
            for message in messages:
                yield recorder.record(message)
            yield MessageResult.NACK  # never applied
            yield MessageResult.REQUEUE
        elif kind == "junk":
            yield recorder.record(messages[0])
            yield "ack"  # type: ignore[misc]
        elif kind == "boom":
            yield recorder.record(messages[0])
            raise RuntimeError("handler bug")
        elif kind == "hang":
            recorder.record(messages[0])
            hanging.set()
            await anyio.Event().wait()  # cancelled at shutdown_timeout
            yield ACK
        else:  # the second consumer
            async for result in recorder.handler(messages):
                yield result

    async def ack_all(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        async for result in recorder.handler(messages):
            yield result

    settings = _settings(
        url,
        queue,
        batch_size=4,
        prefetch_count=40,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        unhandled_exception_action="NACK",
        shutdown_timeout=0.5,
    )
    first = TracingTransport(make_transport(transport_kind))
    second = TracingTransport(make_transport(transport_kind))
    try:
        await _declare(url, queue, **{"x-dead-letter-exchange": dlx})
        confirmed: list[str] = []
        async with admin_channel(url) as channel:
            await channel.exchange_declare(dlx, "topic", durable=True)
            for kind in kinds:  # all queued first, so each batch is one kind
                for number in range(4):
                    await channel.publish(
                        b"",
                        routing_key=queue,
                        properties=Properties(message_id=f"{kind}{number}"),
                    )
                    confirmed.append(f"{kind}{number}")
        with anyio.fail_after(30):
            async with batch_consumer(settings, handle, transport=first) as c:
                await hanging.wait()
                health = [c.health()[0]]
                leaving = time.monotonic()
            stop_s = time.monotonic() - leaving
            async with batch_consumer(settings, ack_all, transport=second) as c:
                await recorder.wait_decided([f"hang{n}" for n in range(4)], timeout=10)
                health.append(c.health()[0])
        report = await check(url, queue, dlq, recorder, confirmed)
    finally:
        await cleanup(url, queues=[queue, dlq], exchanges=[dlx])
    report.assert_holds(max_duplicates=1)  # hang0: seen, cancelled, redelivered
    unsettled = {f"{kind}{n}" for kind in ("short", "junk", "boom") for n in (1, 2, 3)}
    assert set(report.dead_lettered) == unsettled
    assert report.acked == set(confirmed) - unsettled
    assert [len(t.attempts) for t in (first, second)] == [1, 1]
    settled_first = _settled_once(first.sessions[0])
    settled_second = _settled_once(second.sessions[0])
    assert len(settled_first) == 16  # all but the cancelled batch
    assert len(settled_second) == 4
    assert [h.reconnect_count for h in health] == [0, 0]
    assert stop_s < settings.shutdown_timeout + 1
    figures.record(
        "B3",
        stop_with_hung_handler_s=round(stop_s, 2),
        frames_first_session=len(first.sessions[0]),
        frames_second_session=len(second.sessions[0]),
        **report.figures(),
    )


# asyncio only, by parametrizing the backend (not a skip): on trio, user code
# cannot raise the cancellation exception without being cancelled.
@pytest.mark.parametrize(
    ("anyio_backend", "transport_kind"),
    [row for row in ROWS if row != ("trio", "native")],
    scope="module",
)
async def test_b3_stray_cancelled_error_is_a_handler_error(
    private_node: PrivateNode, anyio_backend: str, figures: Any, transport: Any
) -> None:
    """asyncio only (trio's Cancelled cannot be raised by user code): a handler
    that raises ``CancelledError`` without being cancelled (it awaited a future
    someone else cancelled) gets ``unhandled_exception_action`` like any error,
    instead of silently ending the session and reconnecting forever."""
    import asyncio

    url, queue = private_node.url, unique_name("b3c")
    recorder = Recorder()
    tracer = TracingTransport(transport)

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        if messages[0].retry_count == 0:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # raises CancelledError; this task is not cancelled
        async for result in recorder.handler(messages):
            yield result

    try:
        with anyio.fail_after(20):
            async with batch_consumer(
                _settings(url, queue), handle, transport=tracer
            ) as consumer:
                confirmed = await publish_numbered(url, queue, 10)
                await recorder.wait_decided(confirmed, timeout=10)
            # Read once stopped: a copy can be handled before its original's
            # ack (which counts the REQUEUE) went out.
            health = consumer.health()[0]
        report = await check(url, queue, None, recorder, confirmed)
    finally:
        await cleanup(url, queues=[queue])
    report.assert_holds()
    assert health.reconnect_count == 0
    assert len(tracer.attempts) == 1
    assert health.results["requeue"] == 10  # the fallback, then ACK at count 1
    assert sorted(recorder.seen) == sorted((str(n), 1) for n in range(10))
    figures.record("B3", case="stray CancelledError", **report.figures())


# ----------------------------------------------------------------------- S1


def _other_ca_context() -> ssl.SSLContext:
    import trustme

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    trustme.CA().configure_trust(context)
    return context


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.parametrize(
    "case", ["right-ca", "wrong-ca", "system-cas", "hostname-mismatch", "verify-off"]
)
@over_transports
async def test_s1_tls_through_the_consumer(
    private_node: PrivateNode,
    figures: Any,
    caplog: pytest.LogCaptureFixture,
    case: str,
    transport: Any,
) -> None:
    """Through ``BatchConsumerSettings(url="amqps://...", ssl_context=...)``: the
    node's CA connects and consumes; another CA, the system CAs, or the right CA
    reached under a name the certificate does not cover (127.0.0.2) fail at once
    with a non-retryable ConnectionRefused naming the verification failure, after
    one attempt; a context that does not verify connects, and says so in a
    warning."""
    node = private_node
    queue = unique_name("s1")
    contexts: dict[str, ssl.SSLContext | None] = {
        "right-ca": node.client_ssl_context(),
        "wrong-ca": _other_ca_context(),
        "system-cas": None,
        "hostname-mismatch": node.client_ssl_context(),
        "verify-off": _unverified_context(),
    }
    recorder = Recorder()
    tracer = TracingTransport(transport)
    async with FaultProxy(
        "127.0.0.1", node.amqps_port, listen_host="127.0.0.2"
    ) as proxy:
        url = node.tls_url
        if case in ("hostname-mismatch", "verify-off"):
            url = f"amqps://guest:guest@127.0.0.2:{proxy.port}/"
        settings = _settings(url, queue, ssl_context=contexts[case], num_workers=1)
        started = time.monotonic()
        try:
            with anyio.fail_after(20), caplog.at_level(logging.WARNING, "amqp_batch"):
                if case in ("right-ca", "verify-off"):
                    async with batch_consumer(
                        settings, recorder.handler, transport=tracer
                    ) as consumer:
                        confirmed = await publish_numbered(node.url, queue, 20)
                        await recorder.wait_decided(confirmed, timeout=10)
                        health = consumer.health()[0]
                    report = await check(node.url, queue, None, recorder, confirmed)
                    report.assert_holds()
                    assert health.url.startswith("amqps://")
                    outcome = "connected"
                else:
                    with pytest.raises(ConnectionRefused) as refused:
                        async with batch_consumer(
                            settings, recorder.handler, transport=tracer
                        ):
                            pytest.fail("must not connect")
                    assert not refused.value.retryable
                    assert "certificate verification failed" in str(refused.value)
                    outcome = str(refused.value).split(": ", 1)[1]
        finally:
            await cleanup(node.url, queues=[queue])
    elapsed = time.monotonic() - started
    assert len(tracer.attempts) == 1
    off = [r for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert bool(off) == (case == "verify-off")
    if case == "hostname-mismatch":
        assert "127.0.0.2" in outcome
    figures.record("S1", case=case, outcome=outcome, seconds=round(elapsed, 2))


# ----------------------------------------------------------------------- S3


def _bad_urls(port: int) -> dict[str, str]:
    """Malformed URLs, each naming a port where something listens (when it has
    one), so a socket opened by mistake would show as an accepted connection."""
    return {
        "http-scheme": f"http://guest:guest@127.0.0.1:{port}/",
        "no-scheme": f"guest:guest@127.0.0.1:{port}/",
        "empty-host": f"amqp://guest:guest@:{port}/",
        "port-not-a-number": f"amqp://guest:guest@127.0.0.1:{port}x/",
        "port-out-of-range": "amqp://guest:guest@127.0.0.1:99999/",
        "port-zero": "amqp://guest:guest@127.0.0.1:0/",
        "unclosed-ipv6": f"amqp://guest:guest@[::1:{port}/",
        "vhost-with-slash": f"amqp://guest:guest@127.0.0.1:{port}/a/b",
        "unknown-option": f"amqp://guest:guest@127.0.0.1:{port}/?hearbeat=5",
    }


def test_s3_malformed_urls_are_refused_before_a_socket_opens(figures: Any) -> None:
    """Settings (``url`` and ``failover_urls``), ``from_env``, ``Publisher`` and
    ``parse_url`` all refuse each malformed URL with a ValueError that says what
    is wrong (and names the field or variable); nothing ever connects to the
    listening port the URLs point at."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        errors: dict[str, str] = {}
        for case, url in _bad_urls(port).items():
            with pytest.raises(ValueError, match="invalid AMQP URL") as parsed:
                parse_url(url)
            errors[case] = str(parsed.value)
            with pytest.raises(ValueError, match=r"^url: invalid AMQP URL"):
                BatchConsumerSettings(queue_name="q", url=url)
            with pytest.raises(ValueError, match=r"^failover_urls: invalid AMQP"):
                BatchConsumerSettings(queue_name="q", failover_urls=[url])
            with pytest.raises(ValueError, match=r"^AMQP_BATCH_URL: "):
                BatchConsumerSettings.from_env(
                    environ={"AMQP_BATCH_QUEUE_NAME": "q", "AMQP_BATCH_URL": url}
                )
            with pytest.raises(ValueError, match="invalid AMQP URL"):
                Publisher(url)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    figures.record("S3", refused_before_connecting=errors)


@pytest.mark.parametrize("case", ["bad-credentials", "unknown-vhost"])
@over_transports
async def test_s3_bad_credentials_and_vhost_fail_fast_without_retrying(
    private_node: PrivateNode, figures: Any, case: str, transport: Any
) -> None:
    """Through a counting proxy: with bad credentials or an unknown vhost on
    every URL (two URLs, two workers) the consumer fails with
    AuthenticationError / UnknownVirtualHost after at most one connection per
    worker, within a second, and never retries (even with failover URLs left)."""
    async with FaultProxy("127.0.0.1", private_node.amqp_port) as proxy:
        if case == "bad-credentials":
            url = proxy.url_for(password="wrong")
            expected: type[Exception] = AuthenticationError
        else:
            url = proxy.url_for(vhost="amqp-batch-no-such-vhost")
            expected = UnknownVirtualHost
        settings = _settings(
            url,
            unique_name("s3"),
            num_workers=2,
            failover_urls=(url,),
            reconnect_backoff_base=0.001,
            reconnect_backoff_cap=0.001,
        )
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(expected) as caught:
            async with batch_consumer(settings, _ack_all, transport=transport):
                pytest.fail("must not start")
        elapsed = time.monotonic() - started
        connections = proxy.connections_accepted
    assert not caught.value.retryable
    assert 1 <= connections <= 2
    assert elapsed < 2
    figures.record(
        "S3",
        case=case,
        error=f"{type(caught.value).__name__}: {caught.value}",
        connections=connections,
        seconds=round(elapsed, 3),
    )
