"""Acker: the only actor that settles deliveries.

It turns each message's result into a wire action (republishing or dead-lettering
through the publisher connection first where the result needs it), records it in
the session's :class:`AckLedger`, and sends the frames the ledger releases: ACK
runs coalesced into one ``ack(multiple=True)``, everything else at its place.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import partial

import attrs
from anyio import create_task_group
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

__all__ = ["MAX_PUBLISHES_IN_FLIGHT", "Acker", "DeadLetter", "Disposition", "Outcome"]

logger = logging.getLogger("amqp_batch.acker")

#: Publishes (REQUEUE copies, library dead-letters) of one batch in flight at once:
#: the size of the batch's task pool, whatever the batch size.
MAX_PUBLISHES_IN_FLIGHT = 64


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
                actions = await self._decide_batch(batch)
                for (message, _), action in zip(batch, actions, strict=True):
                    self._ledger.resolve(message.delivery_tag, action)
                await self._send_ready()

    async def _decide_batch(self, batch: list[Outcome]) -> list[Action]:
        """The wire action of each outcome, in order.

        Outcomes that need a publish (a REQUEUE copy, a library dead-letter) are
        published concurrently: every copy of the batch is in flight at once (up
        to :data:`MAX_PUBLISHES_IN_FLIGHT`) and their confirms are awaited
        together, instead of one confirm round trip per message. Nothing is
        resolved in the ledger before every publish of the batch has finished, so
        no ack can cover an original whose copy is unconfirmed.
        """
        actions: list[Action | None] = []
        publishes: list[tuple[int, Callable[[PublisherSession], Awaitable[Action]]]]
        publishes = []
        for index, (message, disposition) in enumerate(batch):
            planned = self._plan(message, disposition)
            if isinstance(planned, Action):
                actions.append(planned)
            else:
                actions.append(None)
                publishes.append((index, planned))
        if publishes:
            # Opened here, in the acker's own task (its context manager owns a
            # task group), never inside the publishing tasks below.
            publisher = await self._publisher_session()
            pending = iter(publishes)

            async def publish_some() -> None:
                for index, publish in pending:
                    actions[index] = await publish(publisher)

            async with create_task_group() as group:
                for _ in range(min(len(publishes), MAX_PUBLISHES_IN_FLIGHT)):
                    group.start_soon(publish_some)
        decided = [action for action in actions if action is not None]
        assert len(decided) == len(batch)
        return decided

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

    def _plan(
        self, message: Message, disposition: Disposition
    ) -> Action | Callable[[PublisherSession], Awaitable[Action]]:
        """The action for ``message``, or the publish that decides it."""
        if isinstance(disposition, DeadLetter):
            self._counts["dead_lettered"] += 1
            return self._dead_letter(message, disposition.reason, always=True)
        self._counts[disposition.name.lower()] += 1
        if disposition is MessageResult.ACK:
            return Action.ACK
        if disposition is MessageResult.REQUEUE_IMMEDIATE:
            return Action.REQUEUE
        if disposition is MessageResult.NACK:
            self._counts["dead_lettered"] += 1
            return self._dead_letter(message, "rejected")
        if self._policy.is_exhausted(message.retry_count):
            logger.info(
                "message %r exhausted %d requeue attempt(s); dead-lettering it",
                message.message_id,
                self._policy.max_requeue_attempts,
            )
            self._counts["dead_lettered"] += 1
            return self._dead_letter(message, "max-requeue-attempts")
        return partial(self._republish, message)

    async def _republish(self, message: Message, publisher: PublisherSession) -> Action:
        """Publish the copy (confirmed); ACK the original only once it is confirmed."""
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
            dead_letter = self._dead_letter(message, "republish-failed")
            if isinstance(dead_letter, Action):
                return dead_letter
            return await dead_letter(publisher)
        return Action.ACK

    def _dead_letter(
        self, message: Message, reason: str, *, always: bool = False
    ) -> Action | Callable[[PublisherSession], Awaitable[Action]]:
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
        return partial(
            self._publish_dead_letter, message, exchange, routing_key, reason
        )

    async def _publish_dead_letter(
        self,
        message: Message,
        exchange: str,
        routing_key: str,
        reason: str,
        publisher: PublisherSession,
    ) -> Action:
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
