"""Handler unit tests without a broker: build messages, run a handler on them."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, overload

import attrs

from ._actors.handler import collect_results
from ._bodies import Decoder
from ._message import Message
from ._results import BatchHandler, MessageResult
from ._retry import parse_retry_count
from ._transport._base import Delivery, Properties

__all__ = ["make_message", "run_handler"]

T = TypeVar("T")

_PROPERTY_NAMES = frozenset(attrs.fields_dict(Properties)) - {"headers"}


@overload
def make_message(
    body: bytes,
    headers: Mapping[str, Any] | None = ...,
    *,
    decoder: None = ...,
    **properties: Any,
) -> Message[Any]: ...
@overload
def make_message(
    body: bytes,
    headers: Mapping[str, Any] | None = ...,
    *,
    decoder: Decoder[T],
    **properties: Any,
) -> Message[T]: ...
def make_message(
    body: bytes,
    headers: Mapping[str, Any] | None = None,
    *,
    decoder: Decoder[Any] | None = None,
    delivery_tag: int = 1,
    redelivered: bool = False,
    exchange: str = "",
    routing_key: str = "",
    **properties: Any,
) -> Message[Any]:
    """A :class:`~amqp_batch.Message` as a handler receives it, for unit tests.

    ``properties`` are AMQP basic properties (``content_type="application/json"``,
    ``message_id=...``, ``timestamp=...``); ``retry_count`` comes from an
    ``x-retry-count`` in ``headers``, as in a consumer. With a ``decoder``,
    ``message.value`` is the decoded body (a decode error is raised here).
    """
    unknown = set(properties) - _PROPERTY_NAMES
    if unknown:
        raise TypeError(f"not message properties: {', '.join(sorted(unknown))}")
    if "timestamp" in properties and isinstance(properties["timestamp"], int | float):
        properties["timestamp"] = datetime.datetime.fromtimestamp(
            properties["timestamp"], datetime.timezone.utc
        )
    delivery = Delivery(
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
        consumer_tag="test",
        body=bytes(body),
        properties=Properties(
            headers=dict(headers) if headers is not None else None, **properties
        ),
    )
    retry_count = parse_retry_count(headers) if headers else 0
    if decoder is None:
        return Message(delivery, retry_count=retry_count)
    value = decoder(delivery.body, delivery.properties.content_type)
    return Message(delivery, retry_count=retry_count, value=value)


async def run_handler(
    handler: BatchHandler[T],
    messages: Sequence[Message[T]],
    *,
    fallback: MessageResult = MessageResult.REQUEUE,
) -> list[MessageResult]:
    """Run ``handler`` on ``messages`` as the consumer would, without a broker:
    one result per message, in order.

    The consumer's rules apply: too few results, a value that is not a
    :class:`~amqp_batch.MessageResult`, or an exception give the rest
    ``fallback`` (as the settings' ``unhandled_exception_action``: REQUEUE by
    default);
    extra results are dropped (and logged).
    """
    return await collect_results(handler, list(messages), fallback=fallback)
