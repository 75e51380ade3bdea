"""MemoryBroker: the transport contract in memory, on asyncio and trio.

Every assertion is about where messages end up; nothing sleeps to synchronise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amqp_batch import (
    AuthenticationError,
    ChannelClosed,
    ConnectionLost,
    ConnectionRefused,
    MessageNacked,
    MessageReturned,
    UnknownVirtualHost,
    _pytest_plugin,
)
from amqp_batch._transport._memory._routing import headers_match, topic_match
from amqp_batch.testing import (
    BindingSpec,
    ConnectionParameters,
    Delivery,
    ExchangeSpec,
    MemoryBroker,
    MemorySession,
    Properties,
    QueueSpec,
    SessionSpec,
)

pytestmark = pytest.mark.anyio
pytest_plugins = ["pytester"]

PARAMS = ConnectionParameters()

# The plugin's fixtures, whether or not its entry point is installed.
memory_broker = _pytest_plugin.memory_broker
memory_publisher = _pytest_plugin.memory_publisher


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def spec(queue: str, prefetch: int = 10, **options: Any) -> SessionSpec:
    options.setdefault("queues", [QueueSpec(name=queue)])
    return SessionSpec(
        parameters=options.pop("parameters", PARAMS),
        queue=queue,
        prefetch_count=prefetch,
        **options,
    )


async def take(session: MemorySession, count: int) -> list[Delivery]:
    """Exactly ``count`` deliveries (they are already buffered or never come)."""
    with anyio.fail_after(5):
        return [await session.deliveries.receive() for _ in range(count)]


def buffered(session: MemorySession) -> list[Delivery]:
    """What the session holds right now, without waiting."""
    stream: Any = session.deliveries
    found = []
    while True:
        try:
            found.append(stream.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return found


async def fill(broker: MemoryBroker, queue: str, count: int) -> None:
    for i in range(count):
        await broker.publish(str(i).encode(), routing_key=queue)


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [d.body for d in deliveries]


def ids(*numbers: int) -> list[bytes]:
    return [str(n).encode() for n in numbers]


# Routing (sans-IO rules) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.b.c", False),
        ("a.*", "a", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("#", "x.y", True),
        ("#.c", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y.d", False),
        ("*", "", True),
        ("*", "a.b", False),
        ("*.#", "a", True),
        ("", "", True),
        ("", "a", False),
    ],
)
def test_topic_patterns(pattern: str, key: str, expected: bool) -> None:
    assert topic_match(pattern, key) is expected


@pytest.mark.parametrize(
    ("binding", "headers", "expected"),
    [
        ({"a": 1, "b": "x"}, {"a": 1, "b": "x", "c": 0}, True),
        ({"a": 1, "b": "x"}, {"a": 1}, False),
        ({"x-match": "any", "a": 1, "b": "x"}, {"b": "x"}, True),
        ({"x-match": "any", "a": 1}, {"a": 2}, False),
        ({"x-match": "all", "x-other": 1, "a": 1}, {"a": 1}, True),
        ({"x-match": "all-with-x", "x-other": 1}, {"a": 1}, False),
        ({"x-match": "any-with-x", "x-other": 1}, {"x-other": 1}, True),
        ({}, None, True),
        ({"x-match": "any"}, {"a": 1}, False),
    ],
)
def test_headers_matching(
    binding: dict[str, Any], headers: dict[str, Any] | None, expected: bool
) -> None:
    assert headers_match(binding, headers) is expected


# Routing through exchanges -----------------------------------------------------------


def topology(kind: str, *bindings: tuple[str, str, dict[str, Any] | None]) -> list[Any]:
    queues = dict.fromkeys(q for q, _, _ in bindings)
    return [
        ExchangeSpec(name="x", type=kind),
        *(QueueSpec(name=q) for q in queues),
        *(
            BindingSpec(queue=q, exchange="x", routing_key=k, arguments=a)
            for q, k, a in bindings
        ),
    ]


async def test_direct_exchange_routes_by_exact_key() -> None:
    broker = MemoryBroker()
    broker.declare(
        *topology("direct", ("a", "red", None), ("b", "red", None), ("c", "blue", None))
    )
    await broker.publish(b"1", exchange="x", routing_key="red")
    await broker.publish(b"2", exchange="x", routing_key="blue")
    await broker.publish(b"3", exchange="x", routing_key="green")
    assert (broker.bodies("a"), broker.bodies("b"), broker.bodies("c")) == (
        [b"1"],
        [b"1"],
        [b"2"],
    )
    assert broker.published[2].queues == ()


async def test_fanout_exchange_ignores_the_key() -> None:
    broker = MemoryBroker()
    broker.declare(*topology("fanout", ("a", "", None), ("b", "whatever", None)))
    await broker.publish(b"1", exchange="x", routing_key="anything")
    assert broker.bodies("a") == broker.bodies("b") == [b"1"]


async def test_topic_exchange_and_one_copy_per_queue() -> None:
    broker = MemoryBroker()
    broker.declare(
        *topology(
            "topic",
            ("orders", "orders.#", None),
            ("orders", "orders.*", None),  # both match orders.created: one copy
            ("created", "*.created", None),
            ("all", "#", None),
        )
    )
    await broker.publish(b"1", exchange="x", routing_key="orders.created")
    await broker.publish(b"2", exchange="x", routing_key="users.created")
    await broker.publish(b"3", exchange="x", routing_key="orders.eu.deleted")
    assert broker.bodies("orders") == [b"1", b"3"]
    assert broker.bodies("created") == [b"1", b"2"]
    assert broker.bodies("all") == [b"1", b"2", b"3"]


async def test_headers_exchange_all_and_any() -> None:
    broker = MemoryBroker()
    broker.declare(
        *topology(
            "headers",
            ("all", "", {"x-match": "all", "kind": "pdf", "size": 1}),
            ("any", "", {"x-match": "any", "kind": "pdf", "size": 1}),
        )
    )

    async def send(body: bytes, headers: dict[str, Any]) -> None:
        await broker.publish(body, exchange="x", properties=Properties(headers=headers))

    await send(b"both", {"kind": "pdf", "size": 1})
    await send(b"kind", {"kind": "pdf"})
    await send(b"none", {"kind": "png", "size": 2})
    assert broker.bodies("all") == [b"both"]
    assert broker.bodies("any") == [b"both", b"kind"]


async def test_default_and_predefined_exchanges() -> None:
    broker = MemoryBroker()
    broker.declare(
        QueueSpec(name="q"),
        BindingSpec(queue="q", exchange="amq.topic", routing_key="t.*"),
    )
    await broker.publish(b"default", routing_key="q")
    await broker.publish(b"topic", exchange="amq.topic", routing_key="t.1")
    await broker.publish(b"lost", routing_key="no-such-queue")
    assert broker.bodies("q") == [b"default", b"topic"]
    assert all(
        broker.has_exchange(n)
        for n in ("", "amq.direct", "amq.fanout", "amq.headers", "amq.match")
    )
    with pytest.raises(ChannelClosed) as info:
        broker.declare(BindingSpec(queue="q", exchange="", routing_key="q"))
    assert info.value.reply_code == 403


async def test_alternate_exchange_takes_unroutable_messages() -> None:
    broker = MemoryBroker()
    broker.declare(
        ExchangeSpec(name="ae", type="fanout"),
        ExchangeSpec(name="x", arguments={"alternate-exchange": "ae"}),
        QueueSpec(name="main"),
        QueueSpec(name="unrouted"),
        BindingSpec(queue="main", exchange="x", routing_key="k"),
        BindingSpec(queue="unrouted", exchange="ae"),
    )
    await broker.publish(b"1", exchange="x", routing_key="k")
    await broker.publish(b"2", exchange="x", routing_key="other", mandatory=True)
    assert (broker.bodies("main"), broker.bodies("unrouted")) == ([b"1"], [b"2"])


# Publisher confirms and returns ------------------------------------------------------


async def test_mandatory_unroutable_is_returned_and_others_confirm(
    memory_broker: MemoryBroker, memory_publisher: Any
) -> None:
    memory_broker.declare(ExchangeSpec(name="x"), QueueSpec(name="q"))
    with pytest.raises(MessageReturned) as info:
        await memory_publisher.publish(
            b"m", exchange="x", routing_key="nowhere", mandatory=True
        )
    assert (info.value.reply_code, info.value.reply_text) == (312, "NO_ROUTE")
    assert (info.value.exchange, info.value.routing_key) == ("x", "nowhere")
    await memory_publisher.publish(b"dropped", exchange="x", routing_key="nowhere")
    await memory_publisher.publish(b"kept", routing_key="q", mandatory=True)
    assert memory_broker.bodies("q") == [b"kept"]
    assert "memory-publisher" in memory_broker.connection_names()


async def test_publish_to_a_missing_exchange_closes_the_publisher_channel() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    async with broker.open_publisher(PARAMS) as publisher:
        with pytest.raises(ChannelClosed) as info:
            await publisher.publish(b"m", exchange="missing")
        assert info.value.reply_code == 404
        with pytest.raises(ChannelClosed):
            await publisher.publish(b"m", routing_key="q")
    assert broker.message_count("q") == 0
    assert broker.connection_names() == []


async def test_publisher_declares_in_order_and_waits_while_blocked() -> None:
    broker = MemoryBroker()
    declare = [
        ExchangeSpec(name="x", type="fanout"),
        QueueSpec(name="q"),
        BindingSpec(queue="q", exchange="x"),
    ]
    async with broker.open_publisher(PARAMS, declare=declare) as publisher:
        broker.block_publishers()
        done = anyio.Event()

        async def publish() -> None:
            await publisher.publish(b"m", exchange="x")
            done.set()

        async with anyio.create_task_group() as group:
            group.start_soon(publish)
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set()
            assert broker.message_count("q") == 0
            broker.unblock_publishers()
        assert broker.bodies("q") == [b"m"]


# Queues: dead-lettering, length limits, TTL ------------------------------------------


def dlx_topology(**arguments: Any) -> list[Any]:
    return [
        ExchangeSpec(name="dlx", type="topic"),
        QueueSpec(name="dlq"),
        BindingSpec(queue="dlq", exchange="dlx", routing_key="#"),
        QueueSpec(
            name="work", arguments={"x-dead-letter-exchange": "dlx", **arguments}
        ),
    ]


async def test_reject_dead_letters_with_x_death() -> None:
    broker = MemoryBroker()
    broker.declare(*dlx_topology(), ExchangeSpec(name="in", type="topic"))
    broker.declare(BindingSpec(queue="work", exchange="in", routing_key="orders.*"))
    await broker.publish(
        b"m",
        exchange="in",
        routing_key="orders.new",
        properties=Properties(headers={"keep": "me"}, message_id="id-1"),
    )
    async with broker.open_session(spec("work", queues=())) as session:
        [delivery] = await take(session, 1)
        await session.reject(delivery.delivery_tag, requeue=False)
    [dead] = broker.queue_messages("dlq")
    assert dead.body == b"m"
    assert (dead.exchange, dead.routing_key) == ("dlx", "orders.new")
    assert dead.properties.message_id == "id-1"
    headers = dead.headers
    assert headers["keep"] == "me"
    [death] = headers["x-death"]
    assert {
        k: death[k] for k in ("count", "reason", "queue", "exchange", "routing-keys")
    } == {
        "count": 1,
        "reason": "rejected",
        "queue": "work",
        "exchange": "in",
        "routing-keys": ["orders.new"],
    }
    assert headers["x-first-death-reason"] == "rejected"
    assert headers["x-first-death-queue"] == "work"
    assert broker.message_count("work") == broker.unacked_count("work") == 0


async def test_dead_letter_routing_key_and_repeated_deaths_count() -> None:
    broker = MemoryBroker()
    broker.declare(
        ExchangeSpec(name="dlx", type="direct"),
        QueueSpec(
            name="work",
            arguments={
                "x-dead-letter-exchange": "dlx",
                "x-dead-letter-routing-key": "retry",
            },
        ),
        BindingSpec(queue="work", exchange="dlx", routing_key="retry"),  # loops back
    )
    await broker.publish(b"m", routing_key="work")
    async with broker.open_session(spec("work", queues=())) as session:
        for _ in range(3):
            [delivery] = await take(session, 1)
            assert delivery.routing_key == ("work" if _ == 0 else "retry")
            await session.nack(delivery.delivery_tag, requeue=False)
        [delivery] = await take(session, 1)
        [death] = delivery.properties.headers["x-death"]
        assert (death["count"], death["reason"], death["routing-keys"]) == (
            3,
            "rejected",
            ["work"],
        )
        await session.ack(delivery.delivery_tag)


async def test_max_length_drops_the_head_into_the_dlx() -> None:
    broker = MemoryBroker()
    broker.declare(*dlx_topology(**{"x-max-length": 2}))
    await fill(broker, "work", 4)
    assert broker.bodies("work") == ids(2, 3)
    assert broker.bodies("dlq") == ids(0, 1)
    assert broker.queue_messages("dlq")[0].headers["x-death"][0]["reason"] == "maxlen"


async def test_reject_publish_overflow_nacks_the_publisher() -> None:
    broker = MemoryBroker()
    broker.declare(
        QueueSpec(
            name="q", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
    )
    await broker.publish(b"1", routing_key="q")
    with pytest.raises(MessageNacked):
        await broker.publish(b"2", routing_key="q")
    assert broker.bodies("q") == [b"1"]


async def test_expired_messages_are_dead_lettered() -> None:
    now = [100.0]
    broker = MemoryBroker(clock=lambda: now[0])
    broker.declare(*dlx_topology(**{"x-message-ttl": 1000}))
    await broker.publish(b"queue-ttl", routing_key="work")
    await broker.publish(
        b"short", routing_key="work", properties=Properties(expiration="10")
    )
    await broker.publish(
        b"long", routing_key="work", properties=Properties(expiration="5000")
    )
    now[0] += 0.5
    assert broker.bodies("work") == [b"queue-ttl", b"long"]
    now[0] += 1
    assert broker.bodies("work") == []
    dead = broker.queue_messages("dlq")
    assert [m.body for m in dead] == [b"short", b"queue-ttl", b"long"]
    assert {m.headers["x-death"][0]["reason"] for m in dead} == {"expired"}
    assert dead[0].headers["x-death"][0]["original-expiration"] == "10"
    assert dead[0].properties.expiration is None


async def test_automatic_dead_letter_cycles_are_dropped() -> None:
    now = [0.0]
    broker = MemoryBroker(clock=lambda: now[0])
    broker.declare(
        QueueSpec(
            name="loop", arguments={"x-dead-letter-exchange": "", "x-message-ttl": 0}
        ),
    )
    await broker.publish(b"m", routing_key="loop")  # expires, DLX "" to "loop" itself
    assert broker.bodies("loop") == []


# Declarations ------------------------------------------------------------------------


async def test_redeclare_is_idempotent_and_a_mismatch_is_a_406() -> None:
    broker = MemoryBroker()
    arguments = {"x-max-length": 10, "x-dead-letter-exchange": "dlx"}
    first = spec("q", queues=[QueueSpec(name="q", arguments=arguments)])
    async with broker.open_session(first):
        pass
    async with broker.open_session(first):
        pass
    await broker.publish(b"m", routing_key="q")
    for other in (
        QueueSpec(name="q"),
        QueueSpec(name="q", arguments={**arguments, "x-max-length": 11}),
        QueueSpec(name="q", arguments=arguments, durable=False),
    ):
        with pytest.raises(ChannelClosed) as info:
            async with broker.open_session(spec("q", queues=[other])):
                pytest.fail("the session must not open")
        assert info.value.reply_code == 406
        assert "PRECONDITION_FAILED" in info.value.reply_text
        assert not info.value.retryable
    # Unknown arguments are not compared; the queue and its message are untouched.
    broker.declare(QueueSpec(name="q", arguments={**arguments, "x-custom": 1}))
    assert broker.bodies("q") == [b"m"]
    with pytest.raises(ChannelClosed) as exchange_info:
        broker.declare(
            ExchangeSpec(name="e", type="topic"), ExchangeSpec(name="e", type="direct")
        )
    assert exchange_info.value.reply_code == 406


async def test_consuming_a_missing_queue_is_a_404() -> None:
    broker = MemoryBroker()
    with pytest.raises(ChannelClosed) as info:
        async with broker.open_session(spec("missing", queues=())):
            pytest.fail("the session must not open")
    assert info.value.reply_code == 404
    assert broker.connection_names() == []


async def test_exclusive_queue_belongs_to_its_connection() -> None:
    broker = MemoryBroker()
    exclusive = spec("ex", queues=[QueueSpec(name="ex", exclusive=True)])
    async with broker.open_session(exclusive):
        with pytest.raises(ChannelClosed) as info:
            async with broker.open_session(exclusive):
                pytest.fail("the session must not open")
        assert info.value.reply_code == 405
    assert not broker.has_queue("ex")


# Prefetch, tags, redelivery ----------------------------------------------------------


async def test_prefetch_bounds_unacked_deliveries() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 10)
    async with broker.open_session(spec("q", prefetch=3)) as session:
        first = buffered(session)
        assert bodies(first) == ids(0, 1, 2)
        assert (broker.message_count("q"), broker.unacked_count("q")) == (7, 3)
        await session.ack(first[0].delivery_tag)
        assert bodies(buffered(session)) == ids(3)
        await session.ack(first[2].delivery_tag, multiple=True)
        assert bodies(buffered(session)) == ids(4, 5)
        assert broker.unacked_count("q") == 3


async def test_tags_grow_by_one_and_requeue_marks_redelivered() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 3)
    async with broker.open_session(spec("q", prefetch=2)) as session:
        one, two = await take(session, 2)
        assert (one.delivery_tag, two.delivery_tag) == (1, 2)
        assert not one.redelivered
        await session.nack(one.delivery_tag, requeue=True)
        # Back at its place (the head), ahead of message 2.
        [again] = await take(session, 1)
        assert (again.body, again.delivery_tag, again.redelivered) == (b"0", 3, True)
        await session.ack(two.delivery_tag)
        [three] = await take(session, 1)
        assert (three.body, three.delivery_tag, three.redelivered) == (b"2", 4, False)
    # Leaving the session requeued the unacked ones in order, redelivered.
    assert [(m.body, m.redelivered) for m in broker.queue_messages("q")] == [
        (b"0", True),
        (b"2", True),
    ]


async def test_a_new_session_starts_its_tags_at_one() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 2)
    for _ in range(2):
        async with broker.open_session(spec("q", prefetch=1)) as session:
            [delivery] = await take(session, 1)
            assert delivery.delivery_tag == 1
    async with broker.open_session(spec("q", prefetch=5)) as session:
        assert [(d.body, d.redelivered) for d in buffered(session)] == [
            (b"0", True),
            (b"1", False),
        ]


async def test_multiple_ack_nack_and_tag_zero() -> None:
    broker = MemoryBroker()
    broker.declare(*dlx_topology())
    await fill(broker, "work", 8)
    async with broker.open_session(spec("work", queues=(), prefetch=8)) as session:
        got = await take(session, 8)
        await session.ack(got[2].delivery_tag, multiple=True)  # 0, 1, 2
        await session.nack(got[4].delivery_tag, multiple=True, requeue=False)  # 3, 4
        await session.reject(got[5].delivery_tag, requeue=True)  # 5 back
        assert broker.bodies("dlq") == ids(3, 4)
        again = await take(session, 1)
        assert bodies(again) == ids(5)
        await session.ack(0, multiple=True)  # everything outstanding: 6, 7, 5
        assert broker.unacked_count("work") == broker.message_count("work") == 0


async def test_unknown_or_double_settled_tag_closes_the_session() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 3)

    async def settle_twice() -> None:
        async with broker.open_session(spec("q")) as session:
            first, *_ = await take(session, 3)
            await session.ack(first.delivery_tag)
            await session.ack(first.delivery_tag)  # double settle
            pytest.fail("the session must be cancelled by the channel close")

    with pytest.raises(ChannelClosed) as info:
        await settle_twice()
    assert info.value.reply_code == 406
    assert info.value.reply_text == "PRECONDITION_FAILED - unknown delivery tag 1"
    assert not info.value.retryable
    # The other two went back to the queue.
    assert [(m.body, m.redelivered) for m in broker.queue_messages("q")] == [
        (b"1", True),
        (b"2", True),
    ]


async def test_a_closed_session_settles_nothing_more() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 2)

    async def settle_after_close() -> None:
        async with broker.open_session(spec("q")) as session:
            a, b = await take(session, 2)
            with anyio.CancelScope(shield=True):
                await session.ack(a.delivery_tag, multiple=True)
                await session.ack(99)
            # no checkpoint since: later settles raise the close error
            with pytest.raises(ChannelClosed):
                await session.ack(b.delivery_tag)

    with pytest.raises(ChannelClosed):
        await settle_after_close()
    assert broker.bodies("q") == ids(1)


async def test_unknown_tag_with_multiple_is_an_error_too() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 2)

    async def ack_unknown() -> None:
        async with broker.open_session(spec("q")) as session:
            await take(session, 2)
            await session.ack(5, multiple=True)

    with pytest.raises(ChannelClosed):
        await ack_unknown()
    assert broker.message_count("q") == 2


# Cancelling --------------------------------------------------------------------------


async def test_our_cancel_ends_the_stream_after_the_buffer() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 5)
    async with broker.open_session(spec("q", prefetch=2)) as session:
        await session.cancel()
        got = [d async for d in session.deliveries]
        assert bodies(got) == ids(0, 1)
        assert not session.consumer_cancelled_by_broker
        await session.ack(got[0].delivery_tag)
        assert broker.consumer_count("q") == 0
        assert broker.message_count("q") == 3
    assert broker.bodies("q") == ids(1, 2, 3, 4)


async def test_deleting_the_queue_cancels_the_consumer() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 3)
    async with broker.open_session(spec("q", prefetch=1)) as session:
        [delivery] = await take(session, 1)

        async def delete() -> None:
            await anyio.wait_all_tasks_blocked()
            assert broker.delete_queue("q") == 2

        async with anyio.create_task_group() as group:
            group.start_soon(delete)
            with anyio.fail_after(5):
                rest = [d async for d in session.deliveries]
        assert rest == []
        assert session.consumer_cancelled_by_broker
        await session.ack(delivery.delivery_tag)  # allowed: the channel is open
    assert not broker.has_queue("q")


async def test_auto_delete_queue_goes_with_its_last_consumer() -> None:
    broker = MemoryBroker()
    auto = spec("tmp", queues=[QueueSpec(name="tmp", auto_delete=True)])
    async with broker.open_session(auto):
        assert broker.has_queue("tmp")
    assert not broker.has_queue("tmp")


async def test_consumers_share_a_queue_round_robin() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    async with (
        broker.open_session(spec("q")) as one,
        broker.open_session(spec("q")) as two,
    ):
        await fill(broker, "q", 4)
        assert bodies(buffered(one)) == ids(0, 2)
        assert bodies(buffered(two)) == ids(1, 3)


# Connections -------------------------------------------------------------------------


async def test_disconnect_raises_connection_lost_and_requeues() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    await fill(broker, "q", 3)
    named = spec("q", parameters=ConnectionParameters(connection_name="worker-1"))

    async def consume() -> None:
        async with broker.open_session(named) as session:
            first, _, _ = await take(session, 3)
            await session.ack(first.delivery_tag)
            assert broker.disconnect("someone-else") == 0
            assert broker.disconnect("worker-1") == 1
            await anyio.sleep_forever()

    with pytest.raises(ConnectionLost) as info:
        await consume()
    assert info.value.retryable
    assert info.value.reply_code == 320
    assert [(m.body, m.redelivered) for m in broker.queue_messages("q")] == [
        (b"1", True),
        (b"2", True),
    ]
    assert broker.connection_names() == []


async def test_disconnect_all_reaches_publishers() -> None:
    broker = MemoryBroker()

    async def publish() -> None:
        async with broker.open_publisher(PARAMS):
            assert broker.disconnect_all() == 1
            await anyio.sleep_forever()

    with pytest.raises(ConnectionLost):
        await publish()


async def test_disconnect_from_another_task_ends_a_blocked_consumer() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))

    async def consume() -> None:
        async with broker.open_session(spec("q")) as session:
            async for _ in session.deliveries:
                pytest.fail("nothing was published")

    async def expect_lost() -> None:
        with pytest.raises(ConnectionLost):
            await consume()

    async with anyio.create_task_group() as group:
        group.start_soon(expect_lost)
        await broker.wait_until(lambda: broker.consumer_count("q") == 1, timeout=5)
        broker.disconnect_all()
    assert broker.consumer_count("q") == 0


async def test_credentials_vhosts_and_refused_connections() -> None:
    broker = MemoryBroker(users={"app": "s3cret"}, virtual_hosts={"/", "prod"})
    with pytest.raises(AuthenticationError) as info:
        async with broker.open_publisher(
            ConnectionParameters(username="app", password="WRONG-pw")
        ):
            pass
    assert "'app'" in str(info.value)
    assert "WRONG-pw" not in str(info.value)
    assert not info.value.retryable
    with pytest.raises(UnknownVirtualHost):
        async with broker.open_publisher(
            ConnectionParameters(username="app", password="s3cret", virtual_host="dev")
        ):
            pass
    async with broker.open_publisher(
        ConnectionParameters(username="app", password="s3cret", virtual_host="prod")
    ):
        pass
    broker.refuse_connections = True
    with pytest.raises(ConnectionRefused) as refused:
        async with broker.open_publisher(PARAMS):
            pass
    assert refused.value.retryable


async def test_wait_until_times_out() -> None:
    broker = MemoryBroker()
    broker.declare(QueueSpec(name="q"))
    with pytest.raises(TimeoutError):
        await broker.wait_until(lambda: broker.message_count("q") > 0, timeout=0.01)


# The real consumer on the memory broker ----------------------------------------------


@asynccontextmanager
async def running(
    broker: MemoryBroker, handle: Any, **options: Any
) -> AsyncIterator[None]:
    from amqp_batch import BatchConsumerSettings, batch_consumer

    settings = BatchConsumerSettings(
        queue_name="work",
        url="amqp://guest:guest@memory/",
        batch_size=options.pop("batch_size", 4),
        batch_timeout=0.05,
        prefetch_count=8,
        dead_letter_exchange="dlx",
        dead_letter_exchange_type="topic",
        dead_letter_queue="dlq",
        max_requeue_attempts=2,
        shutdown_timeout=5,
        **options,
    )
    async with batch_consumer(settings, handle, transport=broker):
        yield


async def test_batch_consumer_settles_every_result_kind() -> None:
    from amqp_batch import MessageResult

    broker = MemoryBroker()
    seen: list[tuple[bytes, int]] = []

    async def handle(messages: Any) -> AsyncIterator[MessageResult]:
        for message in messages:
            body = message.body
            seen.append((body, message.retry_count))
            if body.startswith(b"nack"):
                yield MessageResult.NACK
            elif body.startswith(b"retry"):
                yield MessageResult.REQUEUE
            else:
                yield MessageResult.ACK

    async with running(broker, handle):
        for body in (b"ok-1", b"nack-1", b"retry-1", b"ok-2"):
            await broker.publish(body, routing_key="work")
        await broker.wait_until(
            lambda: (
                len(broker.queue_messages("dlq")) == 2
                and broker.message_count("work") == broker.unacked_count("work") == 0
            ),
            timeout=10,
        )
    dead = {m.body: m for m in broker.queue_messages("dlq")}
    assert set(dead) == {b"nack-1", b"retry-1"}
    assert [retry for body, retry in seen if body == b"retry-1"] == [0, 1, 2]
    assert seen.count((b"ok-1", 0)) == 1
    assert broker.message_count("work") == 0


async def test_batch_consumer_reconnects_after_a_disconnect() -> None:
    from amqp_batch import MessageResult

    broker = MemoryBroker()
    handled: list[tuple[bytes, bool]] = []
    first_batch = anyio.Event()

    async def handle(messages: Any) -> list[MessageResult]:
        if not first_batch.is_set():
            first_batch.set()
            await anyio.sleep_forever()  # cancelled when its session dies
        handled.extend((m.body, m.delivery.redelivered) for m in messages)
        return [MessageResult.ACK] * len(messages)

    options = {"reconnect_backoff_base": 0.001, "reconnect_backoff_cap": 0.001}
    async with running(broker, handle, batch_size=2, **options):
        await fill(broker, "work", 2)
        with anyio.fail_after(5):
            await first_batch.wait()
        assert broker.disconnect("amqp-batch:work-w0") == 1
        await broker.wait_drained("work", timeout=10)
    # The first batch was never settled: it came back, redelivered, and was
    # handled once on the new session.
    assert handled == [(b"0", True), (b"1", True)]


# The pytest plugin -------------------------------------------------------------------


def test_the_fixtures_work_as_a_pytest_plugin(pytester: pytest.Pytester) -> None:
    from importlib.metadata import entry_points

    pytester.makepyfile(
        """
        import pytest
        from amqp_batch.testing import MemoryBroker, QueueSpec

        pytestmark = pytest.mark.anyio

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        async def test_publish(memory_broker, memory_publisher):
            assert isinstance(memory_broker, MemoryBroker)
            memory_broker.declare(QueueSpec(name="q"))
            await memory_publisher.publish(b"x", routing_key="q")
            assert memory_broker.bodies("q") == [b"x"]
        """
    )
    installed = any(e.name == "amqp_batch" for e in entry_points(group="pytest11"))
    arguments = [] if installed else ["-p", "amqp_batch._pytest_plugin"]
    result = pytester.runpytest_subprocess(*arguments, "-W", "error")
    result.assert_outcomes(passed=2)


async def test_the_docs_example() -> None:
    """docs/testing.md's first example, verbatim."""
    from amqp_batch import BatchConsumerSettings, MessageResult, batch_consumer

    async def handle(messages: Any) -> AsyncIterator[MessageResult]:
        for message in messages:
            yield MessageResult.NACK if message.body == b"bad" else MessageResult.ACK

    broker = MemoryBroker()
    settings = BatchConsumerSettings(
        queue_name="orders",
        dead_letter_exchange="orders.dlx",
        dead_letter_queue="orders.dead",
        batch_size=10,
        batch_timeout=0.05,
    )
    async with batch_consumer(settings, handle, transport=broker):
        for body in (b"ok", b"bad", b"ok"):
            await broker.publish(body, routing_key="orders")
        await broker.wait_drained("orders", timeout=5)

    assert broker.bodies("orders.dead") == [b"bad"]
    [dead] = broker.queue_messages("orders.dead")
    assert dead.headers["x-dead-letter-reason"] == "rejected"


# A model check: every message is somewhere, exactly once -----------------------------


@settings(max_examples=60, deadline=None)
@given(
    operations=st.lists(
        st.tuples(
            st.sampled_from(["ack", "ack-multiple", "requeue", "reject", "reopen"]),
            st.integers(min_value=0, max_value=7),
        ),
        max_size=40,
    ),
    prefetch=st.integers(min_value=1, max_value=4),
)
async def test_messages_are_conserved_and_flags_are_right(
    operations: list[tuple[str, int]], prefetch: int
) -> None:
    broker = MemoryBroker()
    broker.declare(*dlx_topology())
    everything = ids(*range(8))
    for body in everything:
        await broker.publish(body, routing_key="work")
    acked: list[bytes] = []
    delivered_before: set[bytes] = set()

    def check() -> None:
        where = [
            *broker.bodies("work"),
            *(m.body for m in broker.unacked_messages("work")),
            *broker.bodies("dlq"),
            *acked,
        ]
        assert sorted(where) == everything

    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            broker.open_session(spec("work", prefetch, queues=()))
        )
        outstanding: list[Delivery] = []
        last_tag = 0
        for operation, index in operations:
            for delivery in buffered(session):
                assert delivery.delivery_tag == last_tag + 1
                last_tag = delivery.delivery_tag
                assert delivery.redelivered == (delivery.body in delivered_before)
                delivered_before.add(delivery.body)
                outstanding.append(delivery)
            assert len(outstanding) <= prefetch
            if operation == "reopen":
                await stack.aclose()
                session = await stack.enter_async_context(
                    broker.open_session(spec("work", prefetch, queues=()))
                )
                outstanding, last_tag = [], 0
            elif outstanding:
                target = outstanding[index % len(outstanding)]
                tag = target.delivery_tag
                if operation == "ack-multiple":
                    settled = [d for d in outstanding if d.delivery_tag <= tag]
                    await session.ack(tag, multiple=True)
                    acked.extend(d.body for d in settled)
                else:
                    settled = [target]
                    if operation == "ack":
                        await session.ack(tag)
                        acked.append(target.body)
                    else:
                        await session.reject(tag, requeue=operation == "requeue")
                outstanding = [d for d in outstanding if d not in settled]
            check()
    check()
    assert broker.unacked_count("work") == 0
