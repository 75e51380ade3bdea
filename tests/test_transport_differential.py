"""The aiormq transport checked against the native one, on a real RabbitMQ.

- A hypothesis-driven differential test: random scripts of publish, ack / nack /
  reject (with ``multiple`` and ``requeue``), cancel, close and cut (the broker
  closes the connection: the private node's ``close_connection``) run in lockstep
  on both transports, each on its own queue with a dead-letter queue. What the
  broker shows is compared between them and with a model: which ids each step
  delivered (in order, with the redelivered flag), which a settle covered, and at
  the end which ids are still queued (redelivered or not) and which were
  dead-lettered.
- The guarantees of the contract that are the aiormq transport's own work: no
  aiormq task outlives a session (also after a cut), a tag from a dead session is
  never sent, deliveries are buffered up to the prefetch without blocking the
  reader, pipelined publishes keep their order, and confirmations fail with
  MessageReturned / MessageNacked.

aiormq is asyncio-only, so these tests run on asyncio (they compare against the
native transport there); the trio row checks the clear error instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.rabbit_node import _wait_until
from tests.support.transports import make_transport, over_transports

from amqp_batch import (
    AiormqTransport,
    AuthenticationError,
    ChannelClosed,
    ConnectionLost,
    MessageNacked,
    MessageReturned,
)
from amqp_batch._transport._aiormq import AsyncioOnly
from amqp_batch._transport._base import Properties, SessionSpec
from amqp_batch._transport._native import NativeTransport
from amqp_batch._transport._url import parse_url
from consumer_support import admin_channel

pytestmark = pytest.mark.anyio
on_asyncio = pytest.mark.parametrize("anyio_backend", ["asyncio"], scope="module")

PREFETCH = 64  # larger than any script's message count: the window never limits
WAIT = 15.0


@pytest.fixture
def transport(transport_kind: str) -> Any:
    """The transport under test (rows: ``tests.support.transports.ROWS``)."""
    return make_transport(transport_kind)


# -- one transport's side of a script ---------------------------------------------


@attrs.define
class Side:
    """One transport running the script's steps on its own queue, in a task of
    its own (a session's scope lives in the task that opened it)."""

    name: str
    transport: Any
    url: str
    queue: str
    dead: str
    commands: MemoryObjectSendStream[tuple[Any, ...]] | None = None
    replies: MemoryObjectReceiveStream[Any] | None = None
    #: reply code of a connection loss seen while no command was running
    lost: int | None = None

    async def call(self, *command: Any) -> Any:
        assert self.commands is not None and self.replies is not None
        await self.commands.send(command)
        with anyio.fail_after(WAIT):
            reply = await self.replies.receive()
        if isinstance(reply, BaseException):
            raise reply
        return reply


def _spec(side: Side, connection_name: str) -> SessionSpec:
    parameters = attrs.evolve(parse_url(side.url), connection_name=connection_name)
    return SessionSpec(parameters=parameters, queue=side.queue, prefetch_count=PREFETCH)


async def serve(
    side: Side,
    commands: MemoryObjectReceiveStream[tuple[Any, ...]],
    replies: MemoryObjectSendStream[Any],
) -> None:
    """Run ``side``'s commands: ``open`` starts a session, the others act on it."""
    parameters = attrs.evolve(parse_url(side.url), connection_name=f"{side.name}-pub")
    async with commands, replies, side.transport.open_publisher(parameters) as pub:
        async for command in commands:
            try:
                if command[0] == "publish":
                    await _publish(pub, side.queue, command[1])
                    await replies.send(None)
                elif command[0] == "open":
                    await replies.send(None)
                    await _session(side, pub, command[1], commands, replies)
                elif command[0] == "reset":
                    await replies.send("closed")
                elif command[0] == "cut" and side.lost is not None:
                    await replies.send(("lost", side.lost))
                    side.lost = None
                else:
                    await replies.send(ValueError(f"no session for {command!r}"))
            except Exception as exc:  # raised in the test by Side.call
                await replies.send(exc)


async def _publish(publisher: Any, queue: str, ids: list[str]) -> None:
    confirmations = [
        publisher.start_publish(
            name.encode(), routing_key=queue, properties=Properties(message_id=name)
        )
        for name in ids
    ]
    for confirmation in confirmations:
        await confirmation.wait()


async def _session(
    side: Side,
    publisher: Any,
    connection_name: str,
    commands: MemoryObjectReceiveStream[tuple[Any, ...]],
    replies: MemoryObjectSendStream[Any],
) -> None:
    held: dict[str, int] = {}
    command: tuple[Any, ...] = ("open",)
    try:
        async with side.transport.open_session(_spec(side, connection_name)) as session:
            async for command in commands:
                if command[0] in ("close", "reset"):
                    break
                if command[0] == "publish":
                    await _publish(publisher, side.queue, command[1])
                    await replies.send(None)
                    continue
                await replies.send(await _step(session, held, command))
        await replies.send("closed")
    except ConnectionLost as lost:
        if command[0] == "cut":
            await replies.send(("lost", lost.reply_code))
        else:  # lost between commands: the coming "cut" gets the answer
            side.lost = lost.reply_code


async def _step(session: Any, held: dict[str, int], command: tuple[Any, ...]) -> Any:
    kind = command[0]
    if kind == "receive":
        got = []
        with anyio.fail_after(WAIT):
            while len(got) < command[1]:
                delivery = await session.deliveries.receive()
                held[str(delivery.properties.message_id)] = delivery.delivery_tag
                got.append((delivery.properties.message_id, delivery.redelivered))
        return got
    if kind == "settle":
        _, verb, target, multiple, requeue = command
        tag = held[target]
        if verb == "ack":
            await session.ack(tag, multiple=multiple)
        elif verb == "nack":
            await session.nack(tag, multiple=multiple, requeue=requeue)
        else:
            multiple = False
            await session.reject(tag, requeue=requeue)
        covered = sorted(
            i for i, t in held.items() if t == tag or (multiple and t < tag)
        )
        for name in covered:
            del held[name]
        return covered
    if kind == "cancel":
        await session.cancel()
        with anyio.fail_after(WAIT):
            return [d.properties.message_id async for d in session.deliveries]
    if kind == "cut":  # the driver closed the connection; wait for the loss
        with anyio.fail_after(WAIT):
            await anyio.sleep_forever()
    raise ValueError(f"unknown command {command!r}")


def cut_connections(node: Any, connection_name: str, count: int) -> int:
    """The broker closes (320 CONNECTION_FORCED) every connection named
    ``connection_name``, once ``count`` of them are open; how many. One
    ``eval`` (``close_connection`` of the node helper lists and closes one at a
    time). A session is opened after its ``open`` command was answered, so the
    connections are waited for: the broker lists them, running, in a few ms."""
    _wait_until(
        lambda: (
            sum(
                c["name"] == connection_name and c["state"] == "running"
                for c in node.list_connections()
            )
            >= count
        ),
        WAIT,
        0.01,
    )
    name = connection_name.replace("\\", "").replace('"', "")
    found = node.eval(
        "Pids = [P || P <- rabbit_networking:connections(), "
        "case rabbit_networking:connection_info(P, [client_properties]) of "
        "[{client_properties, Props}] when is_list(Props) -> "
        f'lists:keyfind(<<"connection_name">>, 1, Props) =:= '
        f'{{<<"connection_name">>, longstr, <<"{name}">>}}; '
        "_ -> false end], "
        '[rabbit_networking:close_connection(P, "cut by the test") || P <- Pids], '
        "length(Pids)."
    )
    return int(found)


# -- the model and the driver -----------------------------------------------------


@attrs.define
class Model:
    """What the broker must show after each step (one consumer at a time)."""

    ready: list[str] = attrs.Factory(list)
    held: list[str] = attrs.Factory(list)  # in delivery order
    seen: set[str] = attrs.Factory(set)
    dead: set[str] = attrs.Factory(set)
    consuming: bool = False
    published: int = 0

    def new_ids(self, count: int) -> list[str]:
        ids = [f"m{self.published + i:03d}" for i in range(count)]
        self.published += count
        self.ready.extend(ids)
        return ids


Step = tuple[Any, ...]

steps = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 3)),
    st.tuples(
        st.just("settle"),
        st.sampled_from(["ack", "nack", "reject"]),
        st.integers(0, 20),
        st.booleans(),
        st.booleans(),
    ),
    st.just(("cancel",)),
    st.just(("close",)),
)
scripts = st.lists(steps, min_size=1, max_size=8)
scripts_with_a_cut = st.tuples(scripts, st.just(("cut",)), scripts).map(
    lambda parts: [*parts[0], parts[1], *parts[2]]
)


class Driver:
    """Runs one script on both sides in lockstep and compares what they saw."""

    def __init__(self, sides: list[Side], node: Any, admin: Any) -> None:
        self.sides = sides
        self.node = node
        self.admin = admin
        self.model = Model()
        self.trace: list[Any] = []
        self.sessions = 0

    async def both(self, *command: Any) -> Any:
        replies = [await side.call(*command) for side in self.sides]
        assert replies[0] == replies[1], (command, replies, self.trace)
        self.trace.append((command, replies[0]))
        return replies[0]

    async def open(self) -> None:
        self.sessions += 1
        name = f"diff-{os.getpid()}-{uuid.uuid4().hex[:8]}-{self.sessions}"
        self.connection_name = name
        await self.both("open", name)
        self.model.consuming = True
        await self.receive()

    async def receive(self) -> None:
        model = self.model
        if not (model.consuming and model.ready):
            return
        got = await self.both("receive", len(model.ready))
        expected = sorted((i, i in model.seen) for i in model.ready)
        assert sorted(got) == expected, (got, expected, self.trace)
        model.held.extend(i for i, _ in got)
        model.seen.update(model.ready)
        model.ready = []

    async def run(self, script: list[Step]) -> None:
        await self.both("reset")  # a failed example may have left a session open
        self.trace = []
        for side in self.sides:
            await self.admin.queue_purge(side.queue)
            await self.admin.queue_purge(side.dead)
        await self.open()
        for step in script:
            await self.step(step)
        await self.end_session()

    async def step(self, step: Step) -> None:
        model = self.model
        if step[0] == "publish":
            await self.both("publish", model.new_ids(step[1]))
        elif step[0] == "settle" and model.held:
            _, verb, index, multiple, requeue = step
            target = sorted(model.held)[index % len(model.held)]
            covered = await self.both("settle", verb, target, multiple, requeue)
            self.apply_settle(covered, verb, requeue)
        elif step[0] == "cancel" and model.consuming:
            assert await self.both("cancel") == []
            model.consuming = False
        elif step[0] == "close":
            await self.end_session()
            await self.open()
        elif step[0] == "cut":
            await self.cut()
        await self.receive()

    def apply_settle(self, covered: list[str], verb: str, requeue: bool) -> None:
        model = self.model
        model.held = [i for i in model.held if i not in covered]
        if verb != "ack" and requeue:
            model.ready.extend(covered)
        elif verb != "ack":
            model.dead.update(covered)

    async def end_session(self) -> None:
        assert await self.both("close") == "closed"
        self.requeue_held()

    def requeue_held(self) -> None:
        self.model.ready.extend(self.model.held)
        self.model.held = []
        self.model.consuming = False

    async def cut(self) -> None:
        closed = await anyio.to_thread.run_sync(
            cut_connections, self.node, self.connection_name, 2
        )
        assert closed == 2
        assert await self.both("cut") == ("lost", 320)
        self.requeue_held()
        await self.open()

    async def outcome(self, side: Side) -> tuple[list[tuple[str, bool]], list[str]]:
        """What ``side``'s queues hold: (id, redelivered) queued, ids dead-lettered."""
        channel = self.admin
        with anyio.fail_after(WAIT):
            while (  # noqa: ASYNC110 - polling the broker's state
                await channel.queue_declare(side.dead, passive=True)
            ).message_count < len(self.model.dead):
                await anyio.sleep(0.02)
        queued = []
        while (got := await channel.basic_get(side.queue, no_ack=True)) is not None:
            queued.append((str(got.properties.message_id), got.redelivered))
        dead = []
        while (got := await channel.basic_get(side.dead, no_ack=True)) is not None:
            dead.append(str(got.properties.message_id))
        return sorted(queued), sorted(dead)

    async def check_outcome(self) -> None:
        native, other = [await self.outcome(side) for side in self.sides]
        assert native == other, (native, other, self.trace)
        model = self.model
        assert native[0] == sorted((i, i in model.seen) for i in model.ready)
        assert native[1] == sorted(model.dead)


@pytest.fixture
async def admin(private_node: Any) -> AsyncIterator[Any]:
    """One native channel for setup and inspection, for the whole test."""
    async with admin_channel(private_node.url) as channel:
        yield channel


@pytest.fixture
async def sides(private_node: Any, admin: Any) -> AsyncIterator[list[Side]]:
    """A native and an aiormq side, each with its queue and dead-letter queue,
    their tasks running for the whole test (hypothesis examples reuse them)."""
    base = f"amqpbatch-diff-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    made = [
        Side(
            "native", NativeTransport(), private_node.url, f"{base}.n", f"{base}.n.dl"
        ),
        Side(
            "aiormq", AiormqTransport(), private_node.url, f"{base}.a", f"{base}.a.dl"
        ),
    ]
    for side in made:
        await admin.queue_declare(side.dead)
        await admin.queue_declare(
            side.queue,
            arguments={
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": side.dead,
            },
        )
    async with anyio.create_task_group() as group:
        for side in made:
            commands_in, commands_out = anyio.create_memory_object_stream[Any](1)
            replies_in, replies_out = anyio.create_memory_object_stream[Any](1)
            side.commands, side.replies = commands_in, replies_out
            group.start_soon(serve, side, commands_out, replies_in)
        yield made
        for side in made:
            assert side.commands is not None and side.replies is not None
            await side.commands.aclose()
            await side.replies.aclose()
    for side in made:
        await admin.queue_delete(side.queue)
        await admin.queue_delete(side.dead)


def _examples(count: int) -> settings:
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
        database=None,
    )


@on_asyncio
@_examples(200)
@given(script=scripts)
async def test_random_scripts_end_the_same_on_both_transports(
    sides: list[Side], private_node: Any, admin: Any, script: list[Step]
) -> None:
    driver = Driver(sides, private_node, admin)
    await driver.run(script)
    await driver.check_outcome()


@on_asyncio
@_examples(15)
@given(script=scripts_with_a_cut)
async def test_random_scripts_with_a_broker_cut_end_the_same(
    sides: list[Side], private_node: Any, admin: Any, script: list[Step]
) -> None:
    driver = Driver(sides, private_node, admin)
    await driver.run(script)
    await driver.check_outcome()


# -- guarantees of the contract, on every transport ---------------------------------


async def _fresh(admin: Any, name: str, **arguments: Any) -> str:
    await admin.queue_delete(name)
    await admin.queue_declare(name, arguments=arguments or None)
    return name


async def _publish_ids(admin: Any, queue: str, count: int) -> None:
    for i in range(count):
        await admin.publish(
            str(i).encode(), routing_key=queue, properties=Properties(message_id=str(i))
        )


def _session_spec(
    url: str, queue: str, prefetch: int = 10, **options: Any
) -> SessionSpec:
    parameters = attrs.evolve(parse_url(url), **options)
    return SessionSpec(parameters=parameters, queue=queue, prefetch_count=prefetch)


@over_transports
async def test_a_tag_from_an_ended_session_is_never_sent(
    transport: Any, private_node: Any, admin: Any, unique_name: str
) -> None:
    queue = await _fresh(admin, unique_name)
    await _publish_ids(admin, queue, 1)
    async with transport.open_session(_session_spec(private_node.url, queue)) as old:
        delivery = await old.deliveries.receive()
    with pytest.raises(ChannelClosed):
        await old.ack(delivery.delivery_tag)
    async with transport.open_session(_session_spec(private_node.url, queue)) as new:
        with anyio.fail_after(WAIT):
            again = await new.deliveries.receive()
        assert (again.body, again.redelivered) == (b"0", True)  # not acked by `old`
        await new.ack(again.delivery_tag)
    await admin.queue_delete(queue)


@over_transports
async def test_a_full_prefetch_window_unread_does_not_block_the_reader(
    transport: Any, private_node: Any, admin: Any, unique_name: str
) -> None:
    """Nobody reads the deliveries, yet the session still reads frames: the
    cancel-ok arrives behind a whole prefetch window of deliveries."""
    queue = await _fresh(admin, unique_name)
    await _publish_ids(admin, queue, 50)
    spec = _session_spec(private_node.url, queue, prefetch=50)
    async with transport.open_session(spec) as session:
        with anyio.fail_after(WAIT):
            while (  # noqa: ASYNC110 - polling the broker's state
                await admin.queue_declare(queue, passive=True)
            ).message_count:
                await anyio.sleep(0.02)  # all 50 sent to us
            await session.cancel()
            bodies = [d.body async for d in session.deliveries]
        assert bodies == [str(i).encode() for i in range(50)]
    assert (await admin.queue_declare(queue, passive=True)).message_count == 50
    await admin.queue_delete(queue)


@over_transports
async def test_pipelined_publishes_keep_their_order_and_confirm_each(
    transport: Any, private_node: Any, admin: Any, unique_name: str
) -> None:
    dead = await _fresh(admin, f"{unique_name}.full")
    queue = await _fresh(
        admin, unique_name, **{"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    async with transport.open_publisher(parse_url(private_node.url)) as publisher:
        routed = [
            publisher.start_publish(str(i).encode(), routing_key=dead)
            for i in range(300)
        ]
        returned = publisher.start_publish(
            b"r", routing_key=f"{unique_name}.nowhere", mandatory=True
        )
        first = publisher.start_publish(b"kept", routing_key=queue)
        refused = publisher.start_publish(b"over the limit", routing_key=queue)
        for confirmation in routed:
            await confirmation.wait()
        with pytest.raises(MessageReturned) as info:
            await returned.wait()
        assert info.value.reply_code == 312
        await first.wait()
        with pytest.raises(MessageNacked):
            await refused.wait()
    bodies = []
    while (got := await admin.basic_get(dead, no_ack=True)) is not None:
        bodies.append(got.body)
    assert bodies == [str(i).encode() for i in range(300)]
    await admin.queue_delete(queue)
    await admin.queue_delete(dead)


@over_transports
async def test_cancelled_publish_callers_never_corrupt_a_frame(
    transport: Any, private_node: Any, admin: Any, unique_name: str
) -> None:
    queue = await _fresh(admin, unique_name)
    body = b"y" * 300_000  # several frames each
    async with transport.open_publisher(parse_url(private_node.url)) as publisher:
        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as group:
                for _ in range(30):
                    group.start_soon(lambda: publisher.publish(body, routing_key=queue))
        await publisher.publish(b"after", routing_key=queue)
    messages = []
    while (got := await admin.basic_get(queue, no_ack=True)) is not None:
        messages.append(got.body)
    assert messages[-1] == b"after"
    assert all(m == body for m in messages[:-1])  # each one whole
    await admin.queue_delete(queue)


@over_transports
async def test_no_password_in_logs_errors_or_reprs(
    transport: Any, private_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "PW-MARKER-4711"
    url = f"amqp://guest:{marker}@127.0.0.1:{private_node.amqp_port}/"
    texts = []
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthenticationError) as info:
            async with transport.open_publisher(parse_url(url)):
                pass
        texts += [str(info.value), repr(info.value)]
        texts.append("".join(traceback.format_exception(info.value)))
        good = attrs.evolve(parse_url(url), password="guest")
        async with transport.open_publisher(good) as publisher:
            texts.append(repr(publisher))
    texts += [record.getMessage() for record in caplog.records]
    assert caplog.records
    assert [text for text in texts if marker in text] == []


@over_transports
async def test_tls_with_the_right_ca(
    transport: Any, private_node: Any, admin: Any, unique_name: str
) -> None:
    queue = await _fresh(admin, unique_name)
    params = parse_url(
        private_node.tls_url, ssl_context=private_node.client_ssl_context()
    )
    for _ in range(3):  # the close handshake is clean every time
        async with transport.open_publisher(params) as publisher:
            await publisher.publish(b"over tls", routing_key=queue)
    assert (await admin.queue_declare(queue, passive=True)).message_count == 3
    await admin.queue_delete(queue)


@over_transports
async def test_an_idle_connection_keeps_its_heartbeats(
    transport: Any, private_node: Any, admin: Any, unique_name: str
) -> None:
    """The broker closes a client silent for two 1 s heartbeats; ours is not."""
    queue = await _fresh(admin, unique_name)
    params = attrs.evolve(parse_url(private_node.url), heartbeat=1)
    async with transport.open_publisher(params) as publisher:
        await anyio.sleep(3.5)  # the workload: idle for 3.5 heartbeat intervals
        await publisher.publish(b"still here", routing_key=queue)
    await admin.queue_delete(queue)


@over_transports
async def test_publish_waits_while_the_broker_blocks_the_connection(
    transport: Any, destructive_node: Any, admin: Any, unique_name: str
) -> None:
    queue = await _fresh(admin, unique_name)
    async with transport.open_publisher(parse_url(destructive_node.url)) as publisher:
        await publisher.publish(b"before", routing_key=queue)
        await anyio.to_thread.run_sync(destructive_node.set_memory_alarm)
        try:
            confirmation = publisher.start_publish(b"while blocked", routing_key=queue)
            with anyio.move_on_after(1) as waited:
                await confirmation.wait()
            assert waited.cancelled_caught  # held back while the alarm is on
        finally:
            await anyio.to_thread.run_sync(destructive_node.clear_memory_alarm)
        with anyio.fail_after(WAIT):
            await confirmation.wait()
    bodies = []
    while (got := await admin.basic_get(queue, no_ack=True)) is not None:
        bodies.append(got.body)
    assert bodies == [b"before", b"while blocked"]
    await admin.queue_delete(queue)


@on_asyncio
async def test_aiormq_gives_a_publish_without_message_id_one(
    private_node: Any, admin: Any, unique_name: str
) -> None:
    """A documented difference: aiormq matches returns by ``message_id``, so it
    sets a random one on a publish that has none (the native transport sends
    the properties as given)."""
    queue = await _fresh(admin, unique_name)
    for transport in (NativeTransport(), AiormqTransport()):
        async with transport.open_publisher(parse_url(private_node.url)) as publisher:
            await publisher.publish(b"no id", routing_key=queue)
    native, aiormq = [await admin.basic_get(queue, no_ack=True) for _ in range(2)]
    assert native is not None and native.properties.message_id is None
    assert aiormq is not None and len(aiormq.properties.message_id or "") == 32
    await admin.queue_delete(queue)


# -- aiormq's own tasks and backend -------------------------------------------------


def _tasks() -> set[asyncio.Task[Any]]:
    return set(asyncio.all_tasks()) - {asyncio.current_task()}  # type: ignore[arg-type]


@on_asyncio
async def test_no_aiormq_task_outlives_a_session_even_after_a_cut(
    private_node: Any, admin: Any, unique_name: str
) -> None:
    aiormq = AiormqTransport()
    queue = await _fresh(admin, unique_name)
    before = _tasks()
    await _publish_ids(admin, queue, 20)
    async with aiormq.open_session(_session_spec(private_node.url, queue)) as one:
        for _ in range(10):  # one aiormq task per delivery, plus its readers
            await one.ack((await one.deliveries.receive()).delivery_tag)
        assert len(_tasks() - before) >= 4
    assert _tasks() - before == set()
    async with aiormq.open_publisher(parse_url(private_node.url)) as publisher:
        await publisher.publish(b"x", routing_key=queue)
    assert _tasks() - before == set()
    with pytest.raises(ConnectionLost) as lost:
        spec = _session_spec(private_node.url, queue, connection_name=unique_name)
        async with aiormq.open_session(spec) as two:
            await two.deliveries.receive()
            closed = await anyio.to_thread.run_sync(
                cut_connections, private_node, unique_name, 1
            )
            assert closed == 1
            with anyio.fail_after(WAIT):
                await anyio.sleep_forever()
    assert lost.value.reply_code == 320
    assert _tasks() - before == set()
    with anyio.CancelScope() as scope:  # cancelled from outside, mid-session
        async with aiormq.open_session(_session_spec(private_node.url, queue)):
            scope.cancel()
            await anyio.sleep_forever()
    assert _tasks() - before == set()
    await admin.queue_delete(queue)


@pytest.fixture
def built_outside_async() -> AiormqTransport:
    """Built in synchronous code: it cannot know the event loop yet."""
    return AiormqTransport()


@pytest.mark.parametrize("anyio_backend", ["trio"], scope="module")
async def test_on_trio_the_aiormq_transport_refuses_clearly(
    private_node: Any, built_outside_async: AiormqTransport
) -> None:
    with pytest.raises(AsyncioOnly, match="asyncio only"):
        AiormqTransport()  # inside trio: at construction
    spec = _session_spec(private_node.url, "never-declared")
    with pytest.raises(AsyncioOnly, match="runs on trio"):
        async with built_outside_async.open_session(spec):
            pass
    with pytest.raises(AsyncioOnly):
        async with built_outside_async.open_publisher(spec.parameters):
            pass
