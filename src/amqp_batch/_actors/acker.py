"""Acker: the only actor that settles deliveries.

It carries out the plan :func:`~.planner.plan` gives for each message's result
(settling it, or republishing or dead-lettering it through the publisher
connection first), records it in the session's :class:`AckLedger`, and sends
the frames the ledger releases: ACK runs coalesced into one
``ack(multiple=True)``, everything else at its place. What it sent is counted
in one place (:meth:`Acker._count`), frame by frame.

Publishes are started on the publisher connection in the order of their
originals, without a task each (``PublisherSession.start_publish``), and one task
per batch waits for their confirms, running a plan's fallback when its publish
fails. The acker never waits for them itself: it goes on with later batches
while copies are in flight, and the ledger holds every settlement behind an
unconfirmed copy's original until that copy is confirmed (then the whole run
behind it goes out as one ``ack(multiple=True)``). If copies are pending and no
confirm arrived for :data:`PUBLISH_GRACE` seconds (a memory alarm blocks the
publisher connection), publishing counts as stalled: every settlement that does
not depend on a pending copy is sent at once (single frames past the pending
tags), so acks keep flowing; each original is acked only when its own copy is
confirmed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack

from anyio import EndOfStream, Event, create_task_group, current_time, move_on_at
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from .._exceptions import MessageNacked, MessageReturned
from .._message import Message
from .._results import MessageResult
from .._retry import RetryPolicy
from .._transport._base import Confirmation, PublisherSession, Session
from .ledger import AckLedger, Action
from .ledger import Settle as Frame
from .planner import (
    DECODE_ERROR,
    MAX_REQUEUE_ATTEMPTS,
    Applied,
    DeadLetter,
    Disposition,
    Fate,
    Plan,
    Publish,
    Republish,
    Settle,
    plan,
)
from .streams import receive

__all__ = [
    "PUBLISH_GRACE",
    "Acker",
    "Applied",
    "DeadLetter",
    "Disposition",
    "Outcome",
]

logger = logging.getLogger("amqp_batch.acker")

#: Bound once (reading an enum member costs about ten times a global).
_ACK_RESULT, _ACKED = MessageResult.ACK, Fate.ACKED

#: Seconds without any confirm, while copies are pending, after which the acker
#: stops holding back the other settlements for them (publishing is stalled).
PUBLISH_GRACE = 0.25

#: One message and what the handler (or the batcher) decided for it.
Outcome = tuple[Message, Disposition]
#: A publish to start: the message, its disposition, the plan.
_ToStart = tuple[Message, Disposition, Publish]
#: A publish in flight: the message, its disposition, the plan, its confirm.
_InFlight = tuple[Message, Disposition, Publish, Confirmation]


class Acker:
    """Settles one session's deliveries. Lives exactly as long as the session.

    ``counts`` (the worker's health counters) counts each result once its
    settlement is sent: under its result's key (``ack``, ``nack``, ``requeue``,
    ``requeue_immediate``) and, when it left the queue as a dead letter, under
    ``dead_lettered``. ``on_applied``, if given, receives the same settlements
    as :class:`Applied` records, one list per run of frames sent;
    ``on_copy_confirmed`` the seconds from starting each publish (a copy, a
    dead letter) to its confirm.
    """

    def __init__(
        self,
        session: Session,
        ledger: AckLedger,
        policy: RetryPolicy,
        open_publisher: Callable[[], AbstractAsyncContextManager[PublisherSession]],
        counts: Counter[str],
        *,
        on_applied: Callable[[Sequence[Applied]], None] | None = None,
        on_copy_confirmed: Callable[[float], None] | None = None,
    ) -> None:
        self._session = session
        self._ledger = ledger
        self._policy = policy
        self._open_publisher = open_publisher
        self._publisher: PublisherSession | None = None
        self._stack: AsyncExitStack | None = None
        self._counts = counts
        self._on_applied = on_applied
        self._on_copy_confirmed = on_copy_confirmed
        #: The result settled inline as a bare ACK (no record): ACK, unless
        #: every settlement is reported to ``on_applied``.
        self._bare_ack = MessageResult.ACK if on_applied is None else None
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
        #: Set when a confirm released frames: the sender task sends them
        #: (made in ``run``, in the event loop).
        self._wake: Event | None = None
        #: Whether ``_wake`` is set (read without a call into anyio).
        self._woken = False
        #: Set once ``run`` sent the last frames: the sender task ends.
        self._done = False

    async def run(self, outcomes: MemoryObjectReceiveStream[list[Outcome]]) -> None:
        """Settle outcomes until every sender closed its end of ``outcomes``.

        The publisher connection is opened on the first publish and closed when
        this returns; its failure ends the session (the broker then redelivers
        whatever is unsettled).
        """
        async with outcomes, create_task_group() as group:
            self._group = group
            self._wake = Event()
            group.start_soon(self._sender)
            # The publisher is entered inside the pool's task group (by this
            # task), so it is closed before the group: the pool must be idle then.
            async with AsyncExitStack() as stack:
                self._stack = stack
                while True:
                    try:
                        batch = await receive(outcomes)
                    except EndOfStream:
                        break
                    await self._settle(batch)
                if self._pending:
                    assert self._idle is not None
                    await self._idle.wait()
                await self._send_ready()
            self._done = True
            self._wake.set()

    async def _settle(self, batch: list[Outcome]) -> None:
        """Plan every outcome; record the settlements; start the publishes;
        send what is ready.

        Publishes (a REQUEUE copy, a library dead-letter) are started at once,
        in tag order, and one task waits for their confirms; this returns
        without waiting for them. An original is resolved in the ledger only
        once its publish is confirmed, so no ack covers an original whose copy
        is unconfirmed.
        """
        publishes: list[_ToStart] = []
        resolve = self._ledger.resolve
        bare_ack, policy = self._bare_ack, self._policy
        ack, acked = Action.ACK, _ACKED
        for message, disposition in batch:
            if disposition is bare_ack:  # the common case, inline
                resolve(message.delivery_tag, ack)
                continue
            if disposition is _ACK_RESULT:  # an ACK that on_applied hears of
                resolve(message.delivery_tag, Applied(message, disposition, acked))
                continue
            planned = plan(message, disposition, policy)
            if planned.reason == MAX_REQUEUE_ATTEMPTS:
                logger.info(
                    "message %r exhausted %d requeue attempt(s); dead-lettering it",
                    message.message_id,
                    policy.max_requeue_attempts,
                )
            if isinstance(planned, Settle):
                resolve(
                    message.delivery_tag,
                    Applied(message, disposition, planned.fate, planned.reason),
                )
            else:
                publishes.append((message, disposition, planned))
        if publishes:
            await self._start_all(publishes)
        await self._send_ready()

    async def _start_all(self, publishes: list[_ToStart]) -> None:
        """Start ``publishes`` in order; one task waits for their confirms."""
        # Opened here, in the acker's own task (its context manager owns a task
        # group), never inside the confirming tasks.
        publisher = await self._publisher_session()
        in_flight: list[_InFlight] = []
        for message, disposition, planned in publishes:
            # If this raises (the connection failed under us), the session ends
            # and the broker redelivers every original not settled.
            started = self._start(publisher, message, disposition, planned)
            if isinstance(started, Applied):
                self._ledger.resolve(message.delivery_tag, started)
            else:
                in_flight.append(started)
        if not in_flight:
            return
        assert self._group is not None
        if not self._pending:
            # A busy period starts: one watch for it.
            self._progress = current_time()
            self._idle = Event()
            self._group.start_soon(self._watch, self._idle)
        self._pending += len(in_flight)
        self._group.start_soon(self._confirm, publisher, in_flight, current_time())

    def _start(
        self,
        publisher: PublisherSession,
        message: Message,
        disposition: Disposition,
        planned: Plan,
    ) -> _InFlight | Applied:
        """Start ``planned``'s publish, or, while a publish cannot be encoded
        (e.g. its headers no longer fit in one frame), its fallback's."""
        while not isinstance(planned, Settle):
            try:
                confirmation = publisher.start_publish(
                    message.body,
                    exchange=planned.exchange,
                    routing_key=planned.routing_key,
                    properties=planned.properties,
                    mandatory=planned.mandatory,
                )
            except (ValueError, TypeError):
                _log_failed(message, planned, "is impossible (cannot be encoded)")
                planned = planned.fallback
                continue
            return message, disposition, planned, confirmation
        return Applied(message, disposition, planned.fate, planned.reason)

    async def _confirmed(
        self, publisher: PublisherSession, started: _InFlight
    ) -> Applied:
        """Wait for a publish's confirm; if it is returned or nacked (not safely
        published: the original must not be acked), run its fallback."""
        message, disposition, planned, confirmation = started
        while True:
            try:
                await confirmation.wait()
            except (MessageReturned, MessageNacked):
                _log_failed(message, planned, "failed")
                restarted = self._start(
                    publisher, message, disposition, planned.fallback
                )
                if isinstance(restarted, Applied):
                    return restarted
                _, _, planned, confirmation = restarted
                continue
            return Applied(message, disposition, planned.fate, planned.reason)

    async def _confirm(
        self, publisher: PublisherSession, in_flight: list[_InFlight], started_at: float
    ) -> None:
        """Wait for one batch's publishes (started at ``started_at``) in order;
        resolve each original.

        The clock (``_progress``, for the stall watch and the confirm latency)
        is read when this task runs: at its start and after each confirm it had
        to wait for. A confirm that is in already arrived while this task was
        not running, so no later than that reading (most are: one frame from
        the broker confirms many publishes).
        """
        self._progress = current_time()
        for started in in_flight:
            waits = not started[3].done
            applied = await self._confirmed(publisher, started)
            if waits:
                self._progress = current_time()
            if self._on_copy_confirmed is not None:
                self._on_copy_confirmed(self._progress - started_at)
            self._ledger.resolve(applied.message.delivery_tag, applied)
            self._pending -= 1
            if not self._pending:
                assert self._idle is not None
                self._idle.set()
            if self._stalled:
                if not self._pending:
                    self._stalled = False
                    logger.info("republishes confirmed again")
                self._wake_sender()
            elif self._ledger.head_decided():
                # This confirm released the oldest unsettled tag: the run
                # behind it goes out as soon as this task waits (the broker's
                # prefetch window waits on it).
                self._wake_sender()

    async def _sender(self) -> None:
        """Send what confirms released, once they have all been resolved.

        One frame from the broker often confirms many publishes (and one read
        holds several such frames): their waits return without a task switch,
        so the confirming tasks resolve them all before this task runs and the
        whole run goes out as one ``ack(multiple=True)``, not one ack per copy.
        """
        while not self._done:
            assert self._wake is not None
            await self._wake.wait()
            self._wake, self._woken = Event(), False
            await self._send_ready()

    def _wake_sender(self) -> None:
        # Once per wake-up, not once per confirm (an anyio set costs two calls).
        if not self._woken:
            self._woken = True
            assert self._wake is not None
            self._wake.set()

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
            while frames := self._ledger.take_ready(past_undecided=self._stalled):
                await self._send(frames)
        finally:
            self._sending = False

    async def _send(self, frames: list[Frame]) -> None:
        """Send ``frames`` in order; count what was sent, even if a send fails."""
        session = self._session
        ack, reject = Action.ACK, Action.REJECT
        bare = 0
        applied: list[Applied] = []
        try:
            for frame in frames:
                if frame.action is ack:
                    await session.ack(frame.delivery_tag, multiple=frame.multiple)
                elif frame.action is reject:
                    await session.reject(frame.delivery_tag, requeue=False)
                else:
                    await session.nack(frame.delivery_tag, requeue=True)
                bare += frame.bare
                if frame.records:
                    applied.extend(frame.records)
        finally:
            self._count(bare, applied)

    def _count(self, bare_acks: int, applied: list[Applied]) -> None:
        """The one place results are counted: ``bare_acks`` ACKs settled
        without a record, and ``applied``; then ``on_applied`` hears of them."""
        counts = self._counts
        if bare_acks:
            counts["ack"] += bare_acks
        if not applied:
            return
        for record in applied:
            disposition = record.disposition
            if isinstance(disposition, MessageResult):  # not a DeadLetter
                # The key is the result's value ("ack", "nack", "requeue",
                # "requeue_immediate"); _value_ is a plain attribute, unlike
                # .value, and an enum-keyed dict would hash in Python.
                counts[disposition._value_] += 1
            elif disposition.reason == DECODE_ERROR:
                counts["decode_error"] += 1
            if record.fate.dead_letters:
                counts["dead_lettered"] += 1
        if self._on_applied is not None:
            self._on_applied(applied)

    async def _publisher_session(self) -> PublisherSession:
        if self._publisher is None:
            assert self._stack is not None
            self._publisher = await self._stack.enter_async_context(
                self._open_publisher()
            )
        return self._publisher


def _log_failed(message: Message, planned: Publish, what: str) -> None:
    """Log (with the exception) that ``planned``'s publish ``what``."""
    fallback = planned.fallback
    instead = (
        "rejecting it instead (the broker dead-letters it)"
        if isinstance(fallback, Settle)
        else "dead-lettering it instead"
    )
    logger.exception(
        "%s message %r to %r %s; %s",
        "republishing" if isinstance(planned, Republish) else "dead-lettering",
        message.message_id,
        planned.exchange,
        what,
        instead,
    )
