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

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amqp_batch import (
    AiormqTransport,
    ConnectionLost,
)
from amqp_batch._transport._base import Properties, SessionSpec
from amqp_batch._transport._native import NativeTransport
from amqp_batch._transport._url import parse_url
from consumer_support import admin_channel

pytestmark = pytest.mark.anyio
on_asyncio = pytest.mark.parametrize("anyio_backend", ["asyncio"], scope="module")

PREFETCH = 64  # larger than any script's message count: the window never limits
WAIT = 15.0


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


def cut_connections(node: Any, connection_name: str) -> int:
    """The broker closes (320 CONNECTION_FORCED) every connection named
    ``connection_name``; how many. One ``rabbitmqctl eval`` (``close_connection``
    of the node helper takes several ``rabbitmqctl`` calls, seconds each here)."""
    name = connection_name.replace("\\", "").replace('"', "")
    found = node.eval(
        "Pids = [P || P <- rabbit_networking:connections(), "
        "case rabbit_networking:connection_info(P, [client_properties]) of "
        "[{client_properties, Props}] -> "
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
            cut_connections, self.node, self.connection_name
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
