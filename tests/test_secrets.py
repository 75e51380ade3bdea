"""Reliability row S2 (docs/reliability.md): a password never shows.

A marker password (with characters that must be percent-encoded) is given in the
URL and in ``failover_urls``. It is searched for, in every form, in:

- the log records at DEBUG (root and ``amqp_batch`` loggers), formatted with their
  tracebacks, through a full consume with REQUEUEs (so the republish connection
  opens too), a reconnect that rotates to a dead failover URL (a failed connect)
  and back, a ``Publisher``, and failed connects (bad password, unknown vhost,
  refused port);
- ``repr`` and ``str`` of every public object of ``amqp_batch`` and
  ``amqp_batch.testing`` (the test fails when a new public name is not covered);
- the text and the formatted traceback (chained causes and exception groups
  included) of every exception raised for an authentication failure, a refused
  connection, an unknown vhost and a malformed URL.

It must appear nowhere.
"""

from __future__ import annotations

import logging
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from tests.support.invariant import Recorder, check, publish_numbered
from tests.support.rabbit_node import PrivateNode
from tests.support.transports import make_transport, over_transports

import amqp_batch
import amqp_batch.testing
from amqp_batch import (
    AuthenticationError,
    BatchConsumer,
    BatchConsumerSettings,
    ConnectionRefused,
    Consumer,
    ConsumerSettings,
    Message,
    MessageResult,
    Publisher,
    UnknownVirtualHost,
    batch_consumer,
    parse_url,
)
from amqp_batch.testing import (
    BindingSpec,
    ExchangeSpec,
    MemoryBroker,
    Properties,
    QueueSpec,
    SessionSpec,
)
from consumer_support import cleanup, unique_name

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = [pytest.mark.anyio]

#: The part searched for: every form of both passwords contains it.
MARKER = "S2mark3rPW"
PASSWORD = f"{MARKER}/p@ss:w%rd?#&="
WRONG_PASSWORD = f"{MARKER}-wrong"
USER = "amqpbatch-s2-user"


def _url(port: int, password: str = PASSWORD, vhost: str = "", user: str = USER) -> str:
    return f"amqp://{user}:{quote(password, safe='')}@127.0.0.1:{port}/{vhost}"


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _leaks(texts: Sequence[str]) -> list[str]:
    return [text for text in texts if MARKER in text]


def _exception_texts(exc: BaseException) -> list[str]:
    """str, repr and the full formatted traceback (causes, contexts, groups)."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for attribute in ("reply_text", "args"):
        texts.append(repr(getattr(exc, attribute, None)))
    return texts


@pytest.fixture(scope="module")
def s2_user(private_node: PrivateNode) -> Iterator[str]:
    """A broker user whose password is the marker password."""
    private_node.add_user(USER, PASSWORD)
    yield USER
    private_node.ctl("delete_user", USER)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="amqp_batch")
    return caplog


def _log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = [caplog.text]
    for record in caplog.records:
        texts += [record.getMessage(), formatter.format(record), repr(record.args)]
    return texts


@over_transports
async def test_s2_never_in_debug_logs_or_errors(
    private_node: PrivateNode,
    s2_user: str,
    debug_logs: pytest.LogCaptureFixture,
    figures: Any,
    transport_kind: str,
) -> None:
    # Each consumer and publisher gets a fresh transport of the row's kind: on
    # aiormq, aiormq's own DEBUG logs are searched too.
    def transport() -> Any:
        return make_transport(transport_kind)

    port, dead = private_node.amqp_port, _dead_port()
    queue = unique_name("s2")
    recorder = Recorder(
        lambda m: (
            MessageResult.REQUEUE
            if m.retry_count == 0 and int(m.message_id or 0) % 2
            else MessageResult.ACK
        )
    )
    settings = BatchConsumerSettings(
        # The dead URL first: every start (and every reconnect once its failure
        # is older than reconnect_backoff_cap) is a failed connect naming it.
        url=_url(dead),
        failover_urls=(_url(port),),
        queue_name=queue,
        prefetch_count=20,
        batch_size=5,
        batch_timeout=0.05,
        connection_name=queue,
        reconnect_backoff_base=0.01,
        reconnect_backoff_cap=0.05,
    )
    texts: list[str] = [repr(settings), str(settings)]
    errors: dict[str, BaseException] = {}
    try:
        with anyio.fail_after(30):
            # A full consume, with republishes.
            async with batch_consumer(
                settings, recorder.handler, transport=transport()
            ) as consumer:
                confirmed = await publish_numbered(private_node.url, queue, 10)
                await recorder.wait_decided(confirmed, timeout=10)
                # Decided is not yet settled on the broker: wait until it holds
                # no unacknowledged message, so the cut finds no ack in flight.
                while await anyio.to_thread.run_sync(  # noqa: ASYNC110 - polling the broker
                    private_node.queue_counts, queue
                ) != (0, 0):
                    await anyio.sleep(0.01)
                # A reconnect: tries the dead primary URL again (a failed
                # connect), then the working one.
                await anyio.to_thread.run_sync(
                    private_node.close_connection, f"{queue}-w0"
                )
                with anyio.fail_after(10):
                    while not (  # noqa: ASYNC110 - health() is a snapshot API
                        consumer.health()[0].reconnect_count >= 2
                        and consumer.is_healthy
                    ):
                        await anyio.sleep(0.01)
                more = await publish_numbered(private_node.url, queue, 10, start=10)
                await recorder.wait_decided(more, timeout=10)
                health = consumer.health()
                texts += [repr(consumer), str(consumer), repr(health), str(health)]
            assert health[0].last_error is not None
            texts.append(health[0].last_error)
            report = await check(
                private_node.url, queue, None, recorder, confirmed + more
            )
            report.assert_holds()
            # A Publisher with the same URL.
            async with Publisher(_url(port), transport=transport()) as publisher:
                await publisher.publish(b"x", routing_key=queue)
                texts += [repr(publisher), str(publisher)]
            # Failed connects.
            for name, url in (
                ("auth", _url(port, password=WRONG_PASSWORD)),
                ("vhost", _url(port, vhost="amqp-batch-s2-no-such-vhost")),
            ):
                bad = BatchConsumerSettings(url=url, queue_name=queue)
                texts += [repr(bad), str(bad)]
                try:
                    async with batch_consumer(
                        bad, recorder.handler, transport=transport()
                    ):
                        pytest.fail("must not connect")
                except (AuthenticationError, UnknownVirtualHost) as exc:
                    errors[name] = exc
                # Through serve() in a task group: the error in an exception group.
                try:
                    async with anyio.create_task_group() as group:
                        group.start_soon(
                            BatchConsumer(bad, transport=transport()).serve
                        )
                except BaseExceptionGroup as exc:
                    errors[f"{name}-group"] = exc
            try:
                async with Publisher(_url(dead), transport=transport()):
                    pytest.fail("must not connect")
            except ConnectionRefused as exc:
                errors["refused"] = exc
            for name, url in (
                ("url-unencoded-slash", f"amqp://u:{MARKER}/x@127.0.0.1:{port}/"),
                ("url-unencoded-hash", f"amqp://u:{MARKER}#x@127.0.0.1:{port}/"),
                ("url-unencoded-query", f"amqp://u:{MARKER}?x@127.0.0.1:{port}/"),
                ("url-port-digits", f"amqp://u:1234/{MARKER}@127.0.0.1/"),
            ):
                try:
                    BatchConsumerSettings(url=url, queue_name=queue)
                    pytest.fail(f"{name}: must be refused")
                except ValueError as exc:
                    errors[name] = exc
    finally:
        await cleanup(private_node.url, queues=[queue])
    assert isinstance(errors["auth"], AuthenticationError)
    assert isinstance(errors["vhost"], UnknownVirtualHost)
    for error in errors.values():
        texts += _exception_texts(error)
    log_texts = _log_texts(debug_logs)
    assert any("reconnecting" in t for t in log_texts)  # the reconnect was logged
    assert any(r.levelno == logging.DEBUG for r in debug_logs.records)
    assert _leaks(texts) == []
    assert _leaks(log_texts) == []
    figures.record(
        "S2",
        texts_checked=len(texts),
        log_records=len(debug_logs.records),
        errors=sorted(errors),
        hits=0,
    )


# ------------------------------------------------------------ public objects


class _Batch(BatchConsumer[BatchConsumerSettings]):
    async def process_messages(  # type: ignore[override]
        self, messages: Sequence[Message]
    ) -> AsyncIterator[MessageResult]:
        for _ in messages:
            yield MessageResult.ACK


class _Single(Consumer[ConsumerSettings]):
    async def process_message(self, message: Message) -> MessageResult:
        return MessageResult.ACK


async def _public_objects(url: str) -> dict[str, list[Any]]:
    """One or more objects per public name, built with the marker URL."""
    settings = BatchConsumerSettings(url=url, failover_urls=(url, url), queue_name="q")
    single = ConsumerSettings(url=url, failover_urls=url, queue_name="q")
    parameters = parse_url(url)
    spec = SessionSpec(parameters=parameters, queue="q", prefetch_count=10)
    broker = MemoryBroker()
    objects: dict[str, list[Any]] = {
        "BatchConsumerSettings": [settings],
        "ConsumerSettings": [single],
        "ConnectionParameters": [parameters, settings.connection_parameters(1)],
        "parse_url": [parse_url, parameters],
        "BatchConsumer": [_Batch(settings)],
        "Consumer": [_Single(single)],
        "Publisher": [Publisher(url), Publisher.from_settings(settings)],
        "SessionSpec": [spec],
        "MemoryBroker": [broker],
        "Properties": [Properties(headers={"h": 1})],
        "ExchangeSpec": [ExchangeSpec(name="x")],
        "QueueSpec": [QueueSpec(name="q")],
        "BindingSpec": [BindingSpec(queue="q", exchange="x")],
    }
    consuming = anyio.Event()

    async def handle(messages: Sequence[Message]) -> AsyncIterator[MessageResult]:
        objects["Message"] = [messages[0]]
        objects["Delivery"] = [messages[0].delivery]
        consuming.set()
        for _ in messages:
            yield MessageResult.ACK

    batch = BatchConsumerSettings(
        url=url, failover_urls=(url,), queue_name="q", batch_timeout=0.01
    )
    async with batch_consumer(batch, handle, transport=broker) as consumer:
        await broker.publish(b"m", routing_key="q")
        await consumer_wait(consuming)
        health = consumer.health()
        objects["batch_consumer"] = [batch_consumer, consumer]
        objects["WorkerHealth"] = list(health)
        objects["WorkerState"] = [h.state for h in health]
        async with broker.open_session(spec) as session:
            objects["MemorySession"] = [session]
        async with broker.open_publisher(parameters) as publisher:
            await publisher.publish(b"p", routing_key="q", properties=Properties())
            objects["MemoryPublisher"] = [publisher]
    await broker.publish(b"kept", routing_key="q")
    objects["BrokerMessage"] = broker.queue_messages("q")
    objects["Published"] = list(broker.published)
    objects["MessageResult"] = list(MessageResult)
    return objects


async def consumer_wait(event: anyio.Event) -> None:
    """Wait for ``event``, briefly."""
    with anyio.fail_after(5):
        await event.wait()


async def test_s2_never_in_repr_or_str_of_public_objects(figures: Any) -> None:
    url = _url(5672)
    assert _leaks([url])  # the marker survives percent-encoding
    objects = await _public_objects(url)
    assert all(objects.values()), [k for k, v in objects.items() if not v]
    # Names that hold no configuration: the constants, the version, the handler
    # type and the exception classes (exception instances are checked above).
    # Names that hold no configuration: constants, types, hook bases and the
    # values hooks receive (a batch's messages, a settlement).
    plain: set[str] = {
        "RETRY_COUNT_HEADER",
        "__version__",
        "BatchHandler",
        "ConsumerHooks",
        "BatchInfo",
        "HandledBatch",
        "Settlement",
        "SettleOutcome",
        "JSONFormatter",
        "Decoder",
        "json_decoder",
        "msgspec_decoder",
        "pydantic_decoder",
        "make_message",
        "run_handler",
        # Holds no URL or credentials: they come with each session's parameters
        # (and it cannot be built under trio, where this test also runs).
        "AiormqTransport",
    }
    public = {
        name
        for module in (amqp_batch, amqp_batch.testing)
        for name in module.__all__
        if not (
            isinstance(getattr(module, name), type)
            and issubclass(getattr(module, name), BaseException)
        )
    }
    assert public - plain <= set(objects), f"not covered: {public - set(objects)}"
    texts: list[str] = []
    for values in objects.values():
        for value in values:
            texts += [repr(value), str(value)]
    for name in plain:
        module = amqp_batch if hasattr(amqp_batch, name) else amqp_batch.testing
        texts.append(repr(getattr(module, name)))
    assert _leaks(texts) == []
    figures.record("S2", objects_checked=sum(map(len, objects.values())), hits=0)
