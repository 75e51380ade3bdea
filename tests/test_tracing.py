"""TracingHooks: one CONSUMER span per batch with one link per message to its
producer, current while the handler runs; untrusted trace headers tolerated."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from amqp_batch import MessageResult
from amqp_batch._hooks import BatchInfo, HandledBatch, HookDispatcher
from amqp_batch._message import Message
from amqp_batch._transport._base import Delivery, Properties
from amqp_batch.tracing import TracingHooks, extract_link, inject_trace_headers

TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(trace_id: str, span_id: str = "b7ad6b7169203331") -> str:
    return f"00-{trace_id}-{span_id}-01"


def message(
    tag: int, headers: Mapping[str, Any] | None = None, routing_key: str = "orders"
) -> Message:
    return Message(
        Delivery(
            delivery_tag=tag,
            redelivered=False,
            exchange="",
            routing_key=routing_key,
            consumer_tag="c",
            body=b"x",
            properties=Properties(headers=headers, message_id=str(tag)),
        )
    )


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1
    return spans[0]


def test_one_consumer_span_per_batch_with_a_link_per_message(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hooks = TracingHooks(provider)
    messages = [
        message(1, {"traceparent": traceparent(TRACE_A)}),
        message(2, {"traceparent": traceparent(TRACE_B).encode()}),  # bytes
        message(3, {"traceparent": traceparent(TRACE_A, "00f067aa0ba902b7")}),
    ]
    batch = BatchInfo(worker=1, queue="orders", messages=messages)
    hooks.batch_started(batch)
    hooks.batch_handled(HandledBatch(batch, [MessageResult.ACK] * 3, 0.01, None))
    span = only_span(exporter)
    assert span.name == "orders process"
    assert span.kind is SpanKind.CONSUMER
    assert span.status.status_code is StatusCode.UNSET
    assert [format(link.context.trace_id, "032x") for link in span.links] == [
        TRACE_A,
        TRACE_B,
        TRACE_A,
    ]
    assert all(link.context.is_remote for link in span.links)
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.batch.message_count": 3,
        "messaging.rabbitmq.destination.routing_key": "orders",
        "amqp_batch.worker": 1,
    }


def test_single_message_attributes(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hooks = TracingHooks(provider)
    batch = BatchInfo(worker=0, queue="orders", messages=[message(7)])
    hooks.batch_started(batch)
    hooks.batch_handled(HandledBatch(batch, [MessageResult.ACK], 0.01, None))
    attributes = only_span(exporter).attributes or {}
    assert attributes["messaging.message.id"] == "7"
    assert only_span(exporter).links == ()


def test_mixed_routing_keys_have_no_routing_key_attribute(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hooks = TracingHooks(provider)
    messages = [message(1, routing_key="a"), message(2, routing_key="b")]
    batch = BatchInfo(worker=0, queue="orders", messages=messages)
    hooks.batch_started(batch)
    hooks.batch_handled(HandledBatch(batch, [MessageResult.ACK] * 2, 0.01, None))
    attributes = only_span(exporter).attributes or {}
    assert "messaging.rabbitmq.destination.routing_key" not in attributes


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"traceparent": "garbage"},
        {"traceparent": b"\xff\xfe not ascii"},
        {"traceparent": 42},
        {"traceparent": ["00", TRACE_A]},
        {"traceparent": traceparent("0" * 32)},  # all-zero trace id: invalid
        {"traceparent": "00-" + "a" * 5000},
        {"traceparent": traceparent(TRACE_A) + "-" + "x" * 2000},
        {"tracestate": "a=b"},  # a state without a parent
        {"traceparent": None, "tracestate": b"\x00"},
    ],
)
def test_untrusted_trace_headers_give_no_link(
    headers: Mapping[str, Any] | None,
) -> None:
    assert extract_link(headers) is None


def test_tracestate_is_carried(provider: TracerProvider) -> None:
    link = extract_link(
        {"traceparent": traceparent(TRACE_A), "tracestate": b"vendor=value"}
    )
    assert link is not None
    assert link.context.trace_state.get("vendor") == "value"


def test_handler_errors_set_the_error_status(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hooks = TracingHooks(provider)
    batch = BatchInfo(worker=0, queue="orders", messages=[message(1)])
    hooks.batch_started(batch)
    hooks.batch_handled(
        HandledBatch(batch, [MessageResult.NACK], 0.01, ValueError("bad"))
    )
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError"
    assert [event.name for event in span.events] == ["exception"]


async def test_the_span_is_current_while_the_handler_runs(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Spans the handler starts, across awaits and in tasks it starts, are
    children of the batch's span; after the batch nothing is current."""
    hooks = TracingHooks(provider)
    dispatcher = HookDispatcher([hooks])
    assert dispatcher.batch_started is not None
    assert dispatcher.batch_handled is not None
    tracer = provider.get_tracer("handler")
    batch = BatchInfo(
        worker=0,
        queue="orders",
        messages=[message(1, {"traceparent": traceparent(TRACE_A)})],
    )

    async def step(name: str) -> None:
        await anyio.lowlevel.checkpoint()
        with tracer.start_as_current_span(name):
            await anyio.lowlevel.checkpoint()

    before = trace.get_current_span()
    dispatcher.batch_started(batch)
    await step("in-handler")
    async with anyio.create_task_group() as group:
        group.start_soon(step, "in-child-task")
    dispatcher.batch_handled(HandledBatch(batch, [MessageResult.ACK], 0.01, None))
    assert trace.get_current_span() is before
    spans = {span.name: span for span in exporter.get_finished_spans()}
    batch_span = spans["orders process"]
    for name in ("in-handler", "in-child-task"):
        parent = spans[name].parent
        assert parent is not None
        assert parent.span_id == batch_span.context.span_id
        # The batch span is a root: its producers are links, not parents.
        assert spans[name].context.trace_id == batch_span.context.trace_id
    assert batch_span.parent is None


def test_inject_trace_headers_carries_the_current_span(
    provider: TracerProvider,
) -> None:
    tracer = provider.get_tracer("publisher")
    with tracer.start_as_current_span("publish") as span:
        headers = inject_trace_headers({"x-app": "1"})
    assert headers["x-app"] == "1"
    link = extract_link(headers)
    assert link is not None
    assert link.context.trace_id == span.get_span_context().trace_id
    assert link.context.span_id == span.get_span_context().span_id
    assert inject_trace_headers() == {}  # no current span: nothing to carry
