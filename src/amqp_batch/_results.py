"""Per-message results, and the type of the handler that gives them back."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Protocol

from typing_extensions import TypeVar

from ._message import Message

__all__ = ["BatchHandler", "MessageResult"]


class MessageResult(enum.Enum):
    """What to do with one message of a batch.

    ``ACK``
        Processed: remove it from the queue.
    ``NACK``
        Bad message, never retry: reject it without requeue, so the queue's
        dead-letter exchange (if any) receives it with its original exchange and
        routing key.
    ``REQUEUE``
        Transient failure: publish a copy to the back of the queue with
        ``x-retry-count`` + 1 (confirmed), then ack the original. Once the count has
        reached ``max_requeue_attempts`` the message is dead-lettered instead.
    ``REQUEUE_IMMEDIATE``
        Native ``basic.nack(requeue=True)``: back to the head of the queue, no retry
        tracking (may loop forever on a poison message).
    """

    ACK = "ack"
    NACK = "nack"
    REQUEUE = "requeue"
    REQUEUE_IMMEDIATE = "requeue_immediate"


#: The decoded body type a handler takes (``BatchHandler`` alone: any).
BodyT_contra = TypeVar("BodyT_contra", contravariant=True, default=Any)


class BatchHandler(Protocol[BodyT_contra]):
    """A batch handler: ``handler(messages)`` gives one :class:`MessageResult`
    per message, in order.

    It is an async generator function yielding the results, or an async function
    returning a sequence of them. :func:`~amqp_batch.batch_consumer` takes one;
    :meth:`BatchConsumer.process_messages <amqp_batch.BatchConsumer.process_messages>`
    is one. ``BatchHandler[Order]`` takes ``Message[Order]`` (bodies decoded by the
    consumer's decoder).
    """

    def __call__(
        self, messages: Sequence[Message[BodyT_contra]], /
    ) -> AsyncIterator[MessageResult] | Awaitable[Sequence[MessageResult]]:
        """Handle one batch."""
