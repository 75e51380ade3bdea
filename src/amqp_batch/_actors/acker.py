"""Acker: the only actor that settles deliveries.

It turns each message's result into a wire action (republishing or dead-lettering
through the publisher connection first where the result needs it), records it in
the session's :class:`AckLedger`, and sends the frames the ledger releases: ACK
runs coalesced into one ``ack(multiple=True)``, everything else at its place.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import attrs
from anyio.abc import ObjectReceiveStream

from .._exceptions import MessageNacked, MessageReturned
from .._message import Message
from .._results import MessageResult
from .._retry import (
    RetryPolicy,
    dead_letter_properties,
    original_destination,
    requeue_properties,
)
from .._transport._base import PublisherSession, Session
from .ledger import AckLedger, Action

__all__ = ["Acker", "DeadLetter", "Disposition", "Outcome"]

logger = logging.getLogger("amqp_batch.acker")


@attrs.frozen
class DeadLetter:
    """Dead-letter this message without asking the handler (e.g. a bad header)."""

    reason: str


Disposition = MessageResult | DeadLetter
Outcome = tuple[Message, Disposition]


class Acker:
    """Settles one session's deliveries. Lives exactly as long as the session."""

    def __init__(
        self,
        session: Session,
        ledger: AckLedger,
        policy: RetryPolicy,
        open_publisher: Callable[[], AbstractAsyncContextManager[PublisherSession]],
        counts: Counter[str],
    ) -> None:
        self._session = session
        self._ledger = ledger
        self._policy = policy
        self._open_publisher = open_publisher
        self._publisher: PublisherSession | None = None
        self._stack: AsyncExitStack | None = None
        self._counts = counts

    async def run(self, outcomes: ObjectReceiveStream[list[Outcome]]) -> None:
        """Settle outcomes until every sender closed its end of ``outcomes``.

        The publisher connection is opened on the first republish and closed when
        this returns; its failure ends the session (the broker then redelivers
        whatever is unsettled).
        """
        async with AsyncExitStack() as stack, outcomes:
            self._stack = stack
            async for batch in outcomes:
                for message, disposition in batch:
                    action = await self._decide(message, disposition)
                    self._ledger.resolve(message.delivery_tag, action)
                await self._send_ready()

    async def _send_ready(self) -> None:
        for frame in self._ledger.take_ready():
            if frame.action is Action.ACK:
                await self._session.ack(frame.delivery_tag, multiple=frame.multiple)
            elif frame.action is Action.REJECT:
                await self._session.reject(frame.delivery_tag, requeue=False)
            else:
                await self._session.nack(frame.delivery_tag, requeue=True)

    async def _publisher_session(self) -> PublisherSession:
        if self._publisher is None:
            assert self._stack is not None
            self._publisher = await self._stack.enter_async_context(
                self._open_publisher()
            )
        return self._publisher

    async def _decide(self, message: Message, disposition: Disposition) -> Action:
        if isinstance(disposition, DeadLetter):
            self._counts["dead_lettered"] += 1
            return await self._dead_letter(message, disposition.reason, always=True)
        self._counts[disposition.name.lower()] += 1
        if disposition is MessageResult.ACK:
            return Action.ACK
        if disposition is MessageResult.REQUEUE_IMMEDIATE:
            return Action.REQUEUE
        if disposition is MessageResult.NACK:
            self._counts["dead_lettered"] += 1
            return await self._dead_letter(message, "rejected")
        return await self._requeue(message)

    async def _requeue(self, message: Message) -> Action:
        if self._policy.is_exhausted(message.retry_count):
            logger.info(
                "message %r exhausted %d requeue attempt(s); dead-lettering it",
                message.message_id,
                self._policy.max_requeue_attempts,
            )
            self._counts["dead_lettered"] += 1
            return await self._dead_letter(message, "max-requeue-attempts")
        publisher = await self._publisher_session()
        try:
            await publisher.publish(
                message.body,
                exchange="",
                routing_key=self._policy.queue,
                properties=requeue_properties(
                    message.delivery, message.retry_count + 1
                ),
                mandatory=True,
            )
        except (MessageReturned, MessageNacked):
            # The copy is not safely in the queue: the original must not be acked.
            logger.exception(
                "republishing message %r failed; dead-lettering the original",
                message.message_id,
            )
            self._counts["dead_lettered"] += 1
            return await self._dead_letter(message, "republish-failed")
        return Action.ACK

    async def _dead_letter(
        self, message: Message, reason: str, *, always: bool = False
    ) -> Action:
        """Dead-letter with the original exchange and routing key.

        An original is rejected and the broker dead-letters it (keeping its key,
        adding ``x-death``). A republished copy would be dead-lettered under the
        queue's name, so when the DLX is known the library publishes it there
        itself (confirmed) and acks; ``always`` does the same for messages that
        need a reason header.
        """
        exchange = self._policy.dead_letter_exchange
        if exchange is None or not (always or self._policy.is_copy(message.delivery)):
            return Action.REJECT
        _, routing_key = original_destination(message.delivery)
        if self._policy.dead_letter_routing_key is not None:
            routing_key = self._policy.dead_letter_routing_key
        publisher = await self._publisher_session()
        try:
            await publisher.publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=dead_letter_properties(message.delivery, reason),
            )
        except MessageNacked:
            logger.exception(
                "dead-lettering message %r to %r failed; rejecting it",
                message.message_id,
                exchange,
            )
            return Action.REJECT
        return Action.ACK
