"""The consumer API's public names exist, with the documented types and shapes."""

from __future__ import annotations

import datetime
import inspect
import typing
from collections.abc import Mapping

import attrs
import pytest

import amqp_batch
from amqp_batch import (
    BatchConsumer,
    BatchConsumerSettings,
    Consumer,
    ConsumerSettings,
    Message,
    MessageResult,
    Publisher,
    WorkerHealth,
    WorkerState,
    batch_consumer,
)
from amqp_batch._transport._base import Delivery, Properties

PUBLIC_NAMES = [
    "MessageResult",
    "Message",
    "BatchConsumerSettings",
    "ConsumerSettings",
    "batch_consumer",
    "BatchConsumer",
    "Consumer",
    "Publisher",
    "WorkerHealth",
    "WorkerState",
    "AMQPBatchError",
    "TransportError",
    "ConnectionLost",
    "AuthenticationError",
    "UnknownVirtualHost",
    "ChannelClosed",
    "ConsumerCancelled",
    "MessageNacked",
    "MessageReturned",
    "ProtocolError",
    "RETRY_COUNT_HEADER",
    "__version__",
]


def test_public_names_are_importable() -> None:
    missing = [name for name in PUBLIC_NAMES if not hasattr(amqp_batch, name)]
    assert missing == []
    assert amqp_batch.RETRY_COUNT_HEADER == "x-retry-count"
    assert set(PUBLIC_NAMES) <= set(amqp_batch.__all__)
    assert all(hasattr(amqp_batch, name) for name in amqp_batch.__all__)


def test_message_result_members() -> None:
    assert [r.name for r in MessageResult] == [
        "ACK",
        "NACK",
        "REQUEUE",
        "REQUEUE_IMMEDIATE",
    ]


def test_message_exposes_every_delivery_field_read_only() -> None:
    stamp = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    delivery = Delivery(
        delivery_tag=7,
        redelivered=True,
        exchange="orders",
        routing_key="orders.created",
        consumer_tag="ctag",
        body=b"{}",
        properties=Properties(
            content_type="application/json",
            content_encoding="utf-8",
            headers={"x-retry-count": 2, "tenant": "a"},
            delivery_mode=2,
            priority=5,
            correlation_id="corr",
            reply_to="replies",
            expiration="60000",
            message_id="m-1",
            timestamp=stamp,
            type="order.created",
            app_id="shop",
        ),
    )
    message = Message(delivery, retry_count=2)
    expected: dict[str, object] = {
        "body": b"{}",
        "message_id": "m-1",
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "correlation_id": "corr",
        "priority": 5,
        "timestamp": stamp,
        "type": "order.created",
        "app_id": "shop",
        "reply_to": "replies",
        "expiration": "60000",
        "delivery_mode": 2,
        "exchange": "orders",
        "routing_key": "orders.created",
        "redelivered": True,
        "retry_count": 2,
        "delivery_tag": 7,
    }
    assert {name: getattr(message, name) for name in expected} == expected
    assert isinstance(message.headers, Mapping)
    assert dict(message.headers) == {"x-retry-count": 2, "tenant": "a"}
    with pytest.raises(TypeError):
        message.headers["tenant"] = "b"  # type: ignore[index]
    for name in [*expected, "headers"]:
        with pytest.raises(AttributeError):
            setattr(message, name, None)
    # A message without properties: empty headers, None properties.
    bare = Message(attrs.evolve(delivery, properties=Properties()))
    assert dict(bare.headers) == {}
    assert (bare.message_id, bare.retry_count) == (None, 0)


def test_settings_fields_and_defaults() -> None:
    names = {field.name for field in attrs.fields(BatchConsumerSettings)}
    assert names >= {
        "url",
        "queue_name",
        "exchange_name",
        "exchange_type",
        "routing_key",
        "prefetch_count",
        "num_workers",
        "batch_size",
        "batch_timeout",
        "max_requeue_attempts",
        "unhandled_exception_action",
        "queue_durable",
        "exchange_durable",
        "queue_arguments",
        "shutdown_timeout",
        "heartbeat",
        "reconnect_backoff_base",
        "reconnect_backoff_cap",
        "max_concurrent_batches",
        "dead_letter_exchange",
        "dead_letter_queue",
        "failover_urls",
        "ssl_context",
    }
    settings = BatchConsumerSettings(queue_name="q")
    assert settings.max_concurrent_batches == 1
    assert settings.failover_urls == ()
    assert settings.ssl_context is None
    assert attrs.has(ConsumerSettings)
    assert issubclass(BatchConsumerSettings, ConsumerSettings)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.batch_size = 3  # type: ignore[misc]
    assert inspect.signature(ConsumerSettings.from_env).parameters[
        "prefix"
    ].default == ("AMQP_BATCH_")


def test_consumer_classes_and_health_shapes() -> None:
    for name in ["run", "serve", "stop", "start", "on_start", "on_stop", "health"]:
        assert inspect.iscoroutinefunction(getattr(BatchConsumer, name)) == (
            name != "health"
        ), name
    assert inspect.isasyncgenfunction(Consumer.process_messages)
    assert inspect.iscoroutinefunction(Consumer.process_message)
    assert isinstance(BatchConsumer.is_running, property)
    assert isinstance(BatchConsumer.is_healthy, property)
    assert hasattr(BatchConsumer, "__aenter__")
    # An async context manager factory.
    assert inspect.isasyncgenfunction(batch_consumer.__wrapped__)  # type: ignore[attr-defined]
    assert [s.value for s in WorkerState] == [
        "connecting",
        "consuming",
        "backing_off",
        "paused",
        "stopping",
        "stopped",
    ]
    hints = typing.get_type_hints(WorkerHealth)
    assert {"state", "reconnect_count", "last_error", "results"} <= set(hints)
    serve = inspect.signature(BatchConsumer.serve).parameters["task_status"]
    assert serve.kind is inspect.Parameter.KEYWORD_ONLY


def test_publisher_publish_signature() -> None:
    parameters = inspect.signature(Publisher.publish).parameters
    assert list(parameters)[:2] == ["self", "body"]
    for name in ["exchange", "routing_key", "headers", "message_id", "mandatory"]:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert inspect.iscoroutinefunction(Publisher.publish)
    assert hasattr(Publisher, "__aenter__")
