"""Receiver: turns the session's deliveries into messages, in tag order."""

from __future__ import annotations

import logging

from anyio import TASK_STATUS_IGNORED, CancelScope
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskStatus

from .._message import Message
from .._retry import InvalidRetryCount, parse_retry_count
from .._transport._base import Delivery
from .acker import DeadLetter, Outcome
from .ledger import AckLedger

__all__ = ["run_receiver"]

logger = logging.getLogger("amqp_batch.receiver")


async def run_receiver(
    deliveries: ObjectReceiveStream[Delivery],
    ledger: AckLedger,
    to_batcher: ObjectSendStream[Message],
    to_acker: ObjectSendStream[list[Outcome]],
    *,
    task_status: TaskStatus[CancelScope] = TASK_STATUS_IGNORED,
) -> None:
    """Register every delivery with the ledger and pass it on.

    Started with ``task_status``: the scope it reports is cancelled to stop taking
    deliveries at shutdown (what stays in the session's buffer goes back to the
    queue when the channel closes). A message whose ``x-retry-count`` is not a
    plain non-negative integer never reaches the handler: it goes straight to the
    acker to be dead-lettered. Closing ``to_batcher`` is the end-of-input signal
    downstream.
    """
    async with to_batcher, to_acker:
        with CancelScope() as scope:
            task_status.started(scope)
            async for delivery in deliveries:
                # Registered before handing on: a tag the ledger does not know is
                # never covered by a multiple-ack.
                ledger.register(delivery.delivery_tag)
                try:
                    retry_count = parse_retry_count(delivery.properties.headers)
                except InvalidRetryCount as exc:
                    logger.warning(
                        "delivery %d has an invalid retry header (%s); "
                        "dead-lettering it",
                        delivery.delivery_tag,
                        exc,
                    )
                    reason = f"invalid-retry-count: {exc}"
                    await to_acker.send([(Message(delivery), DeadLetter(reason))])
                    continue
                await to_batcher.send(Message(delivery, retry_count=retry_count))
