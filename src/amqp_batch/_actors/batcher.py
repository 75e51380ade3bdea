"""Batcher: takes the session's deliveries and groups them into batches.

It is the pipeline's intake: it registers every delivery with the ledger (in tag
order), reads its retry count, and groups messages by count and a deadline
(no timer tasks), capped in bytes. Deliveries already buffered by the session
are taken without a task switch each, so a full batch costs one switch, not
one per message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from anyio import (
    TASK_STATUS_IGNORED,
    CancelScope,
    EndOfStream,
    WouldBlock,
    current_time,
    move_on_at,
)
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._message import Message
from .._retry import InvalidRetryCount, parse_retry_count
from .._transport._base import Delivery
from .acker import DeadLetter, Outcome
from .ledger import AckLedger
from .streams import receive, send

__all__ = ["Intake", "run_batcher"]

logger = logging.getLogger("amqp_batch.batcher")


class Intake:
    """The batcher's off switch, reported through ``task_status``.

    :meth:`cancel` stops taking deliveries at once. The batch being collected is
    still flushed; what the session has buffered stays unsettled and goes back
    to the queue when the channel closes.
    """

    def __init__(self) -> None:
        self.stopped = False
        #: The scope of the batch being collected (set by :func:`run_batcher`).
        self.scope: CancelScope | None = None

    def cancel(self) -> None:
        """Stop taking deliveries (idempotent)."""
        self.stopped = True
        if self.scope is not None:
            self.scope.cancel()


async def run_batcher(
    deliveries: MemoryObjectReceiveStream[Delivery],
    ledger: AckLedger,
    to_handler: MemoryObjectSendStream[list[Message]],
    to_acker: MemoryObjectSendStream[list[Outcome]],
    *,
    batch_size: int,
    batch_timeout: float,
    max_batch_bytes: int | None = None,
    gate: Callable[[], Awaitable[None]] | None = None,
    task_status: TaskStatus[Intake] = TASK_STATUS_IGNORED,
) -> None:
    """Flush at ``batch_size`` messages or ``batch_timeout`` seconds after the
    batch's first delivery; ``max_batch_bytes`` caps a batch's bodies (a
    delivery that would exceed it starts the next batch; one that alone
    exceeds it is a batch of one). ``gate`` is awaited before each batch.

    Every delivery is registered with ``ledger`` before it goes anywhere (a tag the
    ledger does not know is never covered by a multiple-ack). A bad
    ``x-retry-count`` sends the delivery to the acker to be dead-lettered. When
    ``deliveries`` ends or the :class:`Intake` is cancelled, the batch being
    collected is flushed and ``to_handler`` closed (end of input downstream).
    """
    byte_limit = math.inf if max_batch_bytes is None else max_batch_bytes
    intake = Intake()
    register = ledger.register
    # Starts the next batch (not yet registered: tags stay in order).
    carried: Delivery | None = None
    async with to_handler, to_acker:
        task_status.started(intake)
        ended = False
        while not (ended or intake.stopped):
            batch: list[Message] = []
            invalid: list[Outcome] = []
            with CancelScope() as scope:
                intake.scope = scope
                try:
                    delivery = await _first(deliveries, carried, gate)
                    carried = None
                    with move_on_at(current_time() + batch_timeout):
                        carried = await _collect(
                            delivery,
                            deliveries,
                            register,
                            batch,
                            invalid,
                            batch_size=batch_size,
                            byte_limit=byte_limit,
                        )
                except EndOfStream:
                    ended = True
            intake.scope = None
            await _flush(invalid, to_acker, batch, to_handler)


async def _collect(
    delivery: Delivery,
    deliveries: MemoryObjectReceiveStream[Delivery],
    register: Callable[[int], None],
    batch: list[Message],
    invalid: list[Outcome],
    *,
    batch_size: int,
    byte_limit: float,
) -> Delivery | None:
    """Add ``delivery`` and the ones after it to ``batch`` (bad retry headers to
    ``invalid``) until the batch is full; the delivery that would have overflowed
    its byte cap, which starts the next batch, or ``None``. The caller's deadline
    cancels the wait for more."""
    batch_bytes = 0
    while True:
        retry_count: int | None = 0
        if delivery.properties.headers:
            retry_count = _retry_count(delivery, invalid, register)
        if retry_count is None:
            if not batch:
                return None  # flush it now, not at the deadline
        else:
            size = len(delivery.body)
            if batch and batch_bytes + size > byte_limit:
                return delivery
            register(delivery.delivery_tag)
            batch.append(Message(delivery, retry_count=retry_count))
            batch_bytes += size
            if len(batch) >= batch_size or batch_bytes >= byte_limit:
                return None
        try:
            delivery = deliveries.receive_nowait()
        except WouldBlock:
            delivery = await deliveries.receive()


async def _flush(
    invalid: list[Outcome],
    to_acker: MemoryObjectSendStream[list[Outcome]],
    batch: list[Message],
    to_handler: MemoryObjectSendStream[list[Message]],
) -> None:
    """Sent outside the intake's cancel scope: a cancelled send could not tell
    whether the item was taken."""
    if invalid:
        await send(to_acker, invalid)
    if batch:
        await send(to_handler, batch)


def _retry_count(
    delivery: Delivery, invalid: list[Outcome], register: Callable[[int], None]
) -> int | None:
    """The delivery's retry count; ``None`` (and registered for the acker to
    dead-letter) when its header is bad."""
    try:
        return parse_retry_count(delivery.properties.headers)
    except InvalidRetryCount as exc:
        register(delivery.delivery_tag)
        invalid.append(_dead_letter(delivery, exc))
        return None


async def _first(
    deliveries: MemoryObjectReceiveStream[Delivery],
    carried: Delivery | None,
    gate: Callable[[], Awaitable[None]] | None,
) -> Delivery:
    """The first delivery of the next batch, once the gate lets it start."""
    if gate is not None:
        await gate()  # the kill switch lets this batch start
    if carried is not None:
        return carried
    return await receive(deliveries)


def _dead_letter(delivery: Delivery, exc: InvalidRetryCount) -> Outcome:
    logger.warning(
        "delivery %d has an invalid retry header (%s); dead-lettering it",
        delivery.delivery_tag,
        exc,
    )
    return (Message(delivery), DeadLetter(f"invalid-retry-count: {exc}"))
