"""Typed message bodies: decoders, the decode step before the handler (against a
real RabbitMQ, on asyncio and trio), and the handler unit-test helpers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import attrs
import msgspec
import pydantic
import pytest

from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Message,
    MessageResult,
    UnsupportedContentType,
    batch_consumer,
    json_decoder,
    msgspec_decoder,
    pydantic_decoder,
)
from amqp_batch._bodies import DECODE_ERROR_CLASS_HEADER, decode_batch
from amqp_batch._transport._base import Properties
from amqp_batch.testing import make_message, run_handler
from consumer_support import admin_channel, cleanup, take, unique_name

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: int
    item: str


class OrderModel(pydantic.BaseModel):
    id: int
    item: str


#: (message id, body): two good orders, one that is not JSON, one of the wrong shape.
BODIES = [
    ("good-1", b'{"id": 1, "item": "tea"}'),
    ("not-json", b"{not json"),
    ("good-2", b'{"id": 2, "item": "cake"}'),
    ("wrong-shape", b'{"id": "three"}'),
]


@pytest.fixture
async def queues(broker_url: str) -> AsyncIterator[tuple[str, str, str]]:
    queue, dlx, dlq = unique_name("bodies"), unique_name("dlx"), unique_name("dlq")
    yield queue, dlx, dlq
    await cleanup(broker_url, queues=[queue, dlq], exchanges=[dlx])


def _settings(url: str, queue: str, dlx: str, dlq: str) -> BatchConsumerSettings:
    return BatchConsumerSettings(
        url=url,
        queue_name=queue,
        dead_letter_exchange=dlx,
        dead_letter_queue=dlq,
        batch_size=len(BODIES),
        batch_timeout=5.0,
        shutdown_timeout=10.0,
        connection_name=queue,
    )


async def _publish(url: str, queue: str) -> None:
    async with admin_channel(url) as channel:
        for message_id, body in BODIES:
            await channel.publish(
                body,
                routing_key=queue,
                properties=Properties(
                    message_id=message_id, content_type="application/json"
                ),
            )


async def _assert_dead_letters(url: str, dlq: str, queue: str) -> None:
    dead = {d.properties.message_id: d for d in await take(url, dlq, 2)}
    assert set(dead) == {"not-json", "wrong-shape"}
    for delivery in dead.values():
        headers = delivery.properties.headers or {}
        assert headers["x-dead-letter-reason"] == "decode-error"
        assert headers["x-original-routing-key"] == queue
    assert dead["not-json"].properties.headers[DECODE_ERROR_CLASS_HEADER] == (
        "msgspec.DecodeError"
    )
    assert dead["wrong-shape"].properties.headers[DECODE_ERROR_CLASS_HEADER] == (
        "msgspec.ValidationError"
    )
    assert await take(url, queue, 0) == []


async def test_bad_bodies_are_dead_lettered_the_rest_reach_the_handler_typed(
    broker_url: str, queues: tuple[str, str, str]
) -> None:
    queue, dlx, dlq = queues
    seen: list[Order] = []
    done = anyio.Event()

    async def handle(
        messages: Sequence[Message[Order]],
    ) -> AsyncIterator[MessageResult]:
        for message in messages:
            seen.append(message.value)
            yield MessageResult.ACK
        done.set()

    settings = _settings(broker_url, queue, dlx, dlq)
    async with batch_consumer(
        settings, handle, decoder=msgspec_decoder(Order)
    ) as consumer:
        await _publish(broker_url, queue)
        with anyio.fail_after(20):
            await done.wait()
    assert seen == [Order(1, "tea"), Order(2, "cake")]
    [health] = consumer.health()
    assert health.results["decode_error"] == 2
    assert health.results["dead_lettered"] == 2
    assert health.results["ack"] == 2
    await _assert_dead_letters(broker_url, dlq, queue)


class Orders(BatchConsumer[BatchConsumerSettings]):
    """The subclass style: the decoder is a class attribute."""

    decoder = pydantic_decoder(OrderModel)

    def __init__(self, settings: BatchConsumerSettings) -> None:
        super().__init__(settings)
        self.items: list[str] = []
        self.done = anyio.Event()

    async def process_messages(
        self, messages: Sequence[Message[OrderModel]]
    ) -> AsyncIterator[MessageResult]:
        for message in messages:
            self.items.append(message.value.item)
            yield MessageResult.ACK
        self.done.set()


async def test_a_subclass_declares_its_decoder(
    broker_url: str, queues: tuple[str, str, str]
) -> None:
    queue, dlx, dlq = queues
    consumer = Orders(_settings(broker_url, queue, dlx, dlq))
    async with consumer:
        await _publish(broker_url, queue)
        with anyio.fail_after(20):
            await consumer.done.wait()
    assert consumer.items == ["tea", "cake"]
    dead = await take(broker_url, dlq, 2)
    classes = sorted(d.properties.headers[DECODE_ERROR_CLASS_HEADER] for d in dead)
    assert classes == ["pydantic_core._pydantic_core.ValidationError"] * 2
    assert consumer.health()[0].results["decode_error"] == 2


async def test_a_batch_that_is_all_bad_never_calls_the_handler(
    broker_url: str, queues: tuple[str, str, str]
) -> None:
    queue, dlx, dlq = queues
    calls: list[int] = []

    async def handle(messages: Sequence[Message[Any]]) -> list[MessageResult]:
        calls.append(len(messages))
        return [MessageResult.ACK] * len(messages)

    settings = attrs.evolve(_settings(broker_url, queue, dlx, dlq), batch_timeout=0.2)
    async with batch_consumer(settings, handle, decoder=json_decoder()):
        async with admin_channel(broker_url) as channel:
            for body in (b"nope", b"{"):
                await channel.publish(body, routing_key=queue)
        dead = await take(broker_url, dlq, 2)
    assert calls == []
    assert {d.properties.headers[DECODE_ERROR_CLASS_HEADER] for d in dead} == {
        "json.decoder.JSONDecodeError"
    }


# -- decoders on their own ------------------------------------------------------------


def test_json_decoder_parses_and_converts() -> None:
    assert json_decoder()(b'{"a": [1, 2]}', None) == {"a": [1, 2]}
    into = json_decoder(lambda d: Order(**d))
    assert into(b'{"id": 7, "item": "x"}', "application/json") == Order(7, "x")
    assert json_decoder()(b"3", "application/vnd.shop+json; charset=utf-8") == 3
    with pytest.raises(json.JSONDecodeError):
        json_decoder()(b"{", None)


@pytest.mark.parametrize(
    "decoder",
    [json_decoder(), msgspec_decoder(Order), pydantic_decoder(OrderModel)],
    ids=["json", "msgspec", "pydantic"],
)
def test_json_decoders_refuse_other_content_types(decoder: Any) -> None:
    with pytest.raises(UnsupportedContentType, match="text/plain"):
        decoder(b'{"id": 1, "item": "x"}', "text/plain")


def test_without_a_decoder_value_is_not_there() -> None:
    message = make_message(b"raw")
    with pytest.raises(LookupError, match="decoder"):
        message.value  # noqa: B018 - the property raises
    decoded, failed = decode_batch([message], None)
    assert decoded == [message] and failed == []


# -- handler unit-test helpers ----------------------------------------------------


def test_make_message_carries_headers_properties_and_the_retry_count() -> None:
    message = make_message(
        b'{"id": 1, "item": "tea"}',
        headers={"x-retry-count": 2, "tenant": "a"},
        content_type="application/json",
        message_id="m-1",
        routing_key="orders.created",
        decoder=msgspec_decoder(Order),
    )
    assert message.value == Order(1, "tea")
    assert message.retry_count == 2
    assert message.headers["tenant"] == "a"
    assert (message.message_id, message.routing_key) == ("m-1", "orders.created")
    with pytest.raises(TypeError, match="colour"):
        make_message(b"", colour="red")


async def test_run_handler_applies_the_consumers_rules() -> None:
    async def handle(
        messages: Sequence[Message[Order]],
    ) -> AsyncIterator[MessageResult]:
        for message in messages:
            if message.value.item == "stop":
                raise RuntimeError("boom")
            yield MessageResult.ACK

    decoder = msgspec_decoder(Order)
    messages = [
        make_message(b'{"id": %d, "item": "%s"}' % (i, item), decoder=decoder)
        for i, item in enumerate([b"a", b"stop", b"c"])
    ]
    assert await run_handler(handle, messages) == [
        MessageResult.ACK,
        MessageResult.REQUEUE,  # the default unhandled_exception_action
        MessageResult.REQUEUE,
    ]
    assert await run_handler(handle, messages, fallback=MessageResult.NACK) == [
        MessageResult.ACK,
        MessageResult.NACK,
        MessageResult.NACK,
    ]
