"""OpenTelemetry tracing for a consumer: ``pip install 'amqp-batch[otel]'``.

Needs only ``opentelemetry-api``; configure the SDK (exporter, sampler) in your
application as usual. :class:`TracingHooks` makes one span per batch,
``"<queue> process"`` of kind ``CONSUMER``, following the OpenTelemetry
messaging semantic conventions. A batch has many producers, so the span does not
pick one as its parent: it carries one **link** per message to the producer's
span context, taken from the message's W3C ``traceparent``/``tracestate``
headers. The span is the current span while the handler runs, so the spans your
handler starts are its children. :func:`inject_trace_headers` adds the current
context to the headers of a message you publish.

Producer headers are untrusted input: only ``str`` or ASCII ``bytes`` values of
a sane length are read, and anything the propagator cannot parse gives no link.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._hooks import BatchInfo, ConsumerHooks, HandledBatch
from ._message import Message
from ._version import __version__

__all__ = ["TracingHooks", "extract_link", "inject_trace_headers"]

#: Headers read from (and written to) messages: W3C trace context.
TRACE_HEADERS = ("traceparent", "tracestate")
#: Longer values are ignored (a traceparent is 55 characters; tracestate is
#: limited to 32 members by the W3C spec).
_MAX_HEADER_LENGTH = 1024

_PROPAGATOR = TraceContextTextMapPropagator()


def _header_text(value: object) -> str | None:
    """``value`` as text if it is a plausible header value, else None."""
    if isinstance(value, bytes):
        if len(value) > _MAX_HEADER_LENGTH:
            return None
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and len(value) <= _MAX_HEADER_LENGTH:
        return value
    return None


def extract_link(headers: Mapping[str, Any] | None) -> Link | None:
    """A link to the producer context in ``headers``; None when there is none
    (or it is not valid W3C trace context)."""
    if not headers:
        return None
    carrier: dict[str, str] = {}
    for name in TRACE_HEADERS:
        text = _header_text(headers.get(name))
        if text is not None:
            carrier[name] = text
    if "traceparent" not in carrier:
        return None
    try:
        extracted = _PROPAGATOR.extract(carrier)
    except Exception:  # a propagator must not fail on garbage; be sure anyway
        return None
    span_context = trace.get_current_span(extracted).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context)


def inject_trace_headers(
    headers: MutableMapping[str, Any] | None = None,
) -> MutableMapping[str, Any]:
    """``headers`` (a new dict if None) with the current span's ``traceparent``
    (and ``tracestate``) added, for :meth:`amqp_batch.Publisher.publish`."""
    carrier: MutableMapping[str, Any] = {} if headers is None else headers
    _PROPAGATOR.inject(carrier)
    return carrier


def _attributes(batch: BatchInfo) -> dict[str, Any]:
    messages = batch.messages
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": batch.queue,
        "messaging.batch.message_count": len(messages),
        "amqp_batch.worker": batch.worker,
    }
    routing_keys = {message.routing_key for message in messages}
    if len(routing_keys) == 1:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_keys.pop()
    if len(messages) == 1 and messages[0].message_id is not None:
        attributes["messaging.message.id"] = messages[0].message_id
    return attributes


def _links(messages: Sequence[Message]) -> list[Link]:
    links = []
    for message in messages:
        headers = message.properties.headers
        # Most messages carry no trace context: no call for them.
        if headers and "traceparent" in headers:
            link = extract_link(headers)
            if link is not None:
                links.append(link)
    return links


class TracingHooks(ConsumerHooks):
    """One OpenTelemetry span per batch, linked to each message's producer.

    ``tracer_provider`` defaults to the global one
    (``opentelemetry.trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(
            "amqp_batch", __version__, tracer_provider=tracer_provider
        )
        #: The open span of each batch in the handler, and the token that
        #: made it current.
        self._open: dict[int, tuple[Span, object]] = {}

    def batch_started(self, batch: BatchInfo) -> None:
        """Start the batch's span and make it current in the handler's task."""
        span = self._tracer.start_span(
            f"{batch.queue} process",
            kind=SpanKind.CONSUMER,
            links=_links(batch.messages),
            attributes=_attributes(batch),
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        self._open[id(batch)] = (span, token)

    def batch_handled(self, handled: HandledBatch) -> None:
        """Detach and end the span; error status if the handler raised."""
        opened = self._open.pop(id(handled.batch), None)
        if opened is None:
            return
        span, token = opened
        otel_context.detach(token)  # type: ignore[arg-type]
        error = handled.error
        if error is not None:
            if isinstance(error, Exception):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()
