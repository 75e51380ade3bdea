"""Acker: the only actor that settles deliveries.

It turns each message's result into a wire action (republishing or dead-lettering
through the publisher connection first where the result needs it), records it in
the session's :class:`AckLedger`, and sends the frames the ledger releases: ACK
runs coalesced into one ``ack(multiple=True)``, everything else at its place.

Republishes are started on the publisher connection in the order of their
originals, without a task each (``PublisherSession.start_publish``), and one task
per batch waits for their confirms. The acker never waits for them itself: it
goes on with later batches while copies are in flight,
and the ledger holds every settlement behind an unconfirmed copy's original until
that copy is confirmed (then the whole run behind it goes out as one
``ack(multiple=True)``). If copies are pending and no confirm arrived for
:data:`PUBLISH_GRACE` seconds (a memory alarm blocks the publisher connection),
publishing counts as stalled: every settlement that does not depend on a pending
copy is sent at once (single frames past the pending tags), so acks keep flowing;
each original is acked only when its own copy is confirmed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import partial

import attrs
from anyio import Event, create_task_group, current_time, move_on_at
from anyio.abc import ObjectReceiveStream, TaskGroup

from .._exceptions import MessageNacked, MessageReturned
from .._hooks import HookDispatcher, Settlement, SettleOutcome
from .._message import Message
from .._results import MessageResult
from .._retry import (
    RetryPolicy,
    dead_letter_properties,
    original_destination,
    requeue_properties,
)
from .._transport._base import Confirmation, PublisherSession, Session
from .ledger import AckLedger, Action

__all__ = [
    "PUBLISH_GRACE",
    "Acker",
    "DeadLetter",
    "Disposition",
    "Outcome",
]

logger = logging.getLogger("amqp_batch.acker")

#: Seconds without any confirm, while copies are pending, after which the acker
#: stops holding back the other settlements for them (publishing is stalled).
PUBLISH_GRACE = 0.25


@attrs.frozen
class DeadLetter:
    """Dead-letter this message without asking the handler (e.g. a bad header)."""

    reason: str


Disposition = MessageResult | DeadLetter
Outcome = tuple[Message, Disposition]


#: Gives the original's action once its publish is confirmed (or has failed).
_Finish = Callable[[], Awaitable[Action]]
#: Starts a publish (synchronously: its frames are queued in call order) and
#: returns what finishes it.
_Publish = Callable[[PublisherSession], _Finish]


class Acker:
    """Settles one session's deliveries. Lives exactly as long as the session."""

    def __init__(
        self,
        session: Session,
        ledger: AckLedger,
        policy: RetryPolicy,
        open_publisher: Callable[[], AbstractAsyncContextManager[PublisherSession]],
        counts: Counter[str],
        *,
        hooks: HookDispatcher | None = None,
        worker: int = 0,
    ) -> None:
        self._session = session
        self._worker = worker
        self._settled = hooks.settled if hooks is not None else None
        self._copy_confirmed = hooks.copy_confirmed if hooks is not None else None
        #: Decided settlements not sent yet, by tag (only with a ``settled`` hook).
        self._records: dict[int, Settlement] = {}
        #: Messages whose publish is pending, by tag (only with a ``settled`` hook).
        self._pending_records: dict[int, tuple[Message, Disposition]] = {}
        self._ledger = ledger
        self._policy = policy
        self._open_publisher = open_publisher
        self._publisher: PublisherSession | None = None
        self._stack: AsyncExitStack | None = None
        self._counts = counts
        self._group: TaskGroup | None = None
        #: Publishes started and not confirmed yet.
        self._pending = 0
        #: When the last confirm arrived (or publishing started from idle).
        self._progress = 0.0
        #: True while publishes outlived PUBLISH_GRACE and are still pending.
        self._stalled = False
        #: Set when no publish is pending; a new one per busy period.
        self._idle: Event | None = None
        #: True while a task is in _send_ready's loop.
        self._sending = False

    async def run(self, outcomes: ObjectReceiveStream[list[Outcome]]) -> None:
        """Settle outcomes until every sender closed its end of ``outcomes``.

        The publisher connection is opened on the first republish and closed when
        this returns; its failure ends the session (the broker then redelivers
        whatever is unsettled).
        """
        async with outcomes, create_task_group() as group:
            self._group = group
            # The publisher is entered inside the pool's task group (by this
            # task), so it is closed before the group: the pool must be idle then.
            async with AsyncExitStack() as stack:
                self._stack = stack
                async for batch in outcomes:
                    await self._settle(batch)
                if self._pending:
                    assert self._idle is not None
                    await self._idle.wait()
                await self._send_ready()

    async def _settle(self, batch: list[Outcome]) -> None:
        """Resolve what needs no publish; start the publishes; send what is ready.

        Outcomes that need a publish (a REQUEUE copy, a library dead-letter) are
        started at once, in tag order, and one task waits for their confirms;
        this returns without waiting for them. An original is resolved in the
        ledger only once its publish is confirmed, so no ack covers an original
        whose copy is unconfirmed.
        """
        publishes: list[tuple[int, _Publish]] = []
        resolve = self._ledger.resolve
        acks = 0
        records = self._records if self._settled is not None else None
        for message, disposition in batch:
            if disposition is MessageResult.ACK:  # the common case, inline
                resolve(message.delivery_tag, Action.ACK)
                acks += 1
                if records is not None:
                    records[message.delivery_tag] = Settlement(
                        message, disposition, SettleOutcome.ACKED
                    )
                continue
            planned = self._plan(message, disposition)
            if isinstance(planned, Action):
                self._record(message, disposition, planned)
                resolve(message.delivery_tag, planned)
            else:
                publishes.append((message.delivery_tag, planned))
                if records is not None:
                    self._pending_records[message.delivery_tag] = (message, disposition)
        if acks:
            self._counts["ack"] += acks
        if publishes:
            # Opened here, in the acker's own task (its context manager owns a
            # task group), never inside the confirming tasks.
            publisher = await self._publisher_session()
            # If this raises (the connection failed under us), the session
            # ends and the broker redelivers every original not settled.
            started = [(tag, publish(publisher)) for tag, publish in publishes]
            assert self._group is not None
            if not self._pending:
                # A busy period starts: one watch for it.
                self._progress = current_time()
                self._idle = Event()
                self._group.start_soon(self._watch, self._idle)
            self._pending += len(started)
            self._group.start_soon(self._confirm, started, current_time())
        await self._send_ready()

    async def _confirm(
        self, started: list[tuple[int, _Finish]], published_at: float
    ) -> None:
        """Wait for one batch's publishes in order; resolve each original."""
        for delivery_tag, finish in started:
            action = await finish()
            self._progress = current_time()
            if self._copy_confirmed is not None:
                self._copy_confirmed(
                    self._worker, self._policy.queue, self._progress - published_at
                )
            pending = self._pending_records.pop(delivery_tag, None)
            if pending is not None:
                self._record(*pending, action, published=True)
            self._ledger.resolve(delivery_tag, action)
            self._pending -= 1
            if not self._pending:
                assert self._idle is not None
                self._idle.set()
            if self._stalled:
                if not self._pending:
                    self._stalled = False
                    logger.info("republishes confirmed again")
                await self._send_ready()
            elif self._ledger.head_decided():
                # This confirm released the oldest unsettled tag: send the run
                # behind it now (the broker's prefetch window waits on it).
                await self._send_ready()

    async def _watch(self, idle: Event) -> None:
        """Declare publishing stalled if no confirm arrives for PUBLISH_GRACE
        seconds before the pending publishes are done (``idle``). A slow but
        moving confirm stream (a busy broker) is not a stall: its acks stay
        coalesced."""
        while True:
            with move_on_at(self._progress + PUBLISH_GRACE):
                await idle.wait()
            if idle.is_set() or self._stalled:
                return
            if current_time() >= self._progress + PUBLISH_GRACE:
                break
        self._stalled = True
        logger.warning(
            "%d republish(es) pending and none confirmed for %.2f s (is the broker "
            "blocking publishers?); settling the other messages without waiting "
            "for them",
            self._pending,
            PUBLISH_GRACE,
        )
        await self._send_ready()

    async def settle_decided(self) -> None:
        """Send every decided settlement, single-tag past an undecided one.

        For after the pipeline was cancelled (``shutdown_timeout``): a batch that
        finished behind a cancelled one is settled, not sent back to the queue.
        Undecided tags (and originals whose copy is unconfirmed) stay unsettled.
        """
        self._stalled = True
        await self._send_ready()

    async def _send_ready(self) -> None:
        """Send every frame the ledger releases.

        One sender at a time, so frames go out in the order the ledger released
        them (a multiple-ack must never overtake a reject below its tag). A call
        made while another task is sending returns at once: that sender takes
        from the ledger again before it stops, so it sends what this call would
        have. (Cheaper than a lock, taken once per confirm that frees the oldest
        tag; with the native transport the sends never wait anyway.)
        """
        if self._sending:
            return
        self._sending = True
        try:
            session = self._session
            while frames := self._ledger.take_ready(past_undecided=self._stalled):
                for frame in frames:
                    if frame.action is Action.ACK:
                        await session.ack(frame.delivery_tag, multiple=frame.multiple)
                    elif frame.action is Action.REJECT:
                        await session.reject(frame.delivery_tag, requeue=False)
                    else:
                        await session.nack(frame.delivery_tag, requeue=True)
                    if self._settled is not None:
                        self._report(frame.delivery_tag, frame.multiple)
        finally:
            self._sending = False

    def _record(
        self,
        message: Message,
        disposition: Disposition,
        action: Action,
        *,
        published: bool = False,
    ) -> None:
        """Remember how ``message`` will be settled, for the ``settled`` hook."""
        if self._settled is None:
            return
        result = disposition if isinstance(disposition, MessageResult) else None
        if isinstance(disposition, DeadLetter):
            reason: str | None = disposition.reason
        elif result is MessageResult.NACK:
            reason = "rejected"
        elif result is MessageResult.REQUEUE and self._policy.is_exhausted(
            message.retry_count
        ):
            reason = "max-requeue-attempts"
        else:
            reason = None
        if action is Action.REQUEUE:
            outcome = SettleOutcome.REQUEUED
        elif action is Action.REJECT:
            outcome = SettleOutcome.REJECTED
            reason = reason or "republish-failed"
        elif not published:
            outcome = SettleOutcome.ACKED
        elif reason is None:
            outcome = SettleOutcome.REPUBLISHED
        else:
            outcome = SettleOutcome.DEAD_LETTERED
        self._records[message.delivery_tag] = Settlement(
            message, result, outcome, reason
        )

    def _report(self, delivery_tag: int, multiple: bool) -> None:
        """Tell the ``settled`` hook about the settlements a frame sent."""
        records = self._records
        if multiple:
            tags = [tag for tag in records if tag <= delivery_tag]
        else:
            tags = [delivery_tag] if delivery_tag in records else []
        if tags and self._settled is not None:
            tags.sort()
            self._settled(
                self._worker, self._policy.queue, [records.pop(t) for t in tags]
            )

    async def _publisher_session(self) -> PublisherSession:
        if self._publisher is None:
            assert self._stack is not None
            self._publisher = await self._stack.enter_async_context(
                self._open_publisher()
            )
        return self._publisher

    def _plan(self, message: Message, disposition: Disposition) -> Action | _Publish:
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

    def _republish(self, message: Message, publisher: PublisherSession) -> _Finish:
        """Start the copy now; finishing gives ACK once it is confirmed."""
        try:
            confirmation = publisher.start_publish(
                message.body,
                exchange="",
                routing_key=self._policy.queue,
                properties=requeue_properties(
                    message.delivery, message.retry_count + 1
                ),
                mandatory=True,
            )
        except (ValueError, TypeError):
            # The copy cannot be encoded (e.g. its headers no longer fit in one
            # frame): it will never be in the queue, so dead-letter the original.
            logger.exception(
                "message %r cannot be republished; dead-lettering it",
                message.message_id,
            )
            return partial(self._dead_letter_instead, message, publisher)
        return partial(self._republished, message, publisher, confirmation)

    async def _republished(
        self, message: Message, publisher: PublisherSession, confirmation: Confirmation
    ) -> Action:
        """ACK the original only once its copy is confirmed."""
        try:
            await confirmation.wait()
        except (MessageReturned, MessageNacked):
            # The copy is not safely in the queue: the original must not be acked.
            logger.exception(
                "republishing message %r failed; dead-lettering the original",
                message.message_id,
            )
            return await self._dead_letter_instead(message, publisher)
        return Action.ACK

    async def _dead_letter_instead(
        self, message: Message, publisher: PublisherSession
    ) -> Action:
        """Dead-letter an original whose copy could not be published."""
        self._counts["dead_lettered"] += 1
        dead_letter = self._dead_letter(message, "republish-failed")
        if isinstance(dead_letter, Action):
            return dead_letter
        return await dead_letter(publisher)()

    def _dead_letter(
        self, message: Message, reason: str, *, always: bool = False
    ) -> Action | _Publish:
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

    def _publish_dead_letter(
        self,
        message: Message,
        exchange: str,
        routing_key: str,
        reason: str,
        publisher: PublisherSession,
    ) -> _Finish:
        """Start the dead-letter publish now; ACK once it is confirmed."""
        try:
            confirmation = publisher.start_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=dead_letter_properties(message.delivery, reason),
            )
        except (ValueError, TypeError):
            logger.exception(
                "message %r cannot be published to %r; rejecting it (the broker "
                "dead-letters it under the queue's name)",
                message.message_id,
                exchange,
            )
            return partial(_decided, Action.REJECT)
        return partial(self._dead_lettered, message, exchange, confirmation)

    async def _dead_lettered(
        self, message: Message, exchange: str, confirmation: Confirmation
    ) -> Action:
        try:
            await confirmation.wait()
        except MessageNacked:
            logger.exception(
                "dead-lettering message %r to %r failed; rejecting it",
                message.message_id,
                exchange,
            )
            return Action.REJECT
        return Action.ACK


async def _decided(action: Action) -> Action:
    return action
